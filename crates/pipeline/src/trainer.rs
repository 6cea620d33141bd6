//! The training loop every stage reuses: micro-batches with gradient accumulation,
//! global-norm clipping, AdamW, an HF schedule, metrics, checkpoints that are written
//! atomically and resume exactly.
//!
//! A checkpoint `checkpoints/step-N/` holds the trainable weights (`model.safetensors`, or
//! the PEFT adapter under LoRA), `optimizer.safetensors` (AdamW moments by parameter path)
//! and `trainer_state.json` (step, loader position, seed, metrics so far). It is written
//! as `step-N.tmp` and renamed, so the newest `step-N` is always complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use align_data::{Loader, LoaderState};
use align_lora::LoraConfig;
use align_model::burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::ElementConversion;
use align_model::burn::tensor::backend::{AutodiffBackend, Backend};
use align_model::burn::tensor::{FloatDType, Tensor, TensorData};
use align_model::weights::{HostTensor, SafetensorsSource, TensorMap, WeightSource, save_safetensors, write_atomic};
use align_model::{Heads, HfHead, ModelConfig, Transformer, export};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::optim::{AdamW, AdamWConfig, Moments, Schedule, grad_norm, learning_rate};

/// `[training]`: HF TrainingArguments names; every default documented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingArguments {
    /// Examples per micro-batch. Default 8.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate. Default 5e-5.
    pub learning_rate: f64,
    /// constant | linear | cosine | cosine_with_restarts. Default linear.
    pub lr_scheduler_type: Schedule,
    /// Cosine cycles (0.5 = half a cosine; restarts: number of cycles). Default 0.5.
    pub num_cycles: f64,
    /// Warmup as a fraction of all steps. Default 0.0.
    pub warmup_ratio: f64,
    /// Warmup steps; wins over warmup_ratio when > 0. Default 0.
    pub warmup_steps: usize,
    /// Epochs over the data. Default 3.0.
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides num_train_epochs when set. Default none.
    pub max_steps: Option<usize>,
    /// Clip the global gradient norm to this (0 = off). Default 1.0.
    pub max_grad_norm: f64,
    /// Log every N steps. Default 10.
    pub logging_steps: usize,
    /// Evaluate the eval loss every N steps (needs eval data). Default none.
    pub eval_steps: Option<usize>,
    /// Also evaluate before the first step (logged as step 0). Default false.
    pub eval_on_start: bool,
    /// Checkpoint every N steps (0 = only the final model). Default 500.
    pub save_steps: usize,
    /// Keep at most this many checkpoints. Default none (all).
    pub save_total_limit: Option<usize>,
    /// Seed of shuffling, adapter init and dropout. Default 42.
    pub seed: u64,
    /// bf16 mixed precision: weights, activations and gradients in bf16 (half the memory
    /// and, on CUDA, tensor-core matmuls), while the optimizer keeps f32 master weights and
    /// moments (as Apex O2 / HF `bf16` with f32 masters), norms and losses run in f32, and
    /// `final/` is exported from the masters in f32. On the CPU backend bf16 is emulated
    /// and slower than f32. Default false.
    pub bf16: bool,
    /// Recompute cheap activations in backward instead of keeping them (Burn's balanced
    /// checkpointing strategy, chosen by the stage runner): less memory, more compute.
    /// Default false.
    pub gradient_checkpointing: bool,
    /// AdamW β1. Default 0.9.
    pub adam_beta1: f64,
    /// AdamW β2. Default 0.999.
    pub adam_beta2: f64,
    /// AdamW ε. Default 1e-8.
    pub adam_epsilon: f64,
    /// Decoupled weight decay (not on norms, biases, embeddings). Default 0.0.
    pub weight_decay: f64,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            lr_scheduler_type: Schedule::Linear,
            num_cycles: 0.5,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            num_train_epochs: 3.0,
            max_steps: None,
            max_grad_norm: 1.0,
            logging_steps: 10,
            eval_steps: None,
            eval_on_start: false,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            bf16: false,
            gradient_checkpointing: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl TrainingArguments {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            weight_decay: self.weight_decay,
            decay_all: false,
        }
    }

    /// Optimizer steps for `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        if let Some(s) = self.max_steps {
            return s;
        }
        let per_epoch =
            n.div_ceil(self.per_device_train_batch_size.max(1)).div_ceil(self.gradient_accumulation_steps.max(1));
        ((per_epoch as f64) * self.num_train_epochs).ceil().max(1.0) as usize
    }

    pub fn warmup(&self, total: usize) -> usize {
        if self.warmup_steps > 0 { self.warmup_steps } else { (self.warmup_ratio * total as f64).ceil() as usize }
    }
}

/// The loss of one micro-batch.
pub struct LossTerms<B: AutodiffBackend> {
    /// Sum of the per-unit losses (tokens for SFT, pairs for preference stages).
    pub sum: Tensor<B, 1>,
    /// Units the sum covers (the step's loss is Σ sums / Σ units over its micro-batches).
    pub count: usize,
    /// Stage metrics as sums over the same units (`rewards/accuracies`: pairs with chosen >
    /// rejected); logged divided by the units of the logging window.
    pub metrics: Vec<(&'static str, f64)>,
}

/// An evaluation on held-out data: the mean loss and stage metrics (logged as `eval_*`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
}

/// What a stage supplies: the loss of a micro-batch of example indices.
pub trait TrainTask<B: AutodiffBackend> {
    type Model: AutodiffModule<B> + Clone;
    /// Number of training examples.
    fn num_examples(&self) -> usize;
    /// The loss of a micro-batch.
    fn loss_sum(&self, model: &Self::Model, batch: &[usize]) -> Result<LossTerms<B>>;
    /// Units the micro-batch loss is normalised by, computed without the model.
    fn loss_tokens(&self, batch: &[usize]) -> usize;
    /// Non-padding tokens the micro-batch feeds the model (for tokens/s).
    fn input_tokens(&self, batch: &[usize]) -> usize;
    /// Evaluate on held-out data, if the task has any.
    fn evaluate(&self, _model: &Self::Model) -> Result<Option<Evaluation>> {
        Ok(None)
    }
    /// Save the trainable weights into a checkpoint directory.
    fn save_weights(&self, model: &Self::Model, dir: &Path) -> Result<()>;
    /// Load the trainable weights from a checkpoint directory.
    fn load_weights(&self, model: Self::Model, dir: &Path) -> Result<Self::Model>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    loader: LoaderState,
    seed: u64,
    total_steps: usize,
}

/// Collects the AdamW moments into named host tensors and back.
fn save_optimizer<B: AutodiffBackend>(opt: &AdamW<B>, path: &Path) -> Result<()> {
    let mut map = TensorMap::default();
    for (k, s) in &opt.state {
        let tensors = [("m", Some(&s.m)), ("v", Some(&s.v)), ("master", s.master.as_ref())];
        for (suffix, t) in tensors.into_iter().filter_map(|(n, t)| t.map(|t| (n, t))) {
            let data: Vec<f32> =
                t.clone().into_data().convert::<f32>().to_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            map.0.insert(format!("{k}.{suffix}"), HostTensor::new(vec![data.len()], data));
        }
    }
    save_safetensors(&map, path)?;
    Ok(())
}

pub(crate) fn load_optimizer<B: AutodiffBackend>(opt: &mut AdamW<B>, path: &Path, device: &B::Device) -> Result<()> {
    let mut src = SafetensorsSource::open_files(&[path.to_path_buf()])?;
    let inner = |t: HostTensor| {
        let n = t.data.len();
        Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(t.data, [n]), device)
    };
    for name in src.names() {
        if let Some(k) = name.strip_suffix(".m") {
            let m = inner(src.load(&name)?);
            let v = inner(src.load(&format!("{k}.v"))?);
            let master_name = format!("{k}.master");
            let master = match src.names().contains(&master_name) {
                true => Some(inner(src.load(&master_name)?)),
                false => None,
            };
            opt.state.insert(k.to_string(), Moments { m, v, master });
        }
    }
    Ok(())
}

/// The newest complete checkpoint to continue from with `resume`; without it, an error if
/// the run already holds checkpoints (nothing written is overwritten by accident).
pub(crate) fn resume_point(output_dir: &Path, resume: bool) -> Result<Option<(usize, PathBuf)>> {
    let existing = checkpoints(output_dir);
    if !resume && !existing.is_empty() {
        bail!(
            "{} already holds checkpoints (newest: step {}): continue with --resume, or choose another output_dir",
            output_dir.display(),
            existing.last().map_or(0, |(s, _)| *s)
        );
    }
    Ok(if resume { existing.last().cloned() } else { None })
}

/// A checkpoint's `trainer_state.json`, refused if made with another seed or length.
pub(crate) fn read_state<S: serde::de::DeserializeOwned + CheckpointState>(
    dir: &Path,
    seed: u64,
    total_steps: usize,
) -> Result<S> {
    let path = dir.join("trainer_state.json");
    let state: S = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)
        .with_context(|| path.display().to_string())?;
    let (s, t) = state.seed_and_total();
    if s != seed || t != total_steps {
        bail!(
            "{}: checkpoint was made with seed {s} / {t} steps; this config has seed {seed} / {total_steps} steps",
            dir.display()
        );
    }
    Ok(state)
}

/// What a resumed run checks against its config.
pub(crate) trait CheckpointState {
    fn seed_and_total(&self) -> (u64, usize);
}

impl CheckpointState for TrainerState {
    fn seed_and_total(&self) -> (u64, usize) {
        (self.seed, self.total_steps)
    }
}

/// Checkpoint directories of a run, oldest first (only complete ones: no `.tmp`).
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
            p.join("trainer_state.json").exists().then_some((step, p))
        })
        .collect();
    v.sort();
    v
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
    /// The step-0 row of an evaluation before training: its loss (if any) and its metrics
    /// as `eval_*`.
    pub fn before_training(eval_loss: Option<f64>, metrics: &BTreeMap<String, f64>) -> Self {
        StepMetrics {
            step: 0,
            epoch: 0.0,
            loss: None,
            learning_rate: 0.0,
            grad_norm: 0.0,
            tokens_per_second: 0.0,
            step_seconds: 0.0,
            eval_loss,
            extra: metrics.iter().map(|(k, v)| (format!("eval_{k}"), *v)).collect(),
        }
    }
}

/// The result of a run.
pub struct TrainOutcome<M> {
    pub model: M,
    pub steps: usize,
    pub metrics: Vec<StepMetrics>,
}

/// Train `model` on `task`, writing `metrics.jsonl` and checkpoints under `output_dir`.
/// With `resume`, continue from the newest complete checkpoint (none: start fresh).
pub fn train<B: AutodiffBackend, T: TrainTask<B>>(
    task: &T,
    mut model: T::Model,
    args: &TrainingArguments,
    output_dir: &Path,
    resume: bool,
) -> Result<TrainOutcome<T::Model>> {
    if args.per_device_train_batch_size == 0 || args.gradient_accumulation_steps == 0 {
        bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
    }
    if task.num_examples() == 0 {
        bail!("no training examples");
    }
    // bf16: weights and activations in bf16, f32 masters and moments in the optimizer.
    let dtype = if args.bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    model = align_model::cast_float(model, dtype);
    std::fs::create_dir_all(output_dir.join("checkpoints")).with_context(|| output_dir.display().to_string())?;
    let device = model.devices().first().cloned().context("the model has no device")?;
    let total = args.total_steps(task.num_examples());
    let warmup = args.warmup(total);
    let mut loader = Loader::new(task.num_examples(), args.per_device_train_batch_size, args.seed, true);
    let mut opt = AdamW::<B>::new(args.adamw());
    let mut step = 0usize;
    let metrics_path = output_dir.join("metrics.jsonl");
    let mut metrics: Vec<StepMetrics> = Vec::new();

    if let Some((s, dir)) = resume_point(output_dir, resume)? {
        let state: TrainerState = read_state(&dir, args.seed, total)?;
        model = align_model::cast_float(task.load_weights(model, &dir)?, dtype);
        load_optimizer::<B>(&mut opt, &dir.join("optimizer.safetensors"), &device)?;
        opt.step = s as u64;
        loader.restore(state.loader);
        step = s;
        // Keep the metrics up to the checkpoint; the resumed run rewrites what follows.
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            for line in text.lines() {
                let m: StepMetrics =
                    serde_json::from_str(line).with_context(|| format!("{}", metrics_path.display()))?;
                if m.step <= s {
                    metrics.push(m);
                }
            }
        }
        tracing::info!(step = s, checkpoint = %dir.display(), "resumed");
    }
    {
        let mut f = std::fs::File::create(&metrics_path)?;
        for m in &metrics {
            writeln!(f, "{}", serde_json::to_string(m)?)?;
        }
    }
    let mut metrics_file = std::fs::OpenOptions::new().append(true).open(&metrics_path)?;
    let progress = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    progress.set_position(step as u64);
    let batches_per_epoch = loader.batches_per_epoch() as f64;
    if args.eval_on_start
        && step == 0
        && let Some(e) = task.evaluate(&model)?
    {
        let m = StepMetrics::before_training(Some(e.loss), &e.metrics);
        tracing::info!(eval_loss = e.loss, "eval before training");
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        metrics.push(m);
    }
    let (mut window_loss, mut window_tokens, mut window_start) = (0.0f64, 0usize, Instant::now());
    let (mut window_metrics, mut window_units) = (BTreeMap::<String, f64>::new(), 0usize);

    while step < total {
        let t0 = Instant::now();
        let lr = learning_rate(args.learning_rate, args.lr_scheduler_type, step, warmup, total, args.num_cycles);
        // Dropout draws from the backend RNG: seed it per step so a resumed run draws the same.
        B::seed(&device, args.seed.wrapping_add(step as u64));
        let micro: Vec<Vec<usize>> = (0..args.gradient_accumulation_steps).map(|_| loader.next_batch()).collect();
        let tokens: usize = micro.iter().map(|b| task.loss_tokens(b)).sum();
        let fed: usize = micro.iter().map(|b| task.input_tokens(b)).sum();
        if tokens == 0 {
            bail!("step {}: the batch has no tokens in the loss (all completions truncated away?)", step + 1);
        }
        let mut accumulated: Option<GradientsParams> = None;
        let mut loss_sum = 0.0f64;
        for b in &micro {
            let LossTerms { sum, count: n, metrics: stage_metrics } = task.loss_sum(&model, b)?;
            for (k, v) in stage_metrics {
                *window_metrics.entry(k.to_string()).or_default() += v;
            }
            window_units += n;
            if n != task.loss_tokens(b) {
                bail!(
                    "step {}: the task counted {} loss tokens but its loss covers {n}",
                    step + 1,
                    task.loss_tokens(b)
                );
            }
            let loss = sum / tokens as f64;
            let value: f64 = loss.clone().into_scalar().elem();
            loss_sum += value;
            accumulated = Some(accumulate(&model, loss, accumulated));
        }
        if !loss_sum.is_finite() {
            bail!(
                "step {}: loss is {loss_sum}; stopping. The last good checkpoint is intact under {}",
                step + 1,
                output_dir.join("checkpoints").display()
            );
        }
        let grads = accumulated.expect("at least one micro-batch");
        let norm;
        (model, norm) = clipped_step(&mut opt, model, grads, lr, args.max_grad_norm);
        step += 1;
        window_loss += loss_sum;
        window_tokens += fed;
        progress.set_position(step as u64);
        progress.set_message(format!(
            "loss {loss_sum:.4} lr {lr:.2e} {:.0} tok/s",
            fed as f64 / t0.elapsed().as_secs_f64().max(1e-9)
        ));

        let eval = match args.eval_steps {
            Some(e) if e > 0 && (step.is_multiple_of(e) || step == total) => task.evaluate(&model)?,
            _ => None,
        };
        let eval_loss = eval.as_ref().map(|e| e.loss);
        if step.is_multiple_of(args.logging_steps.max(1)) || step == total || eval_loss.is_some() {
            let n = (step - metrics.last().map_or(0, |m| m.step)).max(1);
            let elapsed = window_start.elapsed().as_secs_f64();
            let m = StepMetrics {
                step,
                epoch: loader.state().epoch as f64 + loader.state().batch as f64 / batches_per_epoch,
                loss: Some(window_loss / n as f64),
                learning_rate: lr,
                grad_norm: norm,
                tokens_per_second: window_tokens as f64 / elapsed.max(1e-9),
                step_seconds: t0.elapsed().as_secs_f64(),
                eval_loss,
                extra: window_metrics
                    .iter()
                    .map(|(k, v)| (k.clone(), v / window_units.max(1) as f64))
                    .chain(eval.iter().flat_map(|e| e.metrics.iter().map(|(k, v)| (format!("eval_{k}"), *v))))
                    .collect(),
            };
            writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
            metrics_file.flush()?;
            tracing::info!(
                step,
                loss = %crate::logfmt::opt(m.loss),
                lr = %crate::logfmt::Sig(lr),
                grad_norm = %crate::logfmt::Sig(norm),
                tokens_per_s = m.tokens_per_second as u64,
                eval_loss = %crate::logfmt::opt(m.eval_loss),
                metrics = %crate::logfmt::map(&m.extra),
                "train"
            );
            metrics.push(m);
            (window_loss, window_tokens, window_start) = (0.0, 0, Instant::now());
            (window_metrics, window_units) = (BTreeMap::new(), 0);
        }
        if args.save_steps > 0 && step.is_multiple_of(args.save_steps) && step < total {
            let state = TrainerState { step, loader: loader.state(), seed: args.seed, total_steps: total };
            write_checkpoint(task, &model, &opt, &state, &metrics, output_dir, args.save_total_limit)?;
        }
    }
    progress.finish_and_clear();
    let model = if args.bf16 { opt.model_with_masters(model) } else { model };
    Ok(TrainOutcome { model, steps: step, metrics })
}

fn write_checkpoint<B: AutodiffBackend, T: TrainTask<B>>(
    task: &T,
    model: &T::Model,
    opt: &AdamW<B>,
    state: &TrainerState,
    metrics: &[StepMetrics],
    output_dir: &Path,
    keep: Option<usize>,
) -> Result<()> {
    let save = |dir: &Path| task.save_weights(model, dir);
    write_checkpoint_with(&save, opt, state.step, &serde_json::to_value(state)?, metrics, output_dir, keep)
}

/// Write `checkpoints/step-N/` atomically: the trainable weights (`save`), the optimizer,
/// `metrics.json` and, last, `trainer_state.json` (`state`), whose presence marks the
/// checkpoint complete; keep the newest `keep`.
pub(crate) fn write_checkpoint_with<B: AutodiffBackend>(
    save: &dyn Fn(&Path) -> Result<()>,
    opt: &AdamW<B>,
    step: usize,
    state: &serde_json::Value,
    metrics: &[StepMetrics],
    output_dir: &Path,
    keep: Option<usize>,
) -> Result<()> {
    let dir = output_dir.join("checkpoints").join(format!("step-{step}"));
    let tmp = output_dir.join("checkpoints").join(format!("step-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    save(&tmp)?;
    save_optimizer(opt, &tmp.join("optimizer.safetensors"))?;
    let json = json!({"state": state, "metrics": metrics});
    let text = serde_json::to_string_pretty(&json)?;
    // trainer_state.json last: its presence marks the checkpoint complete.
    let state_text = serde_json::to_string_pretty(state)?;
    write_atomic(&tmp.join("metrics.json"), text.as_bytes())?;
    write_atomic(&tmp.join("trainer_state.json"), state_text.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)?;
    if let Some(k) = keep {
        let all = checkpoints(output_dir);
        for (_, old) in all.iter().take(all.len().saturating_sub(k.max(1))) {
            std::fs::remove_dir_all(old).ok();
        }
    }
    tracing::info!(checkpoint = %dir.display(), "saved");
    Ok(())
}

/// Backpropagate a micro-batch's loss and add its gradients to those accumulated so far.
pub(crate) fn accumulate<B: AutodiffBackend, M: AutodiffModule<B>>(
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

/// Clip the global gradient norm to `max_grad_norm` (0: off) and take an AdamW step;
/// returns the model and the norm before clipping.
pub(crate) fn clipped_step<B: AutodiffBackend, M: AutodiffModule<B>>(
    opt: &mut AdamW<B>,
    model: M,
    grads: GradientsParams,
    lr: f64,
    max_grad_norm: f64,
) -> (M, f64) {
    let norm = grad_norm::<B, _>(&model, &grads);
    let scale = if max_grad_norm > 0.0 && norm > max_grad_norm { max_grad_norm / (norm + 1e-6) } else { 1.0 };
    (opt.step(model, grads, lr, scale), norm)
}

/// Element-wise sum of two gradient sets (gradient accumulation).
pub(crate) fn add_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
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

/// Save what a stage trains: the PEFT adapter (plus a reward model's score head, which
/// LoRA trains in full, in `score.safetensors`), or the whole model in HF names.
pub fn save_trainable<B: Backend>(
    model: &Transformer<B>,
    lora: Option<&LoraConfig>,
    head: HfHead,
    dir: &Path,
) -> Result<()> {
    match lora {
        Some(cfg) => {
            align_lora::save_peft(&mut model.clone(), cfg, "base", dir)?;
            if head == HfHead::SequenceClassification {
                let full = export(model, head)?;
                let mut score = TensorMap::default();
                if let Some(t) = full.0.get("score.weight") {
                    score.0.insert("score.weight".into(), t.clone());
                }
                save_safetensors(&score, &dir.join("score.safetensors"))?;
            }
        }
        None => save_safetensors(&export(model, head)?, &dir.join("model.safetensors"))?,
    }
    Ok(())
}

/// Inverse of [`save_trainable`] onto the starting model.
pub fn load_trainable<B: Backend>(
    model: Transformer<B>,
    lora: Option<&LoraConfig>,
    config: &ModelConfig,
    heads: Heads,
    dir: &Path,
    device: &B::Device,
) -> Result<Transformer<B>> {
    Ok(match lora {
        Some(_) => {
            let mut base = model;
            for (_, p) in base.projections_mut() {
                p.adapter = None;
            }
            let mut m = align_lora::load_peft(base, dir)?.0;
            let score = dir.join("score.safetensors");
            if score.exists() {
                let mut src = SafetensorsSource::open_files(&[score])?;
                let t = align_model::WeightSource::load(&mut src, "score.weight")?;
                let [out, inp] = [t.shape[0], t.shape[1]];
                // HF stores [out, in]; Burn's Linear holds [in, out].
                let w = Tensor::<B, 2>::from_data(TensorData::new(t.data, [out, inp]), device).transpose();
                if let Some(s) = m.score.as_mut() {
                    s.weight = Param::from_tensor(w).set_require_grad(true);
                }
            }
            m
        }
        None => {
            let mut src = SafetensorsSource::open_files(&[dir.join("model.safetensors")])?;
            align_model::build::<B>(config, &mut src, heads, device)?
        }
    })
}
