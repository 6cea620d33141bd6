//! KTO (`align kto`): Ethayarajh et al. 2024 (arXiv:2402.01306) as TRL's `KTOTrainer`
//! runs it, on unpaired completions labelled desirable or undesirable (`prompt`,
//! `completion`, `label` rows; preference pairs are unpaired into one of each, as TRL's
//! `unpair_preference_dataset`). Each micro-batch also scores its completions under the
//! other prompts of the batch (rotated by one) to estimate the KL reference point; the math
//! is `align_losses::kto`.

use std::path::{Path, PathBuf};

use align_data::{LabelledCompletion, labelled_completions};
use align_data::{TokenizedSequence, pad_right};
use align_losses::kto::{kto_loss, kto_mismatched, kto_reference_point};
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use align_model::{AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, Transformer};
use anyhow::{Result, bail};

use crate::config::StageConfig;
pub use crate::config::kto::KtoSettings;
use crate::preference::pair_forward;
use crate::stage::{StageMain, frozen_copy, starting_model};
use crate::train::{Evaluation, MicroLoss, RowStage, Rows, export_policy, load_trainable, save_trainable, train};

struct KtoStage<B: AutodiffFusedOps> {
    s: KtoSettings,
    train: Vec<LabelledCompletion>,
    eval: Vec<LabelledCompletion>,
    /// The frozen reference (none under LoRA: the policy with its adapters disabled).
    frozen: Option<Transformer<B::InnerBackend>>,
    cfg: StageConfig,
    config: ModelConfig,
    tok: Tokenizer,
    pad: u32,
    device: B::Device,
}

/// Summed completion log-probs of `rows` under `model`, each completion after its own
/// prompt or, `mismatched`, after the prompt of the next row (the KL pairs).
fn completion_logps<M: FusedOps>(
    model: &Transformer<M>,
    rows: &[&LabelledCompletion],
    mismatched: bool,
    pad: u32,
    device: &M::Device,
) -> Tensor<M, 1> {
    let other = kto_mismatched(rows.len());
    let seqs: Vec<TokenizedSequence> = (0..rows.len())
        .map(|i| {
            let (p, c) = (&rows[i].prompt, &rows[if mismatched { other[i] } else { i }].completion);
            TokenizedSequence::completion(p, c)
        })
        .collect();
    pair_forward(model, &pad_right(&seqs.iter().collect::<Vec<_>>(), pad), false, false, device).logps
}

fn host<M: FusedOps>(t: Tensor<M, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("float data converts to f64")
}

impl<B: AutodiffFusedOps> KtoStage<B> {
    /// The batch's mean loss under `policy` (any backend; `inner` is the same policy without
    /// gradients, for the reference and KL passes) and TRL's metrics.
    fn objective<M: FusedOps>(
        &self,
        policy: &Transformer<M>,
        inner: &Transformer<B::InnerBackend>,
        rows: &[&LabelledCompletion],
        device: &M::Device,
    ) -> (Tensor<M, 1>, Vec<(&'static str, f64)>) {
        let reference = self.frozen.clone().unwrap_or_else(|| {
            let mut m = inner.clone();
            m.set_adapters_enabled(false);
            m
        });
        let on = |m: &Transformer<B::InnerBackend>, mismatched| {
            host(completion_logps(m, rows, mismatched, self.pad, &self.device))
        };
        let z = match self.s.loss_type.uses_reference_point() {
            true => kto_reference_point(&on(inner, true), &on(&reference, true)),
            false => 0.0,
        };
        let logps = completion_logps(policy, rows, false, self.pad, device);
        let ref_logps = on(&reference, false);
        let labels: Vec<bool> = rows.iter().map(|r| r.desirable).collect();
        let (n, s) = (rows.len(), &self.s);
        let ref_t = Tensor::<M, 1>::from_data(TensorData::new(ref_logps, [n]).convert::<M::FloatElem>(), device);
        let policy_host = host(logps.clone().detach());
        let t = kto_loss(logps, ref_t, &labels, z, s.beta, s.desirable_weight, s.undesirable_weight, s.loss_type);
        let rewards = host(t.rewards);
        let mean_of = |v: &[f64], want: bool| {
            let x: Vec<f64> = v.iter().zip(&labels).filter(|(_, l)| **l == want).map(|(x, _)| *x).collect();
            (!x.is_empty()).then(|| x.iter().sum::<f64>() / x.len() as f64)
        };
        let mut metrics = vec![("kl", z)];
        let (rc, rr) = (mean_of(&rewards, true), mean_of(&rewards, false));
        for (name, v) in [
            ("rewards/chosen", rc),
            ("rewards/rejected", rr),
            ("logps/chosen", mean_of(&policy_host, true)),
            ("logps/rejected", mean_of(&policy_host, false)),
        ] {
            metrics.extend(v.map(|v| (name, v)));
        }
        if let (Some(c), Some(r)) = (rc, rr) {
            metrics.push(("rewards/margins", c - r));
        }
        (t.losses.mean(), metrics)
    }
}

impl<B: AutodiffFusedOps> RowStage<B> for KtoStage<B> {
    type Model = Transformer<B>;

    fn rows(&self) -> (usize, usize, usize) {
        let t = &self.cfg.training;
        (self.train.len(), t.per_device_train_batch_size, t.gradient_accumulation_steps)
    }

    /// A row's length: its prompt and completion tokens.
    fn curriculum(&self, _model: &Transformer<B>) -> Result<Option<(crate::config::CurriculumConfig, Vec<f64>)>> {
        Ok(self.cfg.curriculum.clone().map(|c| {
            let lengths = self.train.iter().map(|r| (r.prompt.len() + r.completion.len()) as f64).collect();
            (c, lengths)
        }))
    }

    fn row_loss(
        &self,
        model: &Transformer<B>,
        micro: &[usize],
        _step_units: usize,
        micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let rows: Vec<&LabelledCompletion> = micro.iter().map(|&i| &self.train[i]).collect();
        let (loss, metrics) = self.objective(model, &model.valid(), &rows, &self.device);
        // TRL: the mean over the micro-batch; the Trainer divides by the accumulation steps.
        let fed_tokens = rows.iter().map(|r| 2 * (r.prompt.len() + r.completion.len())).sum();
        Ok(MicroLoss { loss: loss / micro_batches as f64, metrics, metrics_with_units: vec![], units: 1.0, fed_tokens })
    }

    fn evaluate_rows(&mut self, model: &Transformer<B>) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let m = model.valid();
        let (mut loss, mut sums, mut counts) =
            (0.0, std::collections::BTreeMap::<String, f64>::new(), std::collections::BTreeMap::<String, f64>::new());
        let chunks: Vec<&[LabelledCompletion]> =
            self.eval.chunks(self.cfg.training.per_device_train_batch_size.max(2)).collect();
        for chunk in &chunks {
            let rows: Vec<&LabelledCompletion> = chunk.iter().collect();
            let (l, metrics) = self.objective(&m, &m, &rows, &self.device);
            loss += l.into_scalar().elem::<f64>() / chunks.len() as f64;
            for (k, v) in metrics {
                *sums.entry(k.to_string()).or_default() += v;
                *counts.entry(k.to_string()).or_default() += 1.0;
            }
        }
        let metrics = sums.into_iter().map(|(k, v)| (k.clone(), v / counts[&k])).collect();
        Ok(Some(Evaluation { loss: Some(loss), metrics }))
    }

    fn save(&self, model: &Transformer<B>, dir: &Path) -> Result<()> {
        save_trainable(model, self.cfg.lora.as_ref(), HfHead::CausalLm, dir)
    }

    fn load(&self, model: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
        load_trainable(model, self.cfg.lora.as_ref(), &self.config, Heads::LM, dir, &self.device)
    }

    fn export_final(&self, model: &Transformer<B>, final_dir: &Path) -> Result<()> {
        export_policy(model, self.cfg.lora.as_ref(), &self.cfg.model.path, &self.tok, HfHead::CausalLm, final_dir)
    }
}

/// Run (or resume) the KTO stage on backend `B`; returns `final/`.
pub fn run_kto<B: FusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    crate::stage::on_autodiff::<B, _>(cfg, Kto { cfg, resume }, device)
}

#[derive(Clone)]
struct Kto<'a> {
    cfg: &'a StageConfig,
    resume: bool,
}

impl StageMain for Kto<'_> {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf> {
        let cfg = self.cfg;
        cfg.check_sections("kto", Some("kto"))?;
        let s = cfg.kto.clone().unwrap_or_default();
        if s.loss_type.uses_reference_point() && cfg.training.per_device_train_batch_size < 2 {
            bail!(
                "KTO estimates its KL reference point within a micro-batch: per_device_train_batch_size must be at least 2"
            );
        }
        let start = starting_model::<A>(cfg, Heads::LM, device)?;
        let (tok, tokenize) = (start.tokenizer, start.tokenize);
        let train_rows = labelled_completions(&tok, &cfg.data, &tokenize, "train")?;
        let eval_rows = match &cfg.eval_data {
            Some(d) => labelled_completions(&tok, d, &tokenize, "eval")?,
            None => vec![],
        };
        let desirable = train_rows.iter().filter(|r| r.desirable).count();
        tracing::info!(desirable, undesirable = train_rows.len() - desirable, "KTO");
        let model = start.model;
        let stage = KtoStage::<A> {
            frozen: cfg.lora.is_none().then(|| frozen_copy(&model, cfg.training.bf16)),
            s,
            train: train_rows,
            eval: eval_rows,
            cfg: cfg.clone(),
            config: model.config.clone(),
            tok,
            pad: start.pad_id,
            device: device.clone(),
        };
        train(&mut Rows(stage), model, &cfg.training, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}
