//! The SFT stage (`align sft --config FILE`): next-token cross-entropy on completion tokens
//! (prompt/completion data), assistant tokens (conversations) or all tokens (`text`), with
//! optional packing, full fine-tuning or LoRA. Output: `final/` as HF safetensors (full) or
//! a PEFT adapter (LoRA), plus the tokenizer files.

use std::path::{Path, PathBuf};

use align_data::sft_sequences;
use align_data::{HostBatch, TokenizedSequence, pack, pad_right};
use align_lora::LoraConfig;
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::{ElementConversion, Tensor};
use align_model::{AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, Transformer};
use anyhow::{Context, Result, bail};

use crate::config::StageConfig;
use crate::config::curriculum::{CurriculumConfig, Measure};
use crate::stage::{StageMain, on_autodiff, starting_model};
use crate::train::{Evaluation, MicroLoss, RowStage, Rows, export_policy, load_trainable, save_trainable, train};

/// The SFT stage's config: the stage config shared by every stage.
pub type SftConfig = StageConfig;

/// SFT as a [`Stage`]: a round is `gradient_accumulation_steps` micro-batches of examples.
pub struct SftStage<B: AutodiffFusedOps> {
    pub train: Vec<TokenizedSequence>,
    pub eval: Vec<TokenizedSequence>,
    pub pad_id: u32,
    pub packing: Option<usize>,
    pub batch_size: usize,
    pub accumulation: usize,
    pub config: ModelConfig,
    pub lora: Option<LoraConfig>,
    pub tokenizer: Tokenizer,
    pub base: PathBuf,
    pub device: B::Device,
    pub curriculum: Option<CurriculumConfig>,
}

impl<B: AutodiffFusedOps> SftStage<B> {
    fn host_batch(&self, seqs: &[&TokenizedSequence]) -> Result<HostBatch> {
        Ok(match self.packing {
            Some(cap) => pack(seqs, cap, self.pad_id)?,
            None => pad_right(seqs, self.pad_id),
        })
    }

    /// Each training row's mean loss per loss token under `model` (0 for a row without
    /// any), one row per forward pass, with a progress bar.
    fn row_losses(&self, model: &Transformer<B::InnerBackend>) -> Vec<f64> {
        let bar = indicatif::ProgressBar::new(self.train.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "curriculum: loss of each row {bar:30} {pos}/{len} [{eta_precise}]",
            )
            .expect("valid template"),
        );
        let losses = (self.train.iter())
            .map(|row| {
                let (sum, n) = nll_sum(model, &pad_right(&[row], self.pad_id), &self.device);
                bar.inc(1);
                if n == 0 { 0.0 } else { sum.into_scalar().elem::<f64>() / n as f64 }
            })
            .collect();
        bar.finish_and_clear();
        losses
    }

    /// Loss tokens of a micro-batch: every loss token but a sequence's first (nothing
    /// predicts it).
    fn loss_tokens(&self, batch: &[usize]) -> usize {
        batch.iter().map(|&i| self.train[i].loss_mask.iter().skip(1).filter(|&&m| m).count()).sum()
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

impl<B: AutodiffFusedOps> RowStage<B> for SftStage<B> {
    type Model = Transformer<B>;

    fn rows(&self) -> (usize, usize, usize) {
        (self.train.len(), self.batch_size, self.accumulation)
    }

    fn units(&self, micro: &[usize]) -> usize {
        self.loss_tokens(micro)
    }

    fn row_loss(
        &self,
        model: &Transformer<B>,
        micro: &[usize],
        step_units: usize,
        _micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let seqs: Vec<&TokenizedSequence> = micro.iter().map(|&i| &self.train[i]).collect();
        let (sum, count) = nll_sum(model, &self.host_batch(&seqs)?, &self.device);
        if count != self.loss_tokens(micro) {
            bail!("the batch counted {} loss tokens but its loss covers {count}", self.loss_tokens(micro));
        }
        Ok(MicroLoss {
            loss: sum / step_units as f64,
            metrics: vec![],
            units: count as f64,
            fed_tokens: seqs.iter().map(|s| s.len()).sum(),
        })
    }

    fn evaluate_rows(&mut self, model: &Transformer<B>) -> Result<Option<Evaluation>> {
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
        Ok(Some(Evaluation { loss: Some(sum / n.max(1) as f64), metrics: Default::default() }))
    }

    fn curriculum(&self, model: &Transformer<B>) -> Result<Option<(CurriculumConfig, Vec<f64>)>> {
        let Some(c) = self.curriculum.clone() else { return Ok(None) };
        let difficulty = match c.measure {
            Measure::Length => self.train.iter().map(|s| s.len() as f64).collect(),
            Measure::Loss => self.row_losses(&model.valid()),
        };
        Ok(Some((c, difficulty)))
    }

    fn save(&self, model: &Transformer<B>, dir: &Path) -> Result<()> {
        save_trainable(model, self.lora.as_ref(), HfHead::CausalLm, dir)
    }

    fn load(&self, model: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
        load_trainable(model, self.lora.as_ref(), &self.config, Heads::LM, dir, &self.device)
    }

    fn export_final(&self, model: &Transformer<B>, final_dir: &Path) -> Result<()> {
        export_policy(model, self.lora.as_ref(), &self.base, &self.tokenizer, HfHead::CausalLm, final_dir)
    }
}

/// Run (or resume) an SFT stage on backend `B` (autodiff is added here, with Burn's
/// balanced activation checkpointing when `gradient_checkpointing` is on); returns `final/`.
pub fn run_sft<B: FusedOps>(cfg: &SftConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    on_autodiff::<B, _>(cfg, Sft { cfg, resume }, device)
}

#[derive(Clone)]
struct Sft<'a> {
    cfg: &'a SftConfig,
    resume: bool,
}

impl StageMain for Sft<'_> {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf> {
        let cfg = self.cfg;
        cfg.check_sections("sft", None)?;
        let start = starting_model::<A>(cfg, Heads::LM, device)?;
        let (tok, tokenize) = (start.tokenizer, start.tokenize);
        let train_seqs = sft_sequences(&tok, &cfg.data, &tokenize, "train")?;
        let eval_seqs = match &cfg.eval_data {
            Some(d) => sft_sequences(&tok, d, &tokenize, "eval")?,
            None => vec![],
        };
        let packing = if cfg.packing {
            Some(tokenize.max_length.context("packing needs tokenize.max_length (the row length)")?)
        } else {
            None
        };
        let stage = SftStage::<A> {
            train: train_seqs,
            eval: eval_seqs,
            pad_id: start.pad_id,
            packing,
            batch_size: cfg.training.per_device_train_batch_size,
            accumulation: cfg.training.gradient_accumulation_steps,
            config: start.model.config.clone(),
            lora: cfg.lora.clone(),
            tokenizer: tok,
            base: cfg.model.path.clone(),
            device: device.clone(),
            curriculum: cfg.curriculum.clone(),
        };
        train(&mut Rows(stage), start.model, &cfg.training, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}
