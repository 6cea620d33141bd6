//! The SFT stage (`align sft --config FILE`): next-token cross-entropy on completion tokens
//! (prompt/completion data), assistant tokens (conversations) or all tokens (`text`), with
//! optional packing, full fine-tuning or LoRA. Output: `final/` as HF safetensors (full) or
//! a PEFT adapter (LoRA), plus the tokenizer files.

use std::path::{Path, PathBuf};

use align_data::{
    DatasetConfig, ExampleTokenizer, HostBatch, TokenizeConfig, Tokenized, TokenizedSequence, load_examples, pack,
    pad_right,
};
use align_lora::LoraConfig;
use align_model::burn::backend::Autodiff;
use align_model::burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::Tensor;
use align_model::{
    AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, Transformer, load_pretrained, save_pretrained,
};
use anyhow::{Context, Result, bail};

use crate::config::StageConfig;
use crate::trainer::{Evaluation, LossTerms, TrainTask, train};

/// The SFT stage's config: the stage config shared by every stage.
pub type SftConfig = StageConfig;

/// Tokenise a dataset into training sequences.
fn sequences(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
) -> Result<Vec<TokenizedSequence>> {
    let (examples, _) = load_examples(data)?;
    let mut t = ExampleTokenizer::new(tok, cfg.clone());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = t.tokenize_all(&examples, threads)?;
    t.log_stats(what);
    out.into_iter()
        .enumerate()
        .map(|(i, x)| match x {
            Tokenized::Sequence(s) if s.loss_tokens() > 0 => Ok(s),
            Tokenized::Sequence(_) => {
                bail!("{}: example {i} has no tokens to train on after truncation", data.path.display())
            }
            _ => bail!(
                "{}: example {i} is not SFT data (preference or prompt-only rows need another stage)",
                data.path.display()
            ),
        })
        .collect()
}

pub struct SftTask<B: AutodiffFusedOps> {
    pub train: Vec<TokenizedSequence>,
    pub eval: Vec<TokenizedSequence>,
    pub pad_id: u32,
    pub packing: Option<usize>,
    pub batch_size: usize,
    pub config: ModelConfig,
    pub lora: Option<LoraConfig>,
    pub device: B::Device,
}

impl<B: AutodiffFusedOps> SftTask<B> {
    fn host_batch(&self, seqs: &[&TokenizedSequence]) -> Result<HostBatch> {
        Ok(match self.packing {
            Some(cap) => pack(seqs, cap, self.pad_id)?,
            None => pad_right(seqs, self.pad_id),
        })
    }
}

/// Σ −log p(target) over the loss tokens of a batch, and their count. The LM head runs on
/// the loss positions alone (completion-only and assistant-only masks skip the rest).
pub fn nll_sum<B: FusedOps>(model: &Transformer<B>, batch: &HostBatch, device: &B::Device) -> (Tensor<B, 1>, usize) {
    let hidden = model.forward_hidden(&batch.to_device::<B>(device), None);
    let (targets, mask) = batch.shifted_targets();
    let at = batch.loss_positions(&targets, &mask);
    let lp = model.logprobs_at(hidden, &at.rows, &at.targets, 1.0, false).logprobs;
    (lp.sum().neg(), at.rows.len())
}

impl<B: AutodiffFusedOps> TrainTask<B> for SftTask<B> {
    type Model = Transformer<B>;

    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn loss_sum(&self, model: &Transformer<B>, batch: &[usize]) -> Result<LossTerms<B>> {
        let seqs: Vec<&TokenizedSequence> = batch.iter().map(|&i| &self.train[i]).collect();
        let (sum, count) = nll_sum(model, &self.host_batch(&seqs)?, &self.device);
        Ok(LossTerms { sum, count, metrics: vec![] })
    }

    fn loss_tokens(&self, batch: &[usize]) -> usize {
        // Every loss token but a sequence's first (nothing predicts it).
        batch.iter().map(|&i| self.train[i].loss_mask.iter().skip(1).filter(|&&m| m).count()).sum()
    }

    fn input_tokens(&self, batch: &[usize]) -> usize {
        batch.iter().map(|&i| self.train[i].len()).sum()
    }

    fn evaluate(&self, model: &Transformer<B>) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let m = model.valid();
        let (mut sum, mut n) = (0.0f64, 0usize);
        for chunk in self.eval.chunks(self.batch_size.max(1)) {
            let refs: Vec<&TokenizedSequence> = chunk.iter().collect();
            let (s, k) = nll_sum(&m, &pad_right(&refs, self.pad_id), &self.device);
            sum += s.into_scalar().elem::<f64>();
            n += k;
        }
        Ok(Some(Evaluation { loss: sum / n.max(1) as f64, metrics: Default::default() }))
    }

    fn save_weights(&self, model: &Transformer<B>, dir: &Path) -> Result<()> {
        crate::trainer::save_trainable(model, self.lora.as_ref(), HfHead::CausalLm, dir)
    }

    fn load_weights(&self, model: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
        crate::trainer::load_trainable(model, self.lora.as_ref(), &self.config, Heads::LM, dir, &self.device)
    }
}

use align_model::burn::tensor::ElementConversion;

/// Run (or resume) an SFT stage on backend `B` (autodiff is added here, with Burn's
/// balanced activation checkpointing when `gradient_checkpointing` is on); returns `final/`.
pub fn run_sft<B: FusedOps>(cfg: &SftConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    if cfg.training.gradient_checkpointing {
        sft_on::<Autodiff<B, BalancedCheckpointing>>(cfg, resume, device)
    } else {
        sft_on::<Autodiff<B>>(cfg, resume, device)
    }
}

fn sft_on<B: AutodiffFusedOps>(cfg: &SftConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    cfg.check_sections("sft", None)?;
    let pre = load_pretrained::<B>(&cfg.model.path, Heads::LM, device)?;
    let tok = pre.tokenizer;
    let pad_id = tok.pad_token_id.or(tok.eos_token_id).context("the tokenizer has neither a pad nor an EOS token")?;
    let train_seqs = sequences(&tok, &cfg.data, &cfg.tokenize, "train")?;
    let eval_seqs = match &cfg.eval_data {
        Some(d) => sequences(&tok, d, &cfg.tokenize, "eval")?,
        None => vec![],
    };
    let packing = if cfg.packing {
        Some(cfg.tokenize.max_length.context("packing needs tokenize.max_length (the row length)")?)
    } else {
        None
    };
    let mut model = pre.model;
    if let Some(l) = &cfg.lora {
        let (m, names) = align_lora::attach(model, l, cfg.training.seed)?;
        tracing::info!(modules = names.len(), r = l.r, "LoRA attached");
        model = m;
    }
    let task = SftTask::<B> {
        train: train_seqs,
        eval: eval_seqs,
        pad_id,
        packing,
        batch_size: cfg.training.per_device_train_batch_size,
        config: model.config.clone(),
        lora: cfg.lora.clone(),
        device: device.clone(),
    };
    std::fs::create_dir_all(&cfg.output_dir)?;
    std::fs::write(cfg.output_dir.join("config.toml"), toml::to_string(cfg)?)?;
    let out = train(&task, model, &cfg.training, &cfg.output_dir, resume)?;
    let final_dir = cfg.output_dir.join("final");
    match &cfg.lora {
        Some(l) => {
            align_lora::save_peft(&mut out.model.clone(), l, &cfg.model.path.display().to_string(), &final_dir)?;
            tok.save(&final_dir)?;
        }
        None => save_pretrained(&out.model.valid(), Some(&tok), HfHead::CausalLm, &final_dir)?,
    }
    tracing::info!(final_dir = %final_dir.display(), steps = out.steps, "SFT done");
    Ok(final_dir)
}
