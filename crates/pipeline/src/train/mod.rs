//! The one training loop. Every stage (SFT, reward, DPO, ORPO, SimPO, KTO, GRPO, RLOO, PPO)
//! is a [`Stage`]: it says how to turn loader draws into a batch (dataset rows, or rollouts
//! with advantages), which micro-batches each optimizer update runs on, and a micro-batch's
//! loss. The loop owns everything else, once: the data order, per-update seeding, the
//! learning-rate schedule, gradient accumulation, clipping, the NaN stop, metric windows,
//! logs and progress, evaluation cadence, checkpoints, exact resume and the export of
//! `final/`.
//!
//! Counting, in the terms of the [`Shape`] a stage declares:
//! - a *round* draws `draws_per_round` batches of `draw_size` items from the loader and
//!   turns them into one stage batch;
//! - each round is trained for `steps_per_round` logged *steps* (GRPO's `num_iterations`);
//! - each step makes `updates_per_step` optimizer updates (PPO's epochs × minibatches),
//!   each accumulating the gradients of its micro-batches.
//!
//! The schedule runs over optimizer updates; logs, evaluation and checkpoints count steps.
//! Checkpoints fall between rounds, so nothing of a batch is ever saved.

pub mod checkpoint;
pub mod tensorboard;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use align_data::{Curriculum, Loader, LoaderState};
use align_model::burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::backend::AutodiffBackend;
use align_model::burn::tensor::{ElementConversion, FloatDType, Tensor, TensorData};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use checkpoint::{checkpoints, export_policy, load_trainable, save_trainable};

use crate::config::{CurriculumConfig, ReportTo, TrainingArguments};
use crate::distributed::Replica;
use crate::logfmt::{Sig, opt};
use crate::optim::{AdamW, grad_norm, learning_rate};

/// How a stage's work divides into rounds, steps and updates (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Items (examples or prompts) the loader draws from.
    pub items: usize,
    /// Items per loader draw.
    pub draw_size: usize,
    /// Draws that make one round's batch (SFT: gradient accumulation; online stages: one).
    pub draws_per_round: usize,
    /// Logged steps each round is trained for.
    pub steps_per_round: usize,
    /// Optimizer updates per step.
    pub updates_per_step: usize,
    /// How a data-parallel run divides a round among the replicas.
    pub split: Split,
}

/// How the replicas of a data-parallel run share a round: the global round draws
/// `draws_per_round × world` batches, as one device with that many would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every replica holds the whole round (dataset rows) and takes every `world`-th
    /// micro-batch of each update.
    MicroBatches,
    /// Each replica builds its batch from its own `draws_per_round` draws (the prompts it
    /// generates for) and trains on all of it.
    Draws,
    /// Each replica generates for its own draws, then the stage gathers the whole batch (so
    /// its statistics and minibatches are one device's), and each replica takes every
    /// `world`-th micro-batch of each update, as for rows.
    Generation,
}

/// Where the loop is when it asks for a batch.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Rounds drawn before this one (seeds its generation).
    pub index: usize,
    /// Steps done so far.
    pub step: usize,
    /// The run's seed.
    pub seed: u64,
    /// Items of the round before this replica's share of it (data-parallel runs split by
    /// draws; 0 otherwise): a generation keys its sampling by its place in the whole round.
    pub first_item: usize,
}

impl Round {
    /// The sampling seed of this round's generation (online stages).
    pub fn generation_seed(&self) -> u64 {
        self.seed.wrapping_add(1_000_003 * self.index as u64)
    }
}

/// The batch of a stage that trains on dataset rows: a step's micro-batches of row indices
/// and the loss units (tokens or pairs) they hold together, the step's normaliser.
pub struct RowBatch {
    pub micro: Vec<Vec<usize>>,
    pub units: usize,
}

impl RowBatch {
    /// The draws of a round, with `units` counting a micro-batch's loss units; a step with
    /// none is an error.
    pub fn new(draws: Vec<Vec<usize>>, round: Round, units: impl Fn(&[usize]) -> usize) -> Result<Self> {
        let total = draws.iter().map(|b| units(b)).sum();
        if total == 0 {
            bail!("step {}: the batch has no tokens in the loss (all completions truncated away?)", round.step + 1);
        }
        Ok(RowBatch { micro: draws, units: total })
    }
}

/// A metric with its own units: `(name, sum, units)`, logged as Σ sums / Σ units.
pub type UnitMetric = (&'static str, f64, f64);

/// One micro-batch's contribution to an update.
pub struct MicroLoss<B: AutodiffBackend> {
    /// Its share of the update's loss: the update minimises the sum over its micro-batches.
    pub loss: Tensor<B, 1>,
    /// Stage metrics as sums over `units` (pairs, tokens, or 1 for a mean); a logged value
    /// is Σ sums / Σ units over its window.
    pub metrics: Vec<(&'static str, f64)>,
    /// Metrics with their own units, `(name, sum, units)`: a mean over part of the batch
    /// (critique tokens) or over micro-batches.
    pub metrics_with_units: Vec<UnitMetric>,
    pub units: f64,
    /// Non-padding tokens fed to the model (for tokens/s).
    pub fed_tokens: usize,
}

/// An evaluation on held-out data: a loss (when the stage has one) and metrics, logged as
/// `eval_loss` and `eval_*`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub loss: Option<f64>,
    pub metrics: BTreeMap<String, f64>,
}

/// What a stage supplies to the loop.
pub trait Stage<B: AutodiffBackend> {
    type Model: AutodiffModule<B> + Clone;
    type Batch;

    fn shape(&self) -> Shape;

    /// The batch of one round from the loader's draws: examples to train on, or prompts to
    /// generate from and score.
    fn next_batch(&mut self, model: &Self::Model, draws: Vec<Vec<usize>>, round: Round) -> Result<Self::Batch>;

    /// The micro-batches (indices into the batch) of update `update` of pass `pass` over it.
    /// An empty list skips the update (a short last minibatch).
    fn micro_batches(&self, batch: &Self::Batch, pass: usize, update: usize) -> Vec<Vec<usize>>;

    /// The loss of one micro-batch; `micro_batches` is how many the update has.
    fn loss(
        &self,
        model: &Self::Model,
        batch: &Self::Batch,
        pass: usize,
        micro: &[usize],
        micro_batches: usize,
    ) -> Result<MicroLoss<B>>;

    /// Metrics of the batch itself (rewards, lengths), logged with every step trained on it.
    fn batch_metrics(&self, _batch: &Self::Batch) -> Vec<(String, f64)> {
        vec![]
    }

    /// `[curriculum]` and each item's difficulty under its measure, when the stage has one
    /// (`model` is the starting model, before any resume).
    fn curriculum(&self, _model: &Self::Model) -> Result<Option<(CurriculumConfig, Vec<f64>)>> {
        Ok(None)
    }

    /// After each step (adaptive KL control).
    fn after_step(&mut self, _batch: &Self::Batch) {}

    /// The stage's own state for checkpoints (restored with [`Stage::restore`]).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn restore(&mut self, _state: serde_json::Value) -> Result<()> {
        Ok(())
    }

    /// Open the stage's own logs, cut back to `resumed_at` on resume.
    fn open_logs(&mut self, _output_dir: &Path, _resumed_at: Option<usize>) -> Result<()> {
        Ok(())
    }

    /// Evaluate on held-out data, if the stage has any; `step` names its sample files.
    fn evaluate(&mut self, _model: &Self::Model, _step: usize) -> Result<Option<Evaluation>> {
        Ok(None)
    }

    /// Save the trainable weights into a checkpoint directory, and load them back.
    fn save_weights(&self, model: &Self::Model, dir: &Path) -> Result<()>;
    fn load_weights(&self, model: Self::Model, dir: &Path) -> Result<Self::Model>;

    /// Write the trained model to `final/`.
    fn export(&self, model: &Self::Model, final_dir: &Path) -> Result<()>;

    /// The metrics the log line shows (all when empty).
    fn headline(&self) -> &'static [&'static str] {
        &[]
    }

    /// A short note for the progress bar.
    fn progress(&self, _batch: &Self::Batch) -> String {
        String::new()
    }
}

/// A stage on dataset rows (SFT, the pairwise stages, KTO): a round is
/// `gradient_accumulation_steps` micro-batches of rows trained on for one step of one
/// update. It supplies what is its own, a micro-batch's loss; [`Rows`] is the [`Stage`]
/// plumbing of every row stage, written once.
pub trait RowStage<B: AutodiffBackend> {
    type Model: AutodiffModule<B> + Clone;

    /// The rows, rows per micro-batch and micro-batches per step.
    fn rows(&self) -> (usize, usize, usize);

    /// Loss units of a micro-batch (the step's loss is normalised by their sum): rows, or
    /// SFT's tokens.
    fn units(&self, micro: &[usize]) -> usize {
        micro.len()
    }

    /// The loss of `micro`, one of `micro_batches` micro-batches of a step holding
    /// `step_units` loss units.
    fn row_loss(
        &self,
        model: &Self::Model,
        micro: &[usize],
        step_units: usize,
        micro_batches: usize,
    ) -> Result<MicroLoss<B>>;

    fn evaluate_rows(&mut self, model: &Self::Model) -> Result<Option<Evaluation>>;

    /// `[curriculum]` and each row's difficulty, when the stage has one (`model`: the
    /// starting model).
    fn curriculum(&self, _model: &Self::Model) -> Result<Option<(CurriculumConfig, Vec<f64>)>> {
        Ok(None)
    }
    fn save(&self, model: &Self::Model, dir: &Path) -> Result<()>;
    fn load(&self, model: Self::Model, dir: &Path) -> Result<Self::Model>;
    fn export_final(&self, model: &Self::Model, final_dir: &Path) -> Result<()>;
}

/// A [`RowStage`] as the loop runs it: `train(&mut Rows(stage), …)`.
pub struct Rows<S>(pub S);

impl<B: AutodiffBackend, S: RowStage<B>> Stage<B> for Rows<S> {
    type Model = S::Model;
    type Batch = RowBatch;

    fn shape(&self) -> Shape {
        let (items, batch_size, accumulation) = self.0.rows();
        Shape {
            items,
            draw_size: batch_size,
            draws_per_round: accumulation,
            steps_per_round: 1,
            updates_per_step: 1,
            split: Split::MicroBatches,
        }
    }

    fn next_batch(&mut self, _model: &S::Model, draws: Vec<Vec<usize>>, round: Round) -> Result<RowBatch> {
        RowBatch::new(draws, round, |m| self.0.units(m))
    }

    fn micro_batches(&self, batch: &RowBatch, _pass: usize, _update: usize) -> Vec<Vec<usize>> {
        batch.micro.clone()
    }

    fn loss(&self, model: &S::Model, batch: &RowBatch, _: usize, micro: &[usize], n: usize) -> Result<MicroLoss<B>> {
        self.0.row_loss(model, micro, batch.units, n)
    }

    fn evaluate(&mut self, model: &S::Model, _step: usize) -> Result<Option<Evaluation>> {
        self.0.evaluate_rows(model)
    }

    fn curriculum(&self, model: &S::Model) -> Result<Option<(CurriculumConfig, Vec<f64>)>> {
        self.0.curriculum(model)
    }

    fn save_weights(&self, model: &S::Model, dir: &Path) -> Result<()> {
        self.0.save(model, dir)
    }

    fn load_weights(&self, model: S::Model, dir: &Path) -> Result<S::Model> {
        self.0.load(model, dir)
    }

    fn export(&self, model: &S::Model, final_dir: &Path) -> Result<()> {
        self.0.export_final(model, final_dir)
    }
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    /// Mean training loss since the previous row; absent on the step-0 eval row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Non-padding input tokens per second since the previous row.
    pub tokens_per_second: f64,
    pub step_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Stage metrics (`rewards/chosen`, …) and their `eval_` counterparts.
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

impl StepMetrics {
    /// The step-0 row of an evaluation before training.
    pub fn before_training(eval: &Evaluation) -> Self {
        StepMetrics {
            step: 0,
            epoch: 0.0,
            loss: None,
            learning_rate: 0.0,
            grad_norm: 0.0,
            tokens_per_second: 0.0,
            step_seconds: 0.0,
            eval_loss: eval.loss,
            extra: eval.metrics.iter().map(|(k, v)| (format!("eval_{k}"), *v)).collect(),
        }
    }
}

/// The result of a run.
pub struct TrainOutcome<M> {
    pub model: M,
    pub steps: usize,
    pub metrics: Vec<StepMetrics>,
}

/// Where a run stands: a checkpoint's `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LoopState {
    step: usize,
    /// Rounds drawn so far.
    rounds: usize,
    loader: LoaderState,
    seed: u64,
    total_steps: usize,
    /// The stage's own state (PPO's adaptive KL coefficient).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    stage: serde_json::Value,
    /// Non-finite updates skipped so far (`skip_nonfinite_steps`).
    #[serde(default, skip_serializing_if = "is_zero")]
    skipped_updates: u64,
    /// AdamW's step count (its bias correction): the updates applied, which skipped and
    /// empty updates make fewer than `step × updates_per_step`.
    #[serde(default)]
    optimizer_steps: Option<u64>,
    /// Replicas of a data-parallel run (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    world: Option<usize>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Train `model` as `stage` says, writing `metrics.jsonl`, checkpoints and `final/` under
/// `output_dir`. With `resume`, continue from the newest complete checkpoint (none: start
/// fresh); without it, a directory holding checkpoints is refused.
pub fn train<B: AutodiffBackend, S: Stage<B>>(
    stage: &mut S,
    mut model: S::Model,
    args: &TrainingArguments,
    output_dir: &Path,
    resume: bool,
) -> Result<TrainOutcome<S::Model>> {
    args.validate()?;
    let shape = stage.shape();
    if shape.items == 0 {
        bail!("no training examples");
    }
    let updates = shape.updates_per_step.max(1);
    let device = model.devices().first().cloned().context("the model has no device")?;
    let replica = Replica::current();
    replica.join::<B::InnerBackend>(&device)?;
    let (main, world) = (replica.is_main(), replica.world);
    // Vulkan (wgpu) has no bf16: refused here, not as a shader error mid-step.
    if args.bf16 && !B::supports_dtype(&device, align_model::burn::tensor::DType::BF16) {
        bail!("[training] bf16 = true: this backend has no bf16 (wgpu on Vulkan is f32 only); set bf16 = false");
    }
    // bf16: weights and activations in bf16, f32 masters and moments in the optimizer.
    let dtype = if args.bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    model = align_model::cast_float(model, dtype);
    std::fs::create_dir_all(output_dir.join("checkpoints")).with_context(|| output_dir.display().to_string())?;
    let mut loader = Loader::new(shape.items, shape.draw_size, args.seed, true);
    // A round of a data-parallel run is the round of one device with `world` times the draws.
    let draws_per_round = shape.draws_per_round.max(1) * world;
    let rounds_per_epoch = loader.batches_per_epoch().div_ceil(draws_per_round);
    let total = args.total_steps(rounds_per_epoch, shape.steps_per_round.max(1));
    // Easier items first: every example is admitted after `duration` of the run's rounds.
    // Difficulties from the starting model (a resumed run measures what the first did).
    let curriculum = stage.curriculum(&model)?;
    if let Some((c, difficulty)) = &curriculum {
        if difficulty.len() != shape.items {
            bail!("[curriculum]: {} difficulties for {} examples", difficulty.len(), shape.items);
        }
        let rounds = (c.duration * total.div_ceil(shape.steps_per_round.max(1)) as f64).ceil() as usize;
        loader = loader.with_curriculum(Curriculum {
            order: align_data::curriculum::easiest_first(difficulty),
            pacing: c.pacing,
            initial: c.initial,
            stages: c.stages,
            horizon: rounds.max(1) * draws_per_round,
        });
    }
    let schedule_len = total * updates;
    let warmup = args.warmup(schedule_len);
    let mut optimizer = AdamW::<B>::new(args.adamw());
    let (mut step, mut rounds, mut skipped) = (0usize, 0usize, 0u64);

    let resumed = checkpoint::resume_point(output_dir, resume)?;
    if let Some((at, dir)) = &resumed {
        let state = checkpoint::read_state(dir, args.seed, total)?;
        if state.world.unwrap_or(1) != world {
            bail!(
                "{}: the checkpoint was made by {} replicas and this run has {world}: resume with the same [distributed] devices × nodes",
                dir.display(),
                state.world.unwrap_or(1)
            );
        }
        model = align_model::cast_float(stage.load_weights(model, dir)?, dtype);
        checkpoint::load_optimizer::<B>(&mut optimizer, &dir.join("optimizer.safetensors"), &device)?;
        // Moments under a path the model does not train would be dropped silently and the
        // parameter restarted from zero moments: a checkpoint of another model or version.
        let trainable = crate::optim::trainable_paths(&model);
        if let Some(stray) = optimizer.state.keys().find(|k| !trainable.contains(*k)) {
            bail!(
                "{}: optimizer moments for `{stray}`, which this model does not train (a checkpoint of another model, [lora] targets or align version): resume with the config that wrote it, or start afresh",
                dir.join("optimizer.safetensors").display()
            );
        }
        optimizer.step = state.optimizer_steps.unwrap_or((at * updates) as u64);
        loader.restore(state.loader);
        stage.restore(state.stage)?;
        (step, rounds, skipped) = (*at, state.rounds, state.skipped_updates);
        if main {
            tracing::info!(step = at, checkpoint = %dir.display(), "resumed");
        }
    }
    check_same_start::<B, _>(&replica, &model, &device)?;
    let resumed_at = resumed.map(|(at, _)| at);
    let mut log = MetricsLog::open(output_dir, resumed_at, main, args.report_to)?;
    if main {
        stage.open_logs(output_dir, resumed_at)?;
    }
    let progress = if main {
        indicatif::ProgressBar::new(total as u64).with_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_position(step as u64);
    if args.eval_on_start
        && step == 0
        && main
        && let Some(e) = stage.evaluate(&model, 0)?
    {
        tracing::info!(eval_loss = %opt(e.loss), metrics = %crate::logfmt::map(&e.metrics), "eval before training");
        log.push(StepMetrics::before_training(&e))?;
    }

    let mut window = Window { start: Some(Instant::now()), ..Window::default() };
    let mut health = Health::default();
    let mut last_saved = step;
    let mut t0 = Instant::now();
    while step < total {
        let competence = loader.competence();
        let mut draws: Vec<Vec<usize>> = (0..draws_per_round).map(|_| loader.next_batch()).collect();
        if let Some((_, difficulty)) = &curriculum {
            // What the curriculum admitted, and how hard the round's items are on average.
            let drawn: Vec<f64> = draws.iter().flatten().map(|&i| difficulty[i]).collect();
            let (sum, n) = (drawn.iter().sum::<f64>(), drawn.len());
            window.add("curriculum/competence", competence, 1.0);
            window.add("curriculum/difficulty", sum, n as f64);
        }
        let mut first_item = 0;
        if shape.split != Split::MicroBatches {
            let own = shape.draws_per_round.max(1);
            let rest = draws.split_off(replica.rank * own);
            first_item = draws.iter().map(Vec::len).sum();
            draws = rest.into_iter().take(own).collect();
        }
        let round = Round { index: rounds, step, seed: args.seed, first_item };
        let batch = stage.next_batch(&model, draws, round)?;
        rounds += 1;
        for pass in 0..shape.steps_per_round.max(1) {
            if step >= total {
                break;
            }
            for (k, v) in stage.batch_metrics(&batch) {
                window.add(&k, v, 1.0);
            }
            let t_train = Instant::now();
            let (mut step_loss, mut fed, mut lr, mut norm, mut applied) = (0.0f64, 0usize, 0.0f64, 0.0f64, 0usize);
            for u in 0..updates {
                let at = step * updates + u;
                lr = learning_rate(
                    args.learning_rate,
                    args.lr_scheduler_type,
                    at,
                    warmup,
                    schedule_len,
                    args.num_cycles,
                );
                // Dropout draws from the backend RNG: seeded per update (and replica), a
                // resumed run draws the same.
                let update_seed = replica.seed(args.seed).wrapping_add(at as u64);
                B::seed(&device, update_seed);
                align_model::rng::dropout::seed(update_seed);
                let micro = stage.micro_batches(&batch, pass, u);
                if micro.is_empty() {
                    continue;
                }
                let work = Work { replica: &replica, split: shape.split, device: &device };
                let done = update(
                    stage,
                    model,
                    &mut optimizer,
                    &batch,
                    pass,
                    &micro,
                    lr,
                    args.max_grad_norm,
                    &mut window,
                    &work,
                )?;
                model = done.model;
                fed += done.fed_tokens;
                if done.applied {
                    health.nonfinite_in_a_row = 0;
                    (step_loss, norm, applied) = (step_loss + done.loss, done.grad_norm, applied + 1);
                } else {
                    skipped += 1;
                    health.nonfinite_in_a_row += 1;
                    if health.nonfinite_in_a_row > args.skip_nonfinite_steps {
                        return Err(nonfinite_stop(output_dir, step + 1, done.loss, done.grad_norm, main));
                    }
                    tracing::warn!(
                        step = step + 1,
                        loss = done.loss,
                        grad_norm = done.grad_norm,
                        "non-finite update skipped (weights unchanged; {} in a row of {} allowed)",
                        health.nonfinite_in_a_row,
                        args.skip_nonfinite_steps
                    );
                }
            }
            step += 1;
            stage.after_step(&batch);
            let step_loss = step_loss / applied.max(1) as f64;
            if applied > 0 {
                // A step whose every update was skipped has no loss to log.
                health.check(step, step_loss, norm, main);
                window.step(step_loss, fed);
            }
            window.add("train_tokens_per_second", fed as f64 / t_train.elapsed().as_secs_f64().max(1e-9), 1.0);
            progress.set_position(step as u64);
            progress.set_message(format!(
                "loss {} lr {} {:.0} tok/s {}",
                Sig(step_loss),
                Sig(lr),
                fed as f64 / t_train.elapsed().as_secs_f64().max(1e-9),
                stage.progress(&batch)
            ));

            // Rank 0 evaluates; the others wait for it at the next update's all-reduce.
            let eval = match args.eval_steps {
                Some(e) if main && e > 0 && (step.is_multiple_of(e) || step == total) => {
                    stage.evaluate(&model, step)?
                }
                _ => None,
            };
            if step.is_multiple_of(args.logging_steps.max(1)) || step == total || eval.is_some() {
                let state = loader.state();
                let (loss, tokens_per_second, mut extra) = window.take();
                if let Some(e) = &eval {
                    extra.extend(e.metrics.iter().map(|(k, v)| (format!("eval_{k}"), *v)));
                }
                if skipped > 0 {
                    extra.insert("skipped_updates".into(), skipped as f64);
                }
                let row = StepMetrics {
                    step,
                    epoch: state.epoch as f64 + state.batch as f64 / loader.batches_per_epoch().max(1) as f64,
                    loss,
                    learning_rate: lr,
                    grad_norm: norm,
                    tokens_per_second,
                    step_seconds: t0.elapsed().as_secs_f64(),
                    eval_loss: eval.as_ref().and_then(|e| e.loss),
                    extra,
                };
                if main {
                    log_line(&row, stage.headline());
                }
                log.push(row)?;
            }
            let round_done = pass + 1 == shape.steps_per_round.max(1);
            let due = args.save_steps > 0 && step / args.save_steps > last_saved / args.save_steps;
            if round_done && due && step < total && main {
                last_saved = step;
                let state = LoopState {
                    step,
                    rounds,
                    loader: loader.state(),
                    seed: args.seed,
                    total_steps: total,
                    stage: stage.state(),
                    skipped_updates: skipped,
                    optimizer_steps: Some(optimizer.step),
                    world: (world > 1).then_some(world),
                };
                let save = |dir: &Path| stage.save_weights(&model, dir);
                let state = serde_json::to_value(&state)?;
                checkpoint::write_checkpoint(
                    &save,
                    &optimizer,
                    step,
                    &state,
                    &log.rows,
                    output_dir,
                    args.save_total_limit,
                )?;
            }
            t0 = Instant::now();
        }
    }
    progress.finish_and_clear();
    let model = if args.bf16 { optimizer.model_with_masters(model) } else { model };
    if !main {
        return Ok(TrainOutcome { model, steps: step, metrics: log.rows });
    }
    let final_dir = output_dir.join("final");
    // Written beside and renamed into place: a `final/` that exists is complete.
    let tmp = output_dir.join("final.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    stage.export(&model, &tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).with_context(|| final_dir.display().to_string())?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| final_dir.display().to_string())?;
    health.summary(skipped);
    tracing::info!(final_dir = %final_dir.display(), steps = step, "stage done");
    Ok(TrainOutcome { model, steps: step, metrics: log.rows })
}

/// What an optimizer update leaves.
struct Updated<M> {
    model: M,
    /// The update's loss: the sum of its micro-batches' shares.
    loss: f64,
    grad_norm: f64,
    fed_tokens: usize,
    /// False when the loss or the gradient norm was not finite: no step was taken.
    applied: bool,
}

/// Where an update runs: this replica, how the round is split among the replicas, and the
/// device of the collective operations.
struct Work<'a, B: AutodiffBackend> {
    replica: &'a Replica,
    split: Split,
    device: &'a B::Device,
}

/// One optimizer update on `micro`: each micro-batch's loss backpropagated and its
/// gradients accumulated, then clipping and the AdamW step, unless the loss or the
/// gradient norm is not finite (checked before the step, so a non-finite update never
/// reaches the weights, a checkpoint or `final/`).
///
/// In a data-parallel run this replica backpropagates its share of the micro-batches; the
/// gradients are summed over the replicas, and the loss and metrics gathered, so every
/// replica takes the step one device would take on all of them.
#[allow(clippy::too_many_arguments)]
fn update<B: AutodiffBackend, S: Stage<B>>(
    stage: &S,
    model: S::Model,
    optimizer: &mut AdamW<B>,
    batch: &S::Batch,
    pass: usize,
    micro: &[Vec<usize>],
    lr: f64,
    max_grad_norm: f64,
    window: &mut Window,
    work: &Work<B>,
) -> Result<Updated<S::Model>> {
    let Work { replica, split, device } = *work;
    // The micro-batches this replica runs, and how many the whole update has (a loss that
    // averages over micro-batches divides by that).
    let (own, count): (Vec<&Vec<usize>>, usize) = match split {
        Split::MicroBatches | Split::Generation => {
            (micro.iter().skip(replica.rank).step_by(replica.world).collect(), micro.len())
        }
        Split::Draws => {
            let counts =
                replica.gather_fixed::<B::InnerBackend>(device, &[micro.len() as f64], "counting micro-batches")?;
            (micro.iter().collect(), counts.iter().map(|c| c[0] as usize).sum())
        }
    };
    let (mut grads, mut loss, mut fed_tokens) = (None, 0.0f64, 0usize);
    let mut metrics: BTreeMap<&'static str, (f64, f64)> = BTreeMap::new();
    for mb in own {
        let m = stage.loss(&model, batch, pass, mb, count)?;
        let units = m.units;
        for (k, v, u) in m.metrics.into_iter().map(|(k, v)| (k, v, units)).chain(m.metrics_with_units) {
            let e = metrics.entry(k).or_default();
            (e.0, e.1) = (e.0 + v, e.1 + u);
        }
        loss += m.loss.clone().into_scalar().elem::<f64>();
        fed_tokens += m.fed_tokens;
        grads = Some(accumulate(&model, m.loss, grads));
    }
    let grads = if replica.world > 1 {
        // [metric names' fingerprint, loss, fed tokens, (sum, units) per metric in name order]
        let keys = key_hash(metrics.keys());
        let local: Vec<f64> =
            [keys, loss, fed_tokens as f64].into_iter().chain(metrics.values().flat_map(|&(v, u)| [v, u])).collect();
        let all = replica.gather::<B::InnerBackend>(device, &local, "gathering the losses")?;
        (loss, fed_tokens) = (0.0, 0);
        for (r, v) in all.iter().enumerate() {
            let [hash, their_loss, their_tokens, sums @ ..] = &v[..] else {
                bail!("rank {r} sent no losses: the replicas do not run the same stage");
            };
            (loss, fed_tokens) = (loss + their_loss, fed_tokens + *their_tokens as usize);
            if r == replica.rank || sums.is_empty() {
                continue;
            }
            if *hash != keys && !metrics.is_empty() {
                bail!(
                    "rank {r} logged other metrics than rank {}: the replicas do not run the same stage",
                    replica.rank
                );
            }
            for ((_, e), pair) in metrics.iter_mut().zip(sums.chunks_exact(2)) {
                (e.0, e.1) = (e.0 + pair[0], e.1 + pair[1]);
            }
        }
        all_reduce_grads::<B, _>(replica, &model, grads)?
    } else {
        grads.context("an update with no micro-batches")?
    };
    let grad_norm = grad_norm::<B, _>(&model, &grads);
    if !(loss.is_finite() && grad_norm.is_finite()) {
        return Ok(Updated { model, loss, grad_norm, fed_tokens, applied: false });
    }
    // Only an applied update's metrics are logged (a skipped one's may be NaN).
    for (k, (v, units)) in metrics {
        window.add(k, v, units);
    }
    let scale = if max_grad_norm > 0.0 && grad_norm > max_grad_norm { max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
    let model = optimizer.step(model, grads, lr, scale);
    Ok(Updated { model, loss, grad_norm, fed_tokens, applied: true })
}

/// A fingerprint of metric names (the replicas must log the same ones), exact as an f64.
fn key_hash<'a>(keys: impl Iterator<Item = &'a &'static str>) -> f64 {
    let h = keys.fold(0xcbf2_9ce4_8422_2325u64, |h, k| {
        k.bytes().chain([0]).fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    });
    // 52 bits: an integer an f64 holds exactly.
    (h >> 12) as f64
}

/// The error of a run stopped by non-finite updates. The checkpoint written at the step
/// before holds the weights that produced them: it is set aside (renamed
/// `step-N.nonfinite`, so `--resume` passes over it) and the error names the newest
/// checkpoint whose weights gave a finite loss.
fn nonfinite_stop(output_dir: &Path, step: usize, loss: f64, grad_norm: f64, main: bool) -> anyhow::Error {
    let mut note = String::new();
    let all = checkpoint::checkpoints(output_dir);
    if let Some((at, dir)) = all.last().filter(|(at, _)| *at + 1 == step && main) {
        let aside = dir.with_file_name(format!("step-{at}.nonfinite"));
        match std::fs::rename(dir, &aside) {
            Ok(()) => note = format!(" Checkpoint step-{at} produced it and is set aside as {}.", aside.display()),
            Err(e) => note = format!(" Checkpoint step-{at} produced it ({e} when setting it aside)."),
        }
    }
    let finite = all.iter().rev().find(|(at, _)| *at + 1 < step);
    let last = match finite {
        Some((at, dir)) => format!(
            " The last checkpoint whose weights gave a finite loss is step-{at} ({}): lower the learning rate and --resume.",
            dir.display()
        ),
        None => " No checkpoint precedes it.".into(),
    };
    anyhow::anyhow!(
        "step {step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; stopping before the \
         optimizer step, so no weights of it were applied or saved.{note}{last} \
         (`skip_nonfinite_steps` in [training] skips such steps instead.)"
    )
}

/// Signs of a run going wrong without a NaN: an exactly zero gradient (saturated or
/// diverged weights) and a loss far above where it started. Each is warned once when it
/// first appears and counted in the closing summary.
#[derive(Default)]
struct Health {
    nonfinite_in_a_row: usize,
    first_loss: Option<f64>,
    zero_grad_steps: usize,
    diverged_steps: usize,
}

impl Health {
    fn check(&mut self, step: usize, loss: f64, grad_norm: f64, main: bool) {
        let first = *self.first_loss.get_or_insert(loss);
        if grad_norm == 0.0 && loss.is_finite() {
            if self.zero_grad_steps == 0 && main {
                tracing::warn!(
                    step,
                    loss,
                    "the gradient is exactly zero: nothing is learned (diverged or saturated weights, or a learning rate far too high?)"
                );
            }
            self.zero_grad_steps += 1;
        }
        // 10× the first step's loss (and beyond its noise): a divergence to report.
        if loss.is_finite() && first.is_finite() && loss > 10.0 * first.abs().max(1e-3) {
            if self.diverged_steps == 0 && main {
                tracing::warn!(
                    step,
                    loss,
                    first_loss = first,
                    "the loss is more than 10× its first value: training is diverging (learning rate too high?)"
                );
            }
            self.diverged_steps += 1;
        }
    }

    fn summary(&self, skipped_updates: u64) {
        if self.zero_grad_steps + self.diverged_steps > 0 || skipped_updates > 0 {
            tracing::warn!(
                zero_gradient_steps = self.zero_grad_steps,
                diverging_steps = self.diverged_steps,
                skipped_nonfinite_updates = skipped_updates,
                "this run showed signs of divergence: check its metrics before using final/"
            );
        }
    }
}

/// The log line of a row: loss, learning rate, norm, speed and the stage's headline metrics
/// (all when it names none).
fn log_line(row: &StepMetrics, headline: &[&str]) {
    let shown: BTreeMap<String, f64> = match headline {
        [] => row.extra.clone(),
        keys => row.extra.iter().filter(|(k, _)| keys.contains(&k.as_str())).map(|(k, v)| (k.clone(), *v)).collect(),
    };
    tracing::info!(
        step = row.step,
        loss = %opt(row.loss),
        lr = %Sig(row.learning_rate),
        grad_norm = %Sig(row.grad_norm),
        tokens_per_s = row.tokens_per_second as u64,
        eval_loss = %opt(row.eval_loss),
        metrics = %crate::logfmt::map(&shown),
        "train"
    );
}

/// Metrics and losses of the steps since the last log row.
#[derive(Default)]
struct Window {
    sums: BTreeMap<String, f64>,
    units: BTreeMap<String, f64>,
    loss: f64,
    steps: usize,
    tokens: usize,
    start: Option<Instant>,
}

impl Window {
    fn add(&mut self, key: &str, sum: f64, units: f64) {
        self.start.get_or_insert_with(Instant::now);
        *self.sums.entry(key.to_string()).or_default() += sum;
        *self.units.entry(key.to_string()).or_default() += units;
    }

    fn step(&mut self, loss: f64, tokens: usize) {
        self.start.get_or_insert_with(Instant::now);
        self.loss += loss;
        self.steps += 1;
        self.tokens += tokens;
    }

    /// The window's mean loss, tokens/s and mean metrics; starts a new window.
    /// The window's mean loss (none when every step in it was skipped), tokens per
    /// second and metric means; starts a new window.
    fn take(&mut self) -> (Option<f64>, f64, BTreeMap<String, f64>) {
        let elapsed = self.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let metrics = self.sums.iter().map(|(k, v)| (k.clone(), v / self.units[k].max(f64::MIN_POSITIVE))).collect();
        let loss = (self.steps > 0).then(|| self.loss / self.steps as f64);
        let out = (loss, self.tokens as f64 / elapsed.max(1e-9), metrics);
        *self = Window { start: Some(Instant::now()), ..Window::default() };
        out
    }
}

/// `metrics.jsonl`, fresh or, on resume, cut back to the checkpoint's step (what followed
/// is rewritten), and the dashboards of `report_to` beside it, each row written to all.
/// Replicas other than rank 0 keep no log (`file` none).
struct MetricsLog {
    rows: Vec<StepMetrics>,
    file: Option<std::fs::File>,
    events: Option<tensorboard::EventLog>,
}

impl MetricsLog {
    fn open(output_dir: &Path, resumed_at: Option<usize>, write: bool, report_to: ReportTo) -> Result<Self> {
        if !write {
            return Ok(MetricsLog { rows: vec![], file: None, events: None });
        }
        let path = output_dir.join("metrics.jsonl");
        let rows = match resumed_at {
            Some(at) => truncate_jsonl_after(&path, at)?
                .iter()
                .map(|l| serde_json::from_str(l).with_context(|| path.display().to_string()))
                .collect::<Result<Vec<StepMetrics>>>()?,
            None => {
                std::fs::write(&path, "").with_context(|| path.display().to_string())?;
                vec![]
            }
        };
        let file = std::fs::OpenOptions::new().append(true).open(&path).with_context(|| path.display().to_string())?;
        let events = tensorboard::EventLog::open(output_dir, resumed_at, report_to.tensorboard)?;
        Ok(MetricsLog { rows, file: Some(file), events: Some(events) })
    }

    /// Append a row (one write, flushed) to every log and keep it.
    fn push(&mut self, row: StepMetrics) -> Result<()> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let mut line = serde_json::to_string(&row)?;
        line.push('\n');
        file.write_all(line.as_bytes())?;
        file.flush()?;
        if let Some(events) = self.events.as_mut() {
            events.push(&row)?;
        }
        self.rows.push(row);
        Ok(())
    }
}

/// Rewrite `path` (JSONL of objects with a `step` field) keeping rows up to `step`: a
/// resumed run rewrites what followed its checkpoint. Returns the rows kept.
pub fn truncate_jsonl_after(path: &Path, step: usize) -> Result<Vec<String>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(vec![]) };
    let mut keep = vec![];
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let parsed = serde_json::from_str::<serde_json::Value>(line);
        // A last line with no newline was being written when the run was killed.
        if parsed.is_err() && i + 1 == lines.len() && !text.ends_with('\n') {
            tracing::warn!(file = %path.display(), line = i + 1, "dropping a row cut short by the interruption");
            break;
        }
        let v = parsed.with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= step) {
            keep.push(line.to_string());
        }
    }
    let mut body = keep.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    align_model::weights::write_atomic(path, body.as_bytes()).with_context(|| path.display().to_string())?;
    Ok(keep)
}

/// Backpropagate a micro-batch's loss and add its gradients to those accumulated so far.
fn accumulate<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    loss: Tensor<B, 1>,
    accumulated: Option<GradientsParams>,
) -> GradientsParams {
    let grads = GradientsParams::from_grads(loss.backward(), model);
    match accumulated {
        None => grads,
        Some(acc) => add_grads::<B, _>(model, acc, grads),
    }
}

/// Element-wise sum of two gradient sets (gradient accumulation).
fn add_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    a: GradientsParams,
    mut b: GradientsParams,
) -> GradientsParams {
    struct Add<'a, B: AutodiffBackend> {
        a: GradientsParams,
        b: &'a mut GradientsParams,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Add<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(gb) = self.b.remove::<B::InnerBackend, D>(param.id) {
                let sum = match self.a.remove::<B::InnerBackend, D>(param.id) {
                    Some(ga) => ga + gb,
                    None => gb,
                };
                self.a.register::<B::InnerBackend, D>(param.id, sum);
            }
        }
    }
    let mut adder = Add::<B> { a, b: &mut b, _b: std::marker::PhantomData };
    model.visit(&mut adder);
    adder.a
}

/// Largest all-reduce of gradients, in values (64 MiB of f32): big enough to amortise each
/// operation's latency, small enough to bound the extra memory of the flattened copy.
const GRADIENT_BUCKET: usize = 1 << 24;

/// The sum over the replicas of every gradient. Each replica visits the parameters in module
/// order (parameter ids differ between processes; the order does not) and flattens their
/// gradients into buckets, one all-reduce each. A parameter with a gradient on some replicas
/// only (a head no micro-batch of this replica reached) counts zeros on the others.
fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    replica: &Replica,
    model: &M,
    grads: Option<GradientsParams>,
) -> Result<GradientsParams> {
    /// Pass 1: each float parameter's local gradient, flattened, and its size.
    struct Take<B: AutodiffBackend> {
        grads: GradientsParams,
        taken: Vec<(Option<Tensor<B::InnerBackend, 1>>, usize)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let g = self.grads.remove::<B::InnerBackend, D>(param.id).map(|g| g.flatten::<1>(0, D - 1));
            self.taken.push((g, param.shape().num_elements()));
        }
    }
    /// Pass 2: the summed gradients back under their parameters' ids and shapes.
    struct Put<B: AutodiffBackend> {
        summed: std::vec::IntoIter<Option<Tensor<B::InnerBackend, 1>>>,
        grads: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Put<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(Some(g)) = self.summed.next() {
                self.grads.register::<B::InnerBackend, D>(param.id, g.reshape(param.shape()));
            }
        }
    }
    let device = model.devices().first().cloned().context("the model has no device")?;
    let mut take = Take::<B> { grads: grads.unwrap_or_default(), taken: vec![] };
    model.visit(&mut take);
    let presence: Vec<f32> = take.taken.iter().map(|(g, _)| if g.is_some() { 1.0 } else { 0.0 }).collect();
    let n = presence.len();
    let presence = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(presence, [n]), &device);
    let presence: Vec<f32> = replica
        .sum(presence, "summing the gradients")?
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The gradients some replica has, in order; buckets of consecutive ones.
    let dtype = take.taken.iter().find_map(|(g, _)| g.as_ref().map(|g| g.dtype()));
    let mut summed: Vec<Option<Tensor<B::InnerBackend, 1>>> = Vec::with_capacity(n);
    let mut bucket: Vec<Tensor<B::InnerBackend, 1>> = vec![];
    let mut sizes: Vec<usize> = vec![];
    let flush = |bucket: &mut Vec<Tensor<B::InnerBackend, 1>>,
                 sizes: &mut Vec<usize>,
                 summed: &mut Vec<Option<Tensor<B::InnerBackend, 1>>>|
     -> Result<()> {
        if bucket.is_empty() {
            return Ok(());
        }
        let flat = replica.sum(Tensor::cat(std::mem::take(bucket), 0), "summing the gradients")?;
        let mut at = 0;
        for size in sizes.drain(..) {
            summed.push(Some(flat.clone().narrow(0, at, size)));
            at += size;
        }
        Ok(())
    };
    for ((local, size), count) in take.taken.into_iter().zip(presence) {
        if count == 0.0 {
            flush(&mut bucket, &mut sizes, &mut summed)?;
            summed.push(None);
            continue;
        }
        if sizes.iter().sum::<usize>() + size > GRADIENT_BUCKET {
            flush(&mut bucket, &mut sizes, &mut summed)?;
        }
        let g = local.unwrap_or_else(|| {
            let zeros = Tensor::<B::InnerBackend, 1>::zeros([size], &device);
            match dtype {
                Some(d) => zeros.cast(d),
                None => zeros,
            }
        });
        bucket.push(g);
        sizes.push(size);
    }
    flush(&mut bucket, &mut sizes, &mut summed)?;
    let mut put = Put::<B> { summed: summed.into_iter(), grads: GradientsParams::new() };
    model.visit(&mut put);
    Ok(put.grads)
}

/// Refuse replicas that start from different trainable weights (a seed or a checkpoint
/// that differs between them): their steps would not be one model's. Compares, bit for
/// bit, each trainable parameter's sum.
fn check_same_start<B: AutodiffBackend, M: AutodiffModule<B>>(
    replica: &Replica,
    model: &M,
    device: &B::Device,
) -> Result<()> {
    if replica.world == 1 {
        return Ok(());
    }
    struct Sums(Vec<f64>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Sums {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                self.0.push(param.val().inner().sum().into_scalar().elem::<f64>());
            }
        }
    }
    let mut sums = Sums(vec![]);
    model.visit(&mut sums);
    let all = replica.gather::<B::InnerBackend>(device, &sums.0, "comparing the starting weights")?;
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
    if let Some(r) = (0..all.len()).find(|&r| bits(&all[r]) != bits(&all[0])) {
        bail!(
            "rank {r} starts from other trainable weights than rank 0 ({} against {} parameters, or other values): \
             every replica must load the same model and LoRA seed",
            all[r].len(),
            all[0].len()
        );
    }
    Ok(())
}
