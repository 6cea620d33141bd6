//! The pairwise stages: the reward model (`align reward`), DPO (`align dpo`), ORPO
//! (`align orpo`) and SimPO (`align simpo`), all on preference pairs (a prompt, a chosen and
//! a rejected completion). One config shape; the stage's own section picks the objective.
//!
//! A micro-batch of `b` pairs runs as one forward over `2b` right-padded rows, chosen rows
//! first (TRL's `concatenated_forward`); a pair's loss is its unit, so the step loss is the
//! mean over pairs.

use std::path::{Path, PathBuf};

use align_data::preference_pairs;
use align_data::{DatasetConfig, ExampleTokenizer, HostBatch, TokenizeConfig, Tokenized, TokenizedSequence, pad_right};
use align_lora::LoraConfig;
use align_losses::preference::{
    DpoLossType, PreferenceMetrics, bradley_terry_loss, dpo_loss, orpo_loss, orpo_odds_ratio, simpo_loss,
};
use align_losses::{sequence_logprobs, sft_loss};
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use align_model::{
    AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, Transformer, save_pretrained, spread_rows,
};
use anyhow::{Result, bail};

use crate::config::CurriculumConfig;
pub use crate::config::preference::{
    DpoSettings, Objective, OrpoSettings, PairwiseStage, PreferenceConfig, RewardSettings, SimpoSettings,
};
use crate::stage::{StageMain, on_autodiff, starting_model, train_in_full};
use crate::train::{Evaluation, MicroLoss, RowStage, Rows, export_policy, load_trainable, save_trainable, train};

pub use align_data::PreferencePair as Pair;

/// `2b` right-padded rows: the chosen completions, then the rejected ones.
pub fn pair_batch(pairs: &[&Pair], pad_id: u32) -> HostBatch {
    let rows: Vec<&TokenizedSequence> =
        pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
    pad_right(&rows, pad_id)
}

/// What one forward over a pair batch gives the objectives.
pub struct PairForward<B: Backend> {
    /// Completion log-probs per row `[2b]`, summed (or averaged when asked).
    pub logps: Tensor<B, 1>,
    /// Completion tokens per row.
    pub tokens: Vec<f64>,
    /// Per-token log-probs `[2b, t-1]` and the mask of every real next token (prompt
    /// included), for a prompt+completion NLL.
    pub token_logps: Tensor<B, 2>,
    pub attended: Tensor<B, 2>,
    pub completion: Tensor<B, 2>,
}

fn float2<B: Backend>(v: Vec<bool>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    let data: Vec<f32> = v.into_iter().map(|m| if m { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Completion log-probs of every row of a pair batch under `model`. The LM head runs on the
/// completion positions only, or on every real position when `with_prompt` (a
/// prompt+completion NLL reads them); `token_logps` is 0 where it did not run.
pub fn pair_forward<B: FusedOps>(
    model: &Transformer<B>,
    batch: &HostBatch,
    averaged: bool,
    with_prompt: bool,
    device: &B::Device,
) -> PairForward<B> {
    let [b, t] = batch.shape;
    // Chosen and rejected rows of uneven length are packed when that saves rows; the loss
    // positions below are the padded grid's, mapped to the packed rows.
    let layout = batch.forward_layout(model.config.pad_token_id.unwrap_or(0));
    let hidden = model.forward_hidden(&layout.batch.to_device::<B>(device), None);
    let (targets, mask) = batch.shifted_targets();
    let tokens: Vec<f64> = mask.chunks(t - 1).map(|r| r.iter().filter(|&&m| m).count() as f64).collect();
    let attended: Vec<bool> = (0..b)
        .flat_map(|r| (1..t).map(move |j| (r, j)))
        .map(|(r, j)| batch.segments[r * t + j] != 0 && batch.segments[r * t + j] == batch.segments[r * t + j - 1])
        .collect();
    let at = batch.loss_positions(&targets, if with_prompt { &attended } else { &mask });
    let lp = model.logprobs_at(hidden, &layout.rows(&at.rows), &at.targets, 1.0, false).logprobs;
    let token_logps = spread_rows(lp, &at.cells, [b, t - 1]);
    let completion = float2::<B>(mask, [b, t - 1], device);
    PairForward {
        logps: sequence_logprobs(token_logps.clone(), completion.clone(), averaged),
        tokens,
        token_logps,
        attended: float2::<B>(attended, [b, t - 1], device),
        completion,
    }
}

pub use align_reward::model::{last_token_scores, score_positions};

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64 data")
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

/// Where DPO's reference log-probs come from.
pub enum Reference<B: AutodiffFusedOps> {
    /// Computed once before training: `(chosen, rejected)` per train pair, then per eval pair.
    Precomputed { train: Vec<(f64, f64)>, eval: Vec<(f64, f64)> },
    /// The policy with its LoRA adapters disabled (no second copy of the weights).
    AdaptersDisabled,
    /// A frozen copy of the starting policy.
    Frozen(Box<Transformer<B::InnerBackend>>),
    /// Not needed (reward model, ORPO, SimPO).
    None,
}

/// A pairwise stage as a [`Stage`]: a round is `gradient_accumulation_steps` micro-batches
/// of pairs; a pair is the loss unit.
pub struct PreferenceStage<B: AutodiffFusedOps> {
    pub objective: Objective,
    pub train: Vec<Pair>,
    pub eval: Vec<Pair>,
    pub reference: Reference<B>,
    pub pad_id: u32,
    pub batch_size: usize,
    pub accumulation: usize,
    pub config: ModelConfig,
    pub lora: Option<LoraConfig>,
    pub tokenizer: Tokenizer,
    pub base: PathBuf,
    pub device: B::Device,
    pub curriculum: Option<CurriculumConfig>,
}

/// One micro-batch's loss terms on any backend (training: autodiff; eval: inner).
struct Terms<B: Backend> {
    /// Σ per-pair loss
    sum: Tensor<B, 1>,
    metrics: Vec<(&'static str, f64)>,
}

fn metric_sums(m: PreferenceMetrics, n: usize) -> Vec<(&'static str, f64)> {
    let n = n as f64;
    vec![
        ("rewards/chosen", m.chosen * n),
        ("rewards/rejected", m.rejected * n),
        ("rewards/accuracies", m.accuracy * n),
        ("rewards/margins", m.margin * n),
    ]
}

impl<B: AutodiffFusedOps> PreferenceStage<B> {
    /// Reference log-probs `(chosen, rejected)` of pairs `idx` (of the train or eval set).
    fn reference_logps(
        &self,
        policy: Option<&Transformer<B::InnerBackend>>,
        pairs: &[&Pair],
        idx: &[usize],
        eval: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let run = |m: &Transformer<B::InnerBackend>| {
            let f = pair_forward(m, &pair_batch(pairs, self.pad_id), false, false, &self.device);
            let v = host(f.logps);
            let b = pairs.len();
            (v[..b].to_vec(), v[b..].to_vec())
        };
        match &self.reference {
            Reference::Precomputed { train, eval: ev } => {
                let src = if eval { ev } else { train };
                idx.iter().map(|&i| src[i]).unzip()
            }
            Reference::AdaptersDisabled => {
                let mut m = policy.expect("the policy for an adapters-disabled reference").clone();
                m.set_adapters_enabled(false);
                run(&m)
            }
            Reference::Frozen(m) => run(m),
            Reference::None => (vec![], vec![]),
        }
    }

    /// The objective on pairs `idx` under `model` (any backend), given the inner policy for
    /// a reference forward.
    fn terms<M: FusedOps>(
        &self,
        model: &Transformer<M>,
        inner: Option<&Transformer<B::InnerBackend>>,
        pairs: &[&Pair],
        idx: &[usize],
        eval: bool,
        device: &M::Device,
    ) -> Terms<M> {
        let n = pairs.len();
        let batch = pair_batch(pairs, self.pad_id);
        let t1 = |v: &[f64]| {
            Tensor::<M, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]).convert::<M::FloatElem>(), device)
        };
        match &self.objective {
            Objective::Reward(s) => {
                let scores = last_token_scores(model, &batch, device);
                let (c, r) = (scores.clone().narrow(0, 0, n), scores.narrow(0, n, n));
                let margin = if s.use_margin && pairs.iter().any(|p| p.margin.is_some()) {
                    Some(t1(&pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect::<Vec<_>>()))
                } else {
                    None
                };
                let m = PreferenceMetrics::from_rewards(&host(c.clone().detach()), &host(r.clone().detach()));
                let losses = bradley_terry_loss(c, r, margin, s.center_rewards_coefficient);
                Terms { sum: losses.sum(), metrics: metric_sums(m, n) }
            }
            Objective::Dpo(s) => {
                let f = pair_forward(model, &batch, false, false, device);
                let (rc, rr) = self.reference_logps(inner, pairs, idx, eval);
                let (pc, pr) = (f.logps.clone().narrow(0, 0, n), f.logps.narrow(0, n, n));
                let (lc, lr) = (host(pc.clone().detach()), host(pr.clone().detach()));
                let d = dpo_loss(
                    pc,
                    pr,
                    t1(&rc),
                    t1(&rr),
                    t1(&f.tokens[..n]),
                    t1(&f.tokens[n..]),
                    s.loss_type,
                    s.beta,
                    s.label_smoothing,
                );
                let m = PreferenceMetrics::from_rewards(&host(d.chosen_rewards), &host(d.rejected_rewards));
                let mut metrics = metric_sums(m, n);
                metrics.push(("logps/chosen", lc.iter().sum()));
                metrics.push(("logps/rejected", lr.iter().sum()));
                let mut sum = d.losses.sum();
                if s.sft_weight > 0.0 {
                    // TRL's "sft" loss type: one mean over the batch's chosen completion tokens.
                    let nll = sft_loss(f.token_logps.narrow(0, 0, n), f.completion.narrow(0, 0, n));
                    metrics.push(("nll_loss", scalar(nll.clone().detach()) * n as f64));
                    sum = sum + nll * (s.sft_weight * n as f64);
                }
                Terms { sum, metrics }
            }
            Objective::Orpo(s) => {
                let f = pair_forward(model, &batch, true, !s.completion_only_nll, device);
                let (c, r) = (f.logps.clone().narrow(0, 0, n), f.logps.narrow(0, n, n));
                let nll_mask = if s.completion_only_nll { f.completion } else { f.attended };
                let nll = sft_loss(f.token_logps.narrow(0, 0, n), nll_mask.narrow(0, 0, n));
                let o = orpo_odds_ratio(c, r, s.beta);
                let m =
                    PreferenceMetrics::from_rewards(&host(o.chosen_rewards.clone()), &host(o.rejected_rewards.clone()));
                let mut metrics = metric_sums(m, n);
                metrics.push(("nll_loss", scalar(nll.clone().detach()) * n as f64));
                metrics.push(("log_odds_ratio", host(o.log_odds.clone().detach()).iter().sum()));
                // Σ over pairs of (nll − λ·logσ) = n · (nll − mean(λ·logσ)), TRL's per-batch loss.
                Terms { sum: orpo_loss(nll, &o) * n as f64, metrics }
            }
            Objective::Simpo(s) => {
                let f = pair_forward(model, &batch, true, s.sft_weight > 0.0, device);
                let (c, r) = (f.logps.clone().narrow(0, 0, n), f.logps.narrow(0, n, n));
                let (hc, hr) = (host(c.clone().detach()), host(r.clone().detach()));
                let m = PreferenceMetrics::from_rewards(
                    &hc.iter().map(|x| x * s.beta).collect::<Vec<_>>(),
                    &hr.iter().map(|x| x * s.beta).collect::<Vec<_>>(),
                );
                let mut sum = simpo_loss(c, r, s.beta, s.gamma, s.label_smoothing).sum();
                if s.sft_weight > 0.0 {
                    let nll = sft_loss(f.token_logps.narrow(0, 0, n), f.attended.narrow(0, 0, n));
                    sum = sum + nll * (s.sft_weight * n as f64);
                }
                Terms { sum, metrics: metric_sums(m, n) }
            }
        }
    }
}

impl<B: AutodiffFusedOps> RowStage<B> for PreferenceStage<B> {
    type Model = Transformer<B>;

    fn rows(&self) -> (usize, usize, usize) {
        (self.train.len(), self.batch_size, self.accumulation)
    }

    /// A pair's length: its chosen and rejected tokens (the loss measure is SFT's alone,
    /// refused with the config).
    fn curriculum(&self, _model: &Transformer<B>) -> Result<Option<(CurriculumConfig, Vec<f64>)>> {
        Ok(self.curriculum.clone().map(|c| {
            let lengths = self.train.iter().map(|p| (p.chosen.len() + p.rejected.len()) as f64).collect();
            (c, lengths)
        }))
    }

    fn row_loss(
        &self,
        model: &Transformer<B>,
        micro: &[usize],
        step_units: usize,
        _micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let pairs: Vec<&Pair> = micro.iter().map(|&i| &self.train[i]).collect();
        let inner = matches!(self.reference, Reference::AdaptersDisabled).then(|| model.valid());
        let t = self.terms::<B>(model, inner.as_ref(), &pairs, micro, false, &self.device);
        Ok(MicroLoss {
            loss: t.sum / step_units as f64,
            metrics: t.metrics,
            metrics_with_units: vec![],
            units: pairs.len() as f64,
            fed_tokens: pairs.iter().map(|p| p.chosen.len() + p.rejected.len()).sum(),
        })
    }

    fn evaluate_rows(&mut self, model: &Transformer<B>) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let m = model.valid();
        let (mut loss, mut sums) = (0.0, std::collections::BTreeMap::<String, f64>::new());
        let idx: Vec<usize> = (0..self.eval.len()).collect();
        let bar = align_eval::progress(idx.len(), "eval (pairs)");
        for chunk in idx.chunks(self.batch_size.max(1)) {
            bar.inc(chunk.len() as u64);
            let pairs: Vec<&Pair> = chunk.iter().map(|&i| &self.eval[i]).collect();
            let t = self.terms::<B::InnerBackend>(&m, Some(&m), &pairs, chunk, true, &self.device);
            loss += scalar(t.sum);
            for (k, v) in t.metrics {
                *sums.entry(k.to_string()).or_default() += v;
            }
        }
        bar.finish_and_clear();
        let n = self.eval.len() as f64;
        Ok(Some(Evaluation { loss: Some(loss / n), metrics: sums.into_iter().map(|(k, v)| (k, v / n)).collect() }))
    }

    fn save(&self, model: &Transformer<B>, dir: &Path) -> Result<()> {
        save_trainable(model, self.lora.as_ref(), self.head(), dir)
    }

    fn load(&self, model: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
        load_trainable(model, self.lora.as_ref(), &self.config, self.heads(), dir, &self.device)
    }

    fn export_final(&self, model: &Transformer<B>, final_dir: &Path) -> Result<()> {
        match (&self.lora, &self.objective) {
            // A reward model ships merged: one HF sequence-classification checkpoint.
            (Some(_), Objective::Reward(_)) => {
                let merged = align_lora::merge_and_unload(model.valid());
                save_pretrained(&merged, Some(&self.tokenizer), HfHead::SequenceClassification, final_dir)?;
                Ok(())
            }
            (lora, _) => export_policy(model, lora.as_ref(), &self.base, &self.tokenizer, self.head(), final_dir),
        }
    }
}

impl<B: AutodiffFusedOps> PreferenceStage<B> {
    fn head(&self) -> HfHead {
        if matches!(self.objective, Objective::Reward(_)) { HfHead::SequenceClassification } else { HfHead::CausalLm }
    }
    fn heads(&self) -> Heads {
        if matches!(self.objective, Objective::Reward(_)) {
            Heads { lm: false, score: true, value: false }
        } else {
            Heads::LM
        }
    }
}

/// Run (or resume) a pairwise stage on backend `B`; returns `final/`.
pub fn run_preference<B: FusedOps>(
    cfg: &PreferenceConfig,
    stage: PairwiseStage,
    resume: bool,
    device: &B::Device,
) -> Result<PathBuf> {
    on_autodiff::<B, _>(cfg, Preference { cfg, stage, resume }, device)
}

#[derive(Clone)]
struct Preference<'a> {
    cfg: &'a PreferenceConfig,
    stage: PairwiseStage,
    resume: bool,
}

impl StageMain for Preference<'_> {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf> {
        let cfg = self.cfg;
        let objective = cfg.objective(self.stage)?;
        if let Objective::Dpo(s) = &objective {
            if s.loss_type == DpoLossType::Sigmoid && s.label_smoothing > 0.0 {
                tracing::warn!(
                    "label_smoothing is ignored by loss_type = \"sigmoid\" (as in TRL >= 0.29); use \"cdpo\""
                );
            }
            if s.loss_type == DpoLossType::Robust && !(0.0..0.5).contains(&s.label_smoothing) {
                bail!("robust DPO needs 0 <= label_smoothing < 0.5, got {}", s.label_smoothing);
            }
            if !(s.sft_weight.is_finite() && s.sft_weight >= 0.0) {
                bail!("[dpo] sft_weight: must be a number >= 0, found {}", s.sft_weight);
            }
        }
        let reward = matches!(objective, Objective::Reward(_));
        let heads = if reward { Heads { lm: false, score: true, value: false } } else { Heads::LM };
        let start = starting_model::<A>(cfg, heads, device)?;
        let (tok, tokenize) = (start.tokenizer, start.tokenize);
        let train_pairs = preference_pairs(&tok, &cfg.data, &tokenize, "train")?;
        let eval_pairs = match &cfg.eval_data {
            Some(d) => preference_pairs(&tok, d, &tokenize, "eval")?,
            None => vec![],
        };
        let mut model = start.model;
        if reward
            && cfg.lora.is_some()
            && let Some(s) = model.score.as_mut()
        {
            train_in_full(s);
        }
        let mut stage = PreferenceStage::<A> {
            objective: objective.clone(),
            train: train_pairs,
            eval: eval_pairs,
            reference: Reference::None,
            pad_id: start.pad_id,
            batch_size: cfg.training.per_device_train_batch_size,
            accumulation: cfg.training.gradient_accumulation_steps,
            config: model.config.clone(),
            lora: cfg.lora.clone(),
            tokenizer: tok,
            base: cfg.model.path.clone(),
            device: device.clone(),
            curriculum: cfg.curriculum.clone(),
        };
        if let Objective::Dpo(s) = &objective {
            stage.reference = if s.precompute_ref_log_probs {
                let (train, eval) = precompute_reference(&stage, &model.valid())?;
                Reference::Precomputed { train, eval }
            } else if cfg.lora.is_some() {
                Reference::AdaptersDisabled
            } else {
                Reference::Frozen(Box::new(model.valid()))
            };
        }
        train(&mut Rows(stage), model, &cfg.training, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}

type RefLogps = Vec<(f64, f64)>;

/// Reference log-probs of every train and eval pair under the starting policy (adapters
/// disabled), computed once with a progress bar.
fn precompute_reference<B: AutodiffFusedOps>(
    task: &PreferenceStage<B>,
    policy: &Transformer<B::InnerBackend>,
) -> Result<(RefLogps, RefLogps)> {
    let mut m = policy.clone();
    m.set_adapters_enabled(false);
    let total = task.train.len() + task.eval.len();
    let bar = align_eval::progress(total, "ref log-probs");
    let run = |set: &[Pair]| -> RefLogps {
        let mut out = Vec::with_capacity(set.len());
        for chunk in set.chunks(task.batch_size.max(1)) {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let f = pair_forward(&m, &pair_batch(&pairs, task.pad_id), false, false, &task.device);
            let v = host(f.logps);
            let b = pairs.len();
            out.extend((0..b).map(|i| (v[i], v[b + i])));
            bar.inc(b as u64);
        }
        out
    };
    let train = run(&task.train);
    let eval = run(&task.eval);
    bar.finish_and_clear();
    tracing::info!(pairs = total, "reference log-probs precomputed; no reference model is held");
    Ok((train, eval))
}

/// One reward-model score per row of a dataset: `{"row", "score"}` for sequences
/// (prompt/completion, conversations, text), `{"row", "chosen", "rejected"}` for pairs;
/// `with_ids` adds the token ids each score was computed on.
pub fn score_dataset<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    data: &DatasetConfig,
    tokenize: &TokenizeConfig,
    batch_size: usize,
    with_ids: bool,
    device: &B::Device,
) -> Result<Vec<serde_json::Value>> {
    if model.score.is_none() {
        bail!("the model has no score head: pass a reward model (a sequence-classification checkpoint)");
    }
    let (examples, _) = align_data::load_examples(data)?;
    let mut t = ExampleTokenizer::new(tok, tokenize.clone());
    let tokenized = t.tokenize_all(&examples, std::thread::available_parallelism().map_or(1, |n| n.get()))?;
    let pad = tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0);
    // (row, which) for every sequence to score; which: None, Some(true) chosen, Some(false) rejected.
    let mut seqs: Vec<(usize, Option<bool>, TokenizedSequence)> = vec![];
    for (i, x) in tokenized.into_iter().enumerate() {
        match x {
            Tokenized::Sequence(s) => seqs.push((i, None, s)),
            Tokenized::Pair { prompt_ids, chosen_ids, rejected_ids, .. } => {
                seqs.push((i, Some(true), TokenizedSequence::completion(&prompt_ids, &chosen_ids)));
                seqs.push((i, Some(false), TokenizedSequence::completion(&prompt_ids, &rejected_ids)));
            }
            Tokenized::Labelled { prompted, .. } => {
                seqs.push((i, None, TokenizedSequence::completion(&prompted.prompt_ids, &prompted.completion_ids)))
            }
            Tokenized::Prompt { .. } => bail!("{}: row {i} has no completion to score", data.path.display()),
        }
    }
    let context = model.config.max_position_embeddings;
    if let Some((i, _, s)) = seqs.iter().find(|(_, _, s)| s.len() > context) {
        bail!(
            "{}: row {} is {} tokens, longer than the reward model's context of {context} positions (set [tokenize] max_length to truncate)",
            data.path.display(),
            i + 1,
            s.len()
        );
    }
    let rows: Vec<&TokenizedSequence> = seqs.iter().map(|(_, _, s)| s).collect();
    let scores = align_reward::score_sequences(model, &rows, pad, batch_size, device);
    let mut out: Vec<serde_json::Value> = vec![];
    for ((i, which, seq), s) in seqs.iter().zip(scores) {
        let (key, ids_key) = match which {
            None => ("score", "input_ids"),
            Some(true) => ("chosen", "chosen_ids"),
            Some(false) => ("rejected", "rejected_ids"),
        };
        if *which != Some(false) {
            out.push(serde_json::json!({"row": i}));
        }
        let last = out.last_mut().expect("a row was pushed");
        last[key] = serde_json::json!(s);
        if with_ids {
            last[ids_key] = serde_json::json!(seq.input_ids);
        }
    }
    Ok(out)
}
