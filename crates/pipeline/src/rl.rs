//! What the online RL stages (GRPO, PPO) share: prompts from a dataset, a generation batch
//! sampled from the policy, the forward pass over prompt + completion that recomputes the
//! completion's log-probs, and resuming an online loop.
//!
//! A generation batch is laid out as TRL lays it out: prompts left-padded, completions
//! right-padded after them, so every completion starts at the same column and the loss
//! works on `[batch, completion_width]` tensors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use align_data::{GenerationPrompt, generation_prompts_conditioned};
use align_data::{LossPositions, TokenizedSequence, pad_right};
use align_model::burn::module::AutodiffModule;
use align_model::burn::module::Module;
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{Int, Tensor, TensorData};
use align_model::{
    AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, TokenBatch, Tokenizer, Transformer, spread_rows,
};
use align_reward::Reward;
use align_reward::{RewardTerm, build_terms};
use anyhow::{Context, Result};
use serde_json::json;

use align_eval::evaluate_prompts;
use align_reward::{Scored, score_rollouts};
use align_rollout::{Generation, Rollouts, rollout};

use crate::config::StageConfig;
use crate::train::{Evaluation, MicroLoss, Round, Shape, Split, Stage, export_policy, load_trainable, save_trainable};

/// `[b, width]` float tensor from host rows (zero-padded).
pub fn rows_tensor<B: Backend>(rows: &[Vec<f64>], width: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut v = vec![0.0f64; rows.len() * width];
    for (i, r) in rows.iter().enumerate() {
        v[i * width..i * width + r.len().min(width)].copy_from_slice(&r[..r.len().min(width)]);
    }
    Tensor::from_data(TensorData::new(v, [rows.len(), width]).convert::<B::FloatElem>(), device)
}

/// Host copy of a `[b, t]` tensor.
pub fn host_rows<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<f64>> {
    let [_, w] = t.dims();
    let v: Vec<f64> = t.into_data().convert::<f64>().to_vec().expect("float data");
    v.chunks(w.max(1)).map(<[f64]>::to_vec).collect()
}

/// The completion mask `[b][width]`: 1 on each completion's tokens, 0 on padding and on
/// the rows `exclude` marks (masked truncated completions).
pub fn completion_mask(completions: &[&[u32]], width: usize, exclude: &[bool]) -> Vec<Vec<f64>> {
    completions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let on = if exclude.get(i).copied().unwrap_or(false) { 0.0 } else { 1.0 };
            (0..width).map(|j| if j < c.len() { on } else { 0.0 }).collect()
        })
        .collect()
}

/// Prompt + completion sequences laid out for one forward pass: right-padded, or packed
/// (segment ids) when that takes fewer rows, as completions of uneven length usually do.
/// Everything a loss reads is indexed by `[b, completion_width]` cells, whatever the layout.
pub struct CompletionBatch<B: Backend> {
    pub tokens: TokenBatch<B>,
    pub completion_width: usize,
    /// The completion ids `[b, completion_width]` (padding: `pad_id`).
    pub targets: Tensor<B, 2, Int>,
    /// Where the LM head runs: each completion token's cell in `[b, completion_width]`, the
    /// hidden-state row of `tokens` that predicts it, and the token.
    pub predicted: LossPositions,
    /// For each cell of `[b, completion_width]`, the flattened hidden-state row of `tokens`
    /// holding the state before that completion token: the state a value head reads (past a
    /// completion's end, its last token's state, which no loss reads unmasked).
    pub states: Vec<usize>,
}

impl<B: Backend> CompletionBatch<B> {
    /// The states before each completion token, `[b, completion_width, d]`, from the hidden
    /// states of `tokens`.
    pub fn completion_states(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [rows, t, d] = hidden.dims();
        let [b, w] = self.targets.dims();
        let device = hidden.device();
        let at: Vec<i64> = self.states.iter().map(|&i| i as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(at, [b * w]), &device);
        hidden.reshape([rows * t, d]).select(0, idx).reshape([b, w, d])
    }
}

pub fn completion_batch<B: Backend>(
    prompts: &[&[u32]],
    completions: &[&[u32]],
    pad_id: u32,
    device: &B::Device,
) -> CompletionBatch<B> {
    let b = prompts.len();
    let cw = completions.iter().map(|c| c.len()).max().unwrap_or(0).max(1);
    let seqs: Vec<TokenizedSequence> = prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| TokenizedSequence {
            input_ids: p.iter().chain(c.iter()).copied().collect(),
            loss_mask: std::iter::repeat_n(false, p.len()).chain(std::iter::repeat_n(true, c.len())).collect(),
        })
        .collect();
    let padded = pad_right(&seqs.iter().collect::<Vec<_>>(), pad_id);
    let width = padded.shape[1];
    let layout = padded.forward_layout(pad_id);
    let mut targets = vec![pad_id as i64; b * cw];
    let mut predicted = LossPositions::default();
    let mut states = Vec::with_capacity(b * cw);
    for (r, (p, c)) in prompts.iter().zip(completions).enumerate() {
        // Position t predicts token t + 1: completion token k is predicted at p + k − 1.
        let at = |j: usize| layout.cell[r * width + j];
        let last = (p.len() + c.len()).max(1) - 1;
        for (k, &tok) in c.iter().enumerate() {
            targets[r * cw + k] = tok as i64;
            predicted.cells.push(r * cw + k);
            predicted.rows.push(at((p.len() + k).max(1) - 1));
            predicted.targets.push(tok as i64);
        }
        states.extend((0..cw).map(|k| at(((p.len() + k).max(1) - 1).min(last))));
    }
    CompletionBatch {
        tokens: layout.batch.to_device(device),
        completion_width: cw,
        targets: Tensor::from_data(TensorData::new(targets, [b, cw]), device),
        predicted,
        states,
    }
}

/// The model's view of each completion: per-token log-probs at `temperature`
/// `[b, completion_width]`, the hidden states that predict them (for a value head), and
/// optionally the entropy of each of those next-token distributions.
pub struct CompletionForward<B: Backend> {
    pub logps: Tensor<B, 2>,
    pub hidden: Tensor<B, 3>,
    pub entropy: Option<Tensor<B, 2>>,
}

pub fn completion_forward<B: FusedOps>(
    model: &Transformer<B>,
    batch: &CompletionBatch<B>,
    temperature: f32,
    with_entropy: bool,
) -> CompletionForward<B> {
    let full = model.forward_hidden(&batch.tokens, None);
    let shape = batch.targets.dims();
    // The head runs on completion tokens only (not on prompts or padding).
    let p = &batch.predicted;
    let head = model.logprobs_at(full.clone(), &p.rows, &p.targets, temperature, with_entropy);
    CompletionForward {
        logps: spread_rows(head.logprobs, &p.cells, shape),
        hidden: batch.completion_states(full),
        entropy: head.entropy.map(|e| spread_rows(e, &p.cells, shape)),
    }
}

/// Prompts per generation batch of a group-sampling stage (GRPO, RLOO): a batch holds
/// `per_device_train_batch_size × gradient_accumulation_steps` completions, `group` per
/// prompt.
pub fn prompts_per_generation(args: &crate::config::TrainingArguments, group: usize) -> Result<usize> {
    let completions = args.per_device_train_batch_size * args.gradient_accumulation_steps;
    if completions == 0 || group == 0 {
        anyhow::bail!(
            "per_device_train_batch_size, gradient_accumulation_steps and num_generations must be at least 1"
        );
    }
    if !completions.is_multiple_of(group) {
        anyhow::bail!(
            "per_device_train_batch_size × gradient_accumulation_steps = {completions} completions per generation \
             batch is not a multiple of num_generations = {group}"
        );
    }
    Ok(completions / group)
}

/// A generation batch sampled and scored: `group` completions of each prompt, each
/// function's rewards, and the metrics TRL logs for them.
pub struct ScoredGeneration {
    /// Each completion's prompt ids.
    pub prompts: Vec<Vec<u32>>,
    pub rollouts: Rollouts,
    pub scored: Scored,
    /// The whole batch's rewards and lengths (every replica's, in a data-parallel run).
    pub view: BatchView,
    /// Per function `rewards/<name>/{mean,std}`, components, lengths and sampling speed, over
    /// the whole batch.
    pub metrics: BTreeMap<String, f64>,
}

/// Sample `group` completions of each prompt from `policy` and score them. `first_row` is
/// the index of this call's first completion in the whole generation batch (a data-parallel
/// replica's share starts past the others'), which keys each completion's sampling stream.
#[allow(clippy::too_many_arguments)]
pub fn sample_and_score<B: FusedOps>(
    policy: &Transformer<B>,
    tok: &Tokenizer,
    prompts: &[&GenerationPrompt],
    group: usize,
    sampling: &Generation,
    seed: u64,
    first_row: u64,
    rewards: &[(Box<dyn Reward>, f64)],
) -> Result<ScoredGeneration> {
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let r = rollout(policy, tok, &ids, group, sampling, seed, first_row)?;
    let scored = score_rollouts(rewards, prompts, &r)?;
    let device = policy.devices().first().cloned().context("the policy has no device")?;
    let view = BatchView::gather::<B>(&r, &scored, rewards.len(), &device)?;
    let metrics = view.metrics(rewards);
    let prompt_ids = r.prompt.iter().map(|&p| prompts[p].ids.clone()).collect();
    Ok(ScoredGeneration { prompts: prompt_ids, rollouts: r, scored, view, metrics })
}

/// What the statistics of a generation batch read, for the whole batch: on one device this
/// replica's completions; in a data-parallel run every replica's, in rank order (the batch
/// one device would have sampled), so batch-level statistics (`scale_rewards = "batch"`,
/// whitening, DAPO's token count, the logged metrics) equal one device's.
pub struct BatchView {
    /// This replica's first completion in the batch.
    pub offset: usize,
    /// `[completion][function]`
    pub per_func: Vec<Vec<Option<f64>>>,
    pub components: BTreeMap<String, Vec<f64>>,
    pub lengths: Vec<usize>,
    pub truncated: Vec<bool>,
    /// Sampling time (the slowest replica's).
    pub seconds: f64,
}

impl BatchView {
    fn gather<B: Backend>(r: &Rollouts, s: &Scored, functions: usize, device: &B::Device) -> Result<Self> {
        let replica = crate::distributed::Replica::current();
        let local = BatchView {
            offset: 0,
            per_func: s.per_func.clone(),
            components: s.components.clone(),
            lengths: r.completions.iter().map(Vec::len).collect(),
            truncated: r.truncated.clone(),
            seconds: r.seconds,
        };
        if replica.world == 1 {
            return Ok(local);
        }
        // [seconds, n, then per completion: length, truncated, per function (present, value),
        // then each component's n values in name order]
        let n = local.lengths.len();
        let mut v = vec![local.seconds, n as f64];
        for i in 0..n {
            v.extend([local.lengths[i] as f64, local.truncated[i] as u8 as f64]);
            for f in &local.per_func[i] {
                v.extend([f.is_some() as u8 as f64, f.unwrap_or(0.0)]);
            }
        }
        for values in local.components.values() {
            v.extend(values);
        }
        let all = replica.gather::<B>(device, &v, "gathering the rewards")?;
        let names: Vec<String> = local.components.keys().cloned().collect();
        let mut view = BatchView {
            offset: 0,
            per_func: vec![],
            components: names.iter().map(|k| (k.clone(), vec![])).collect(),
            lengths: vec![],
            truncated: vec![],
            seconds: 0.0,
        };
        for (rank, v) in all.iter().enumerate() {
            let k = v.get(1).copied().unwrap_or(0.0) as usize;
            let per_completion = 2 + 2 * functions;
            if v.len() != 2 + k * per_completion + k * names.len() {
                anyhow::bail!(
                    "rank {rank} scored its completions with other reward functions than rank {}",
                    replica.rank
                );
            }
            if rank == replica.rank {
                view.offset = view.lengths.len();
            }
            view.seconds = view.seconds.max(v[0]);
            for i in 0..k {
                let row = &v[2 + i * per_completion..2 + (i + 1) * per_completion];
                view.lengths.push(row[0] as usize);
                view.truncated.push(row[1] != 0.0);
                view.per_func.push(row[2..].chunks(2).map(|p| (p[0] != 0.0).then_some(p[1])).collect());
            }
            let mut at = 2 + k * per_completion;
            for name in &names {
                if let Some(c) = view.components.get_mut(name) {
                    c.extend(&v[at..at + k]);
                }
                at += k;
            }
        }
        Ok(view)
    }

    /// Completions in the whole batch.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// This replica's part of per-completion values computed over the whole batch.
    pub fn own<'a, T>(&self, all: &'a [T], local: usize) -> &'a [T] {
        &all[self.offset..self.offset + local]
    }

    /// The batch's metrics as TRL logs them: lengths, sampling speed, each function's
    /// reward mean and std, components.
    pub fn metrics(&self, rewards: &[(Box<dyn Reward>, f64)]) -> BTreeMap<String, f64> {
        let mut m = align_rollout::length_metrics(&self.lengths, &self.truncated, self.seconds);
        for (k, (f, _)) in rewards.iter().enumerate() {
            let v: Vec<f64> = self.per_func.iter().filter_map(|x| x[k]).collect();
            let (mean, std) = mean_std(&v);
            m.insert(format!("rewards/{}/mean", f.name()), mean);
            m.insert(format!("rewards/{}/std", f.name()), std);
        }
        for (c, v) in &self.components {
            m.insert(format!("rewards/{c}"), mean_std(v).0);
        }
        m
    }
}

impl ScoredGeneration {
    /// The `completions.jsonl` rows of the batch: prompt, completion, each function's reward
    /// and component, and the stage's `reward` and `advantage` of each completion.
    pub fn log_rows(
        &self,
        step: usize,
        prompts: &[&GenerationPrompt],
        rewards: &[(Box<dyn Reward>, f64)],
        total: &[Option<f64>],
        advantages: &[f64],
    ) -> Vec<serde_json::Value> {
        let r = &self.rollouts;
        (0..r.len())
            .map(|i| {
                let mut row = json!({
                    "step": step,
                    "prompt": prompts[r.prompt[i]].text,
                    "completion": r.texts[i],
                    "reward": total[i],
                    "advantage": advantages[i],
                    "tokens": r.completions[i].len(),
                    "truncated": r.truncated[i],
                });
                for (k, (func, _)) in rewards.iter().enumerate() {
                    row[func.name()] = json!(self.scored.per_func[i][k]);
                }
                for (c, v) in &self.scored.components {
                    row[c] = json!(v[i]);
                }
                row
            })
            .collect()
    }

    /// Per-token log-probs of every completion under `reference` (no gradient), at the
    /// sampling temperature, `batch_size` sequences per forward.
    pub fn reference_logps<B: FusedOps>(
        &self,
        reference: &Transformer<B>,
        pad: u32,
        temperature: f32,
        batch_size: usize,
        device: &B::Device,
    ) -> Vec<Vec<f64>> {
        let mut out = Vec::with_capacity(self.rollouts.len());
        let bs = batch_size.max(1);
        for (ps, cs) in self.prompts.chunks(bs).zip(self.rollouts.completions.chunks(bs)) {
            let ps: Vec<&[u32]> = ps.iter().map(Vec::as_slice).collect();
            let cs: Vec<&[u32]> = cs.iter().map(Vec::as_slice).collect();
            let batch = completion_batch::<B>(&ps, &cs, pad, device);
            out.extend(host_rows(completion_forward(reference, &batch, temperature, false).logps));
        }
        out
    }
}

/// What every online stage (GRPO, RLOO, PPO) holds besides its model: the tokenizer, the
/// reward functions, the train and held-out prompts, and `completions.jsonl`.
pub struct OnlineData {
    pub cfg: StageConfig,
    pub tok: Tokenizer,
    /// The id padding rows.
    pub pad: u32,
    pub rewards: Vec<(Box<dyn Reward>, f64)>,
    pub train: Vec<GenerationPrompt>,
    pub eval: Vec<GenerationPrompt>,
    log: Option<CompletionLog>,
}

impl OnlineData {
    /// The prompts of `cfg`'s `[data]` and `[eval_data]` (conditioned on a score under
    /// `[score_conditioning]`), and its reward functions; `stage` names it in errors.
    pub fn load<B: FusedOps>(
        stage: &str,
        cfg: &StageConfig,
        tok: Tokenizer,
        pad: u32,
        rewards: &[RewardTerm],
        device: &B::Device,
    ) -> Result<Self> {
        let condition = cfg.score_conditioning.as_ref().map(|c| c.online(stage)).transpose()?;
        let condition = condition.as_ref().map(|(c, t)| (c, *t));
        let train = generation_prompts_conditioned(&tok, &cfg.data, &cfg.tokenize, "train", condition)?;
        let eval = match &cfg.eval_data {
            Some(d) => generation_prompts_conditioned(&tok, d, &cfg.tokenize, "eval", condition)?,
            None => vec![],
        };
        // `{ kind = "fluency" }` without a path scores under this stage's reference model.
        let mut rewards = rewards.to_vec();
        align_reward::fill_reference_model(&mut rewards, &cfg.model.path);
        let rewards = build_terms::<B>(&rewards, device)?;
        Ok(OnlineData { cfg: cfg.clone(), tok, pad, rewards, train, eval, log: None })
    }

    /// The prompts of a round's draws.
    pub fn prompts(&self, draws: &[Vec<usize>]) -> Vec<&GenerationPrompt> {
        draws.iter().flatten().map(|&i| &self.train[i]).collect()
    }

    /// A round of `group` completions per prompt trained on for `iterations` steps.
    pub fn group_shape(&self, group: usize, iterations: usize) -> Shape {
        let t = &self.cfg.training;
        Shape {
            items: self.train.len(),
            draw_size: t.per_device_train_batch_size * t.gradient_accumulation_steps / group.max(1),
            draws_per_round: 1,
            steps_per_round: iterations,
            split: Split::Draws,
            updates_per_step: 1,
        }
    }

    /// Completions `0..n` in micro-batches of `per_device_train_batch_size`.
    pub fn micro_batches(&self, n: usize) -> Vec<Vec<usize>> {
        let all: Vec<usize> = (0..n).collect();
        all.chunks(self.cfg.training.per_device_train_batch_size.max(1)).map(<[usize]>::to_vec).collect()
    }

    /// Open `completions.jsonl` when `enabled` (cut back to `resumed_at` on resume).
    pub fn open_log(&mut self, enabled: bool, output_dir: &Path, resumed_at: Option<usize>) -> Result<()> {
        self.log = if enabled { Some(CompletionLog::open(output_dir, resumed_at)?) } else { None };
        Ok(())
    }

    /// Append rows to `completions.jsonl` (when open).
    pub fn log(&mut self, rows: &[serde_json::Value]) -> Result<()> {
        match self.log.as_mut() {
            Some(log) => log.write(rows),
            None => Ok(()),
        }
    }

    /// The held-out reward of `policy`, sampling with `sampling`; its samples go to
    /// `eval/step-{step}.jsonl`. None without held-out prompts.
    pub fn evaluate<B: FusedOps>(
        &self,
        policy: &Transformer<B>,
        sampling: &Generation,
        step: usize,
    ) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let t = &self.cfg.training;
        let samples = self.cfg.output_dir.join(format!("eval/step-{step}.jsonl"));
        let (bs, seed) = (t.per_device_train_batch_size, t.seed);
        let metrics = evaluate_prompts(policy, &self.tok, &self.rewards, &self.eval, sampling, bs, seed, &samples)?;
        Ok(Some(Evaluation { loss: None, metrics }))
    }
}

/// A stage sampling groups of completions per prompt on a plain policy (GRPO, RLOO): what
/// is its own. [`Groups`] is the rest of its [`Stage`], written once.
pub trait GroupStage<B: AutodiffFusedOps> {
    type Batch: GroupBatch;
    fn data(&self) -> &OnlineData;
    fn data_mut(&mut self) -> &mut OnlineData;
    /// Completions per prompt, steps per generation batch.
    fn group(&self) -> (usize, usize);
    fn log_completions(&self) -> bool;
    /// The held-out evaluation's sampling.
    fn eval_sampling(&self) -> Generation;
    fn model_config(&self) -> &ModelConfig;
    fn device(&self) -> &B::Device;
    /// Sample and score one generation batch from the round's prompts (and log its rows).
    fn sample(&mut self, model: &Transformer<B>, draws: &[Vec<usize>], round: Round) -> Result<Self::Batch>;
    /// The loss of completions `idx`, one of `micro_batches` micro-batches, on pass `pass`.
    fn group_loss(
        &self,
        model: &Transformer<B>,
        batch: &Self::Batch,
        pass: usize,
        idx: &[usize],
        micro_batches: usize,
    ) -> Result<MicroLoss<B>>;
}

/// What the loop reads of a generation batch.
pub trait GroupBatch {
    /// Completions in the batch.
    fn completions(&self) -> usize;
    /// The batch's metrics (rewards, lengths, speed), logged with every step trained on it.
    fn metrics(&self) -> &BTreeMap<String, f64>;
}

/// A [`GroupStage`] as the loop runs it: `train(&mut Groups(stage), …)`.
pub struct Groups<S>(pub S);

impl<B: AutodiffFusedOps, S: GroupStage<B>> Stage<B> for Groups<S> {
    type Model = Transformer<B>;
    type Batch = S::Batch;

    fn shape(&self) -> Shape {
        let (group, iterations) = self.0.group();
        self.0.data().group_shape(group, iterations)
    }

    fn next_batch(&mut self, model: &Transformer<B>, draws: Vec<Vec<usize>>, round: Round) -> Result<S::Batch> {
        self.0.sample(model, &draws, round)
    }

    fn micro_batches(&self, batch: &S::Batch, _pass: usize, _update: usize) -> Vec<Vec<usize>> {
        self.0.data().micro_batches(batch.completions())
    }

    fn loss(
        &self,
        model: &Transformer<B>,
        batch: &S::Batch,
        pass: usize,
        idx: &[usize],
        n: usize,
    ) -> Result<MicroLoss<B>> {
        self.0.group_loss(model, batch, pass, idx, n)
    }

    fn batch_metrics(&self, batch: &S::Batch) -> Vec<(String, f64)> {
        batch.metrics().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn open_logs(&mut self, output_dir: &Path, resumed_at: Option<usize>) -> Result<()> {
        let enabled = self.0.log_completions();
        self.0.data_mut().open_log(enabled, output_dir, resumed_at)
    }

    fn evaluate(&mut self, model: &Transformer<B>, step: usize) -> Result<Option<Evaluation>> {
        self.0.data().evaluate(&model.valid(), &self.0.eval_sampling(), step)
    }

    fn save_weights(&self, model: &Transformer<B>, dir: &Path) -> Result<()> {
        save_trainable(model, self.0.data().cfg.lora.as_ref(), HfHead::CausalLm, dir)
    }

    fn load_weights(&self, model: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
        let lora = self.0.data().cfg.lora.as_ref();
        load_trainable(model, lora, self.0.model_config(), Heads::LM, dir, self.0.device())
    }

    fn export(&self, model: &Transformer<B>, final_dir: &Path) -> Result<()> {
        let d = self.0.data();
        export_policy(model, d.cfg.lora.as_ref(), &d.cfg.model.path, &d.tok, HfHead::CausalLm, final_dir)
    }

    fn headline(&self) -> &'static [&'static str] {
        &["reward", "kl", "eval_reward"]
    }

    fn progress(&self, batch: &S::Batch) -> String {
        format!("reward {}", crate::logfmt::opt(batch.metrics().get("reward").copied()))
    }
}

/// `completions.jsonl`: every sampled completion with its rewards, fresh or, on resume, cut
/// back to the checkpoint's step.
pub struct CompletionLog {
    file: std::fs::File,
}

impl CompletionLog {
    pub fn open(output_dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let path = output_dir.join("completions.jsonl");
        match resumed_at {
            Some(at) => {
                crate::train::truncate_jsonl_after(&path, at)?;
            }
            None => std::fs::write(&path, "").with_context(|| path.display().to_string())?,
        }
        let file = std::fs::OpenOptions::new().append(true).open(&path).with_context(|| path.display().to_string())?;
        Ok(CompletionLog { file })
    }

    /// Append rows (flushed) in one write: a kill leaves whole rows, or at worst a torn
    /// last line that a resume drops.
    pub fn write(&mut self, rows: &[serde_json::Value]) -> Result<()> {
        let text: String = rows.iter().map(|row| format!("{row}\n")).collect();
        self.file.write_all(text.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// Mean and Bessel-corrected standard deviation (torch's `std`, as TRL logs it; 0 for
/// fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (m, var.sqrt())
}
