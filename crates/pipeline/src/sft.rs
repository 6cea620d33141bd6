//! The SFT stage (`align sft --config FILE`): next-token cross-entropy on completion tokens
//! (prompt/completion data), assistant tokens (conversations) or all tokens (`text`), with
//! optional packing, full fine-tuning or LoRA. Output: `final/` as HF safetensors (full) or
//! a PEFT adapter (LoRA), plus the tokenizer files.

use std::path::{Path, PathBuf};

use align_data::stage_rows::SFT_ROWS;
use align_data::{
    HostBatch, LossPositions, ScoredSft, SftRow, TokenizedSequence, column_numbers, pack, pad_right, sft_rows,
};
use align_lora::LoraConfig;
use align_losses::contrastive::info_nce_loss;
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use align_model::{AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, Transformer};
use anyhow::{Context, Result, bail};

use crate::config::curriculum::{CurriculumConfig, Measure};
use crate::config::{ContrastiveConfig, StageConfig};
use crate::stage::{StageMain, on_autodiff, starting_model};
use crate::train::{
    Evaluation, MicroLoss, RowStage, Rows, UnitMetric, export_policy, load_trainable, save_trainable, train,
};

/// The SFT stage's config: the stage config shared by every stage.
pub type SftConfig = StageConfig;

/// SFT as a [`Stage`]: a round is `gradient_accumulation_steps` micro-batches of examples.
pub struct SftStage<B: AutodiffFusedOps> {
    pub train: Vec<SftRow>,
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
    /// The critique rows' weight in the loss (`[self_critique] weight`; 1 without it).
    pub critique_weight: f64,
    /// Some training row is a critique (the loss weighs and logs them).
    pub critiques: bool,
    pub contrastive: Option<ContrastiveConfig>,
    /// Each example's difficulty from `[curriculum] column`, when set.
    pub column_difficulty: Option<Vec<f64>>,
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
                let (sum, n) = nll_sum(model, &pad_right(&[&row.seq], self.pad_id), &self.device);
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
        batch.iter().map(|&i| self.train[i].seq.loss_mask.iter().skip(1).filter(|&&m| m).count()).sum()
    }

    /// The micro-batch's InfoNCE loss between its prompts (mean final hidden state over
    /// the tokens before the reply, from the main forward: causal attention keeps them
    /// blind to the reply) and its replies (mean over the reply tokens, forwarded on
    /// their own, so a reply's state cannot copy its prompt's), and the metrics.
    fn contrastive_loss(
        &self,
        model: &Transformer<B>,
        c: &ContrastiveConfig,
        batch: &HostBatch,
        hidden: Tensor<B, 3>,
        seqs: &[&TokenizedSequence],
    ) -> Result<(Tensor<B, 1>, Vec<UnitMetric>)> {
        let replies: Vec<TokenizedSequence> = seqs
            .iter()
            .map(|s| {
                let ids: Vec<u32> =
                    s.input_ids.iter().zip(&s.loss_mask).filter(|(_, m)| **m).map(|(t, _)| *t).collect();
                TokenizedSequence { loss_mask: vec![true; ids.len()], input_ids: ids }
            })
            .collect();
        let reply_batch = pad_right(&replies.iter().collect::<Vec<_>>(), self.pad_id);
        let reply_hidden = model.forward_hidden(&reply_batch.to_device::<B>(&self.device), None);
        let prompts = mean_pool(hidden, &batch.shape, |i| batch.segments[i] != 0 && !batch.loss_mask[i], &self.device)
            .with_context(|| "[contrastive]: a row has no prompt tokens (plain text rows have no prompt to pair)")?;
        let replies = mean_pool(reply_hidden, &reply_batch.shape, |i| reply_batch.segments[i] != 0, &self.device)
            .context("[contrastive]: a row has no reply tokens")?;
        let dtype = prompts.dtype();
        let out = info_nce_loss(prompts, replies, c.temperature, c.direction);
        let n = seqs.len() as f64;
        let loss_value = out.loss.clone().into_scalar().elem::<f64>();
        let accuracy = out.metrics().accuracy;
        let metrics = vec![("contrastive/loss", loss_value, 1.0), ("contrastive/accuracy", accuracy * n, n)];
        Ok((out.loss.cast(dtype), metrics))
    }
}

/// The mean of `hidden` ([batch, seq, dim]) over each row's positions where `keep(flat
/// index)`, `[batch, dim]`; an error when a row keeps none.
fn mean_pool<B: FusedOps>(
    hidden: Tensor<B, 3>,
    shape: &[usize; 2],
    keep: impl Fn(usize) -> bool,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let [b, t] = *shape;
    let mut w = vec![0f32; b * t];
    for r in 0..b {
        let kept: Vec<usize> = (r * t..(r + 1) * t).filter(|&i| keep(i)).collect();
        if kept.is_empty() {
            bail!("row {r} of the micro-batch has no tokens to pool");
        }
        for i in &kept {
            w[*i] = 1.0 / kept.len() as f32;
        }
    }
    let w = Tensor::<B, 3>::from_data(TensorData::new(w, [b, 1, t]), device).cast(hidden.dtype());
    Ok(w.matmul(hidden).squeeze_dim(1))
}

/// A batch's final hidden states, its loss positions, and the log-prob of each position's
/// target. The LM head runs on the loss positions alone (completion-only and
/// assistant-only masks skip the rest).
fn loss_logprobs<B: FusedOps>(
    model: &Transformer<B>,
    batch: &HostBatch,
    device: &B::Device,
) -> (Tensor<B, 3>, LossPositions, Tensor<B, 1>) {
    let hidden = model.forward_hidden(&batch.to_device::<B>(device), None);
    let (targets, mask) = batch.shifted_targets();
    let at = batch.loss_positions(&targets, &mask);
    let lp = model.logprobs_at(hidden.clone(), &at.rows, &at.targets, 1.0, false).logprobs;
    (hidden, at, lp)
}

/// Σ −log p(target) over the loss tokens of a batch, and their count.
pub fn nll_sum<B: FusedOps>(model: &Transformer<B>, batch: &HostBatch, device: &B::Device) -> (Tensor<B, 1>, usize) {
    let (_, at, lp) = loss_logprobs(model, batch, device);
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
        micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let seqs: Vec<&TokenizedSequence> = micro.iter().map(|&i| &self.train[i].seq).collect();
        let batch = self.host_batch(&seqs)?;
        let (hidden, at, lp) = loss_logprobs(model, &batch, &self.device);
        if at.rows.len() != self.loss_tokens(micro) {
            bail!("the batch counted {} loss tokens but its loss covers {}", self.loss_tokens(micro), at.rows.len());
        }
        let mut metrics = vec![];
        // Every micro-batch logs the same metrics (the replicas compare their names).
        let nll = if self.critiques {
            // Reply tokens weigh 1, critique tokens `critique_weight`; the reply and
            // critique losses are logged per token of each.
            let t = batch.shape[1];
            let is_critique: Vec<bool> = at.rows.iter().map(|&r| self.train[micro[r / t]].critique).collect();
            let values =
                lp.clone().into_data().convert::<f64>().to_vec::<f64>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            for (name, want) in [("critique/reply_loss", false), ("critique/loss", true)] {
                let (sum, n) = values
                    .iter()
                    .zip(&is_critique)
                    .filter(|(_, c)| **c == want)
                    .fold((0.0, 0.0), |(s, n), (v, _)| (s - v, n + 1.0));
                metrics.push((name, sum, n));
            }
            let w: Vec<f32> = is_critique.iter().map(|&c| if c { self.critique_weight as f32 } else { 1.0 }).collect();
            let w = Tensor::<B, 1>::from_data(TensorData::new(w, [at.rows.len()]), &self.device).cast(lp.dtype());
            (lp * w).sum().neg()
        } else {
            lp.sum().neg()
        };
        let mut loss = nll / step_units as f64;
        if let Some(c) = &self.contrastive {
            let (aux, m) = self.contrastive_loss(model, c, &batch, hidden, &seqs)?;
            // Once per micro-batch: the update's auxiliary loss is the micro-batches' mean.
            loss = loss + aux.mul_scalar(c.weight / micro_batches as f64);
            metrics.extend(m);
        }
        Ok(MicroLoss {
            loss,
            metrics: vec![],
            metrics_with_units: metrics,
            units: at.rows.len() as f64,
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
            Measure::Length => self.train.iter().map(|r| r.seq.len() as f64).collect(),
            Measure::Loss => self.row_losses(&model.valid()),
            Measure::Score if let Some(d) = &self.column_difficulty => {
                self.train.iter().map(|r| d[r.example]).collect()
            }
            Measure::Score => (self.train.iter().enumerate())
                .map(|(i, r)| {
                    r.score.map(|s| c.max_score - s).with_context(|| {
                        format!(
                            "[curriculum] measure = \"score\": training row {} has no meta_eval_score (only scored conversations have one)",
                            i + 1
                        )
                    })
                })
                .collect::<Result<_>>()?,
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
        let condition = cfg.score_conditioning.as_ref().map(|c| c.condition()).transpose()?;
        let critique = cfg.self_critique.as_ref().map(|c| c.task()).transpose()?;
        let scored = ScoredSft { condition: condition.as_ref(), critique: critique.as_ref() };
        let train_rows = sft_rows(&tok, &cfg.data, &tokenize, "train", scored)?;
        let critiques = train_rows.iter().any(|r| r.critique);
        // Held-out rows are conditioned as training rows are, without critiques: eval_loss
        // stays the replies' loss.
        let eval_seqs = match &cfg.eval_data {
            Some(d) => (sft_rows(&tok, d, &tokenize, "eval", ScoredSft { critique: None, ..scored })?)
                .into_iter()
                .map(|r| r.seq)
                .collect(),
            None => vec![],
        };
        let packing = if cfg.packing {
            Some(tokenize.max_length.context("packing needs tokenize.max_length (the row length)")?)
        } else {
            None
        };
        let stage = SftStage::<A> {
            train: train_rows,
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
            critique_weight: cfg.self_critique.as_ref().map_or(1.0, |c| c.weight),
            critiques,
            contrastive: cfg.contrastive.clone(),
            column_difficulty: match cfg.curriculum.as_ref().and_then(|c| c.column.as_deref()) {
                Some(column) => Some(column_numbers(&cfg.data, SFT_ROWS, column)?),
                None => None,
            },
        };
        train(&mut Rows(stage), start.model, &cfg.training, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}
