//! GRPO (`align grpo`): Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300) as TRL's
//! `GRPOTrainer` runs it, with the CS336 ablation switches as named options.
//!
//! One generation batch holds `per_device_train_batch_size × gradient_accumulation_steps`
//! completions, `num_generations` per prompt. Each is scored by the reward functions,
//! turned into group-relative advantages, then trained on for `num_iterations` optimizer
//! steps (each a pass over its micro-batches). With one iteration the update is on-policy
//! (ratio 1 with the policy's gradient); with more, later passes are off-policy and use
//! the sampler's log-probs as the old policy's (they equal a fresh forward's within 1e-4:
//! align-rollout's tests), so no extra forward is spent on them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use align_data::Loader;
use align_losses::grpo::{
    AdvantageConfig, GrpoLossType, GrpoObjective, MultiObjective, ScaleRewards, grpo_advantages, grpo_aggregate,
    grpo_clip_metrics, grpo_per_token_loss,
};
use align_losses::masked_mean;
use align_model::AutodiffFusedOps;
use align_model::FusedOps;
use align_model::burn::backend::Autodiff;
use align_model::burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use align_model::burn::module::AutodiffModule;
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::{ElementConversion, FloatDType, Tensor};
use align_model::{Heads, HfHead, Tokenizer, Transformer, load_pretrained};
use align_reward::{Reward, RewardTerm, build_terms};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::StageConfig;
use crate::optim::{AdamW, learning_rate};
use crate::rl::{
    Generation, MetricWindow, RlPrompt, RlState, Rollouts, RunLogs, completion_batch, completion_forward,
    completion_mask, evaluate_prompts, export_policy, host_rows, load_prompts, mean_std, rollout, rows_tensor,
    score_rollouts,
};
use crate::trainer::{
    StepMetrics, accumulate, clipped_step, load_optimizer, load_trainable, read_state, resume_point, save_trainable,
};

/// The CS336 loss variants, by the seed's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossVariant {
    /// `−r·log π`: the raw reward as advantage, no baseline, no normalisation.
    NoBaseline,
    /// `−A·log π` with group-normalised A: the policy gradient, never importance-weighted.
    ReinforceWithBaseline,
    /// The clipped surrogate `−min(ρA, clip(ρ)A)` (GRPO).
    GrpoClip,
    /// `−ρA`: the surrogate without clipping.
    GrpoNoClip,
}

/// CS336's length normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthNormalization {
    /// Each sequence's token mean, then the batch mean (= loss_type grpo).
    MaskedMean,
    /// Token sums over a constant, `B · max_completion_length` (= loss_type dr_grpo).
    MaskedNormalize,
}

/// `[grpo]`: TRL `GRPOConfig` names; the CS336 switches override what they name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSettings {
    /// The reward functions and their weights (see align-reward's `RewardSpec`). Required.
    pub rewards: Vec<RewardTerm>,
    /// Completions per prompt, G. Default 8.
    pub num_generations: usize,
    /// Tokens per completion at most. Default 256.
    pub max_completion_length: usize,
    /// Default 1.0.
    pub temperature: f32,
    /// Default 1.0 (off).
    pub top_p: f32,
    /// Default 0 (off).
    pub top_k: usize,
    /// Default 0.
    pub min_new_tokens: usize,
    /// Strings that end a completion (e.g. "</answer>"). Default none.
    pub stop_strings: Vec<String>,
    /// Keep the stop string in the completion. Default true.
    pub include_stop_str_in_output: bool,
    /// KL coefficient β against the reference (adapters disabled under LoRA, else a frozen
    /// copy); 0 loads no reference. Default 0.0.
    pub beta: f64,
    /// ε of the clipped surrogate. Default 0.2.
    pub epsilon: f64,
    /// Upper ε (DAPO uses 0.28). Default: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// grpo | bnpo | dr_grpo | dapo. Default dapo.
    pub loss_type: GrpoLossType,
    /// group | batch | none. Default group.
    pub scale_rewards: ScaleRewards,
    /// Added to the std in advantages: 1e-4 (TRL); CS336 uses 1e-6. Default 1e-4.
    pub advantage_eps: f64,
    /// sum_then_normalize | normalize_then_sum. Default sum_then_normalize.
    pub multi_objective_aggregation: MultiObjective,
    /// Optimizer steps per generation batch (CS336 `epochs_per_rollout_batch`). Default 1.
    pub num_iterations: usize,
    /// Completions that hit `max_completion_length` are left out of the loss. Default false.
    pub mask_truncated_completions: bool,
    /// Multiply the k3 KL by the ratio (TRL ≥ 1.10). Default true.
    pub use_bias_correction_kl: bool,
    /// CS336 `loss_type`: no_baseline | reinforce_with_baseline | grpo_clip | grpo_no_clip.
    /// Default none (grpo_clip with TRL's settings).
    pub loss_variant: Option<LossVariant>,
    /// CS336 masked_mean | masked_normalize; overrides `loss_type`. Default none.
    pub length_normalization: Option<LengthNormalization>,
    /// CS336 `use_std_normalization`; false sets `scale_rewards = none`. Default none.
    pub use_std_normalization: Option<bool>,
    /// Temperature of the held-out evaluation (0 = greedy). Default 0.0.
    pub eval_temperature: f32,
    /// Write every completion with its rewards to `completions.jsonl`. Default true.
    pub log_completions: bool,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        GrpoSettings {
            rewards: vec![],
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_new_tokens: 0,
            stop_strings: vec![],
            include_stop_str_in_output: true,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: GrpoLossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            advantage_eps: 1e-4,
            multi_objective_aggregation: MultiObjective::SumThenNormalize,
            num_iterations: 1,
            mask_truncated_completions: false,
            use_bias_correction_kl: true,
            loss_variant: None,
            length_normalization: None,
            use_std_normalization: None,
            eval_temperature: 0.0,
            log_completions: true,
        }
    }
}

/// The settings resolved into what the losses take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoPlan {
    pub advantages: AdvantageConfig,
    pub objective: GrpoObjective,
    pub loss_type: GrpoLossType,
    /// Off-policy passes weight by the ratio to the sampler's log-probs (false: the plain
    /// policy gradient, REINFORCE variants).
    pub importance_weighted: bool,
}

impl GrpoSettings {
    pub fn plan(&self) -> Result<GrpoPlan> {
        if self.rewards.is_empty() {
            bail!("[grpo] needs at least one reward function: [[grpo.rewards]] kind = \"r1_zero\", …");
        }
        if self.num_generations < 2 && self.scale_rewards == ScaleRewards::Group {
            bail!("num_generations must be at least 2 for group-normalised advantages");
        }
        if self.num_iterations == 0 {
            bail!("num_iterations must be at least 1");
        }
        let (lo, hi) = (self.epsilon, self.epsilon_high.unwrap_or(self.epsilon));
        let mut scale = self.scale_rewards;
        if self.use_std_normalization == Some(false) {
            scale = ScaleRewards::None;
        } else if self.use_std_normalization == Some(true) && scale == ScaleRewards::None {
            scale = ScaleRewards::Group;
        }
        let mut advantages = AdvantageConfig {
            scale_rewards: scale,
            multi_objective: self.multi_objective_aggregation,
            eps: self.advantage_eps,
            baseline: true,
        };
        let (clip, importance_weighted) = match self.loss_variant {
            None | Some(LossVariant::GrpoClip) => (Some((lo, hi)), true),
            Some(LossVariant::GrpoNoClip) => (None, true),
            Some(LossVariant::ReinforceWithBaseline) => (None, false),
            Some(LossVariant::NoBaseline) => {
                advantages.baseline = false;
                advantages.scale_rewards = ScaleRewards::None;
                (None, false)
            }
        };
        let loss_type = match self.length_normalization {
            Some(LengthNormalization::MaskedMean) => GrpoLossType::Grpo,
            Some(LengthNormalization::MaskedNormalize) => GrpoLossType::DrGrpo,
            None => self.loss_type,
        };
        Ok(GrpoPlan {
            advantages,
            objective: GrpoObjective { clip, beta: self.beta, use_bias_correction_kl: self.use_bias_correction_kl },
            loss_type,
            importance_weighted,
        })
    }

    fn generation(&self, temperature: f32) -> Generation {
        Generation {
            temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_completion_length,
            min_new_tokens: self.min_new_tokens,
            stop_strings: self.stop_strings.clone(),
            include_stop_str_in_output: self.include_stop_str_in_output,
        }
    }
}

/// Run (or resume) the GRPO stage on backend `B`; returns `final/`.
pub fn run_grpo<B: FusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    if cfg.training.gradient_checkpointing {
        grpo_on::<Autodiff<B, BalancedCheckpointing>>(cfg, resume, device)
    } else {
        grpo_on::<Autodiff<B>>(cfg, resume, device)
    }
}

struct Stage<'a, B: AutodiffFusedOps> {
    cfg: &'a StageConfig,
    s: &'a GrpoSettings,
    plan: GrpoPlan,
    tok: &'a Tokenizer,
    pad: u32,
    rewards: Vec<(Box<dyn Reward>, f64)>,
    device: B::Device,
}

/// One generation batch ready for training.
struct Batch {
    prompts: Vec<Vec<u32>>,
    rollouts: Rollouts,
    advantages: Vec<f64>,
    ref_logps: Option<Vec<Vec<f64>>>,
    /// Active completion tokens of the whole batch (DAPO's normaliser).
    active_tokens: f64,
    metrics: BTreeMap<String, f64>,
}

impl<B: AutodiffFusedOps> Stage<'_, B> {
    fn evaluate(
        &self,
        policy: &Transformer<B::InnerBackend>,
        prompts: &[RlPrompt],
        step: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let sampling = self.s.generation(self.s.eval_temperature);
        let batch = self.cfg.training.per_device_train_batch_size;
        let seed = self.cfg.training.seed;
        let samples = self.cfg.output_dir.join(format!("eval/step-{step}.jsonl"));
        evaluate_prompts(policy, self.tok, &self.rewards, prompts, &sampling, batch, seed, &samples)
    }

    fn mask_of(&self, completions: &[&[u32]], truncated: &[bool], width: usize) -> Vec<Vec<f64>> {
        let exclude: Vec<bool> = truncated.iter().map(|&t| t && self.s.mask_truncated_completions).collect();
        completion_mask(completions, width, &exclude)
    }

    /// Sample, score and compute advantages (and reference log-probs) for one generation.
    fn generate(
        &self,
        policy: &Transformer<B::InnerBackend>,
        reference: Option<&Transformer<B::InnerBackend>>,
        prompts: &[&RlPrompt],
        seed: u64,
        step: usize,
        log: Option<&mut std::fs::File>,
    ) -> Result<Batch> {
        let s = self.s;
        let r = rollout(policy, self.tok, prompts, s.num_generations, &s.generation(s.temperature), seed);
        let scored = score_rollouts(&self.rewards, prompts, &r)?;
        let weights: Vec<f64> = self.rewards.iter().map(|(_, w)| *w).collect();
        let adv = grpo_advantages(&scored.per_func, &weights, s.num_generations, &self.plan.advantages)
            .map_err(anyhow::Error::msg)?;
        let mut m = BTreeMap::new();
        let total: Vec<f64> = adv.rewards.iter().flatten().copied().collect();
        let (mean, std) = mean_std(&total);
        m.insert("reward".into(), mean);
        m.insert("reward_std".into(), std);
        m.insert("frac_reward_zero_std".into(), adv.frac_reward_zero_std);
        for (k, (f, _)) in self.rewards.iter().enumerate() {
            let v: Vec<f64> = scored.per_func.iter().filter_map(|x| x[k]).collect();
            let (mean, std) = mean_std(&v);
            m.insert(format!("rewards/{}/mean", f.name()), mean);
            m.insert(format!("rewards/{}/std", f.name()), std);
        }
        for (c, v) in &scored.components {
            m.insert(format!("rewards/{c}"), mean_std(v).0);
        }
        let lens: Vec<f64> = r.completions.iter().map(|c| c.len() as f64).collect();
        m.insert("completions/mean_length".into(), mean_std(&lens).0);
        m.insert("completions/max_length".into(), lens.iter().copied().fold(0.0, f64::max));
        m.insert("completions/min_length".into(), lens.iter().copied().fold(f64::INFINITY, f64::min));
        m.insert(
            "completions/clipped_ratio".into(),
            r.truncated.iter().filter(|&&t| t).count() as f64 / r.len().max(1) as f64,
        );
        m.insert("rollout_tokens_per_second".into(), r.tokens() as f64 / r.seconds.max(1e-9));
        m.insert("rollout_seconds".into(), r.seconds);

        let prompt_ids: Vec<Vec<u32>> = r.prompt.iter().map(|&p| prompts[p].ids.clone()).collect();
        let refs: Vec<&[u32]> = r.completions.iter().map(Vec::as_slice).collect();
        let active: f64 = self.mask_of(&refs, &r.truncated, s.max_completion_length).iter().flatten().sum();
        let ref_logps = match reference {
            Some(reference) if s.beta != 0.0 => {
                let mut out = Vec::with_capacity(r.len());
                let bs = self.cfg.training.per_device_train_batch_size.max(1);
                for (ps, cs) in prompt_ids.chunks(bs).zip(refs.chunks(bs)) {
                    let pr: Vec<&[u32]> = ps.iter().map(Vec::as_slice).collect();
                    let batch = completion_batch::<B::InnerBackend>(&pr, cs, self.pad, &self.device);
                    let f = completion_forward(reference, &batch, s.temperature, false);
                    out.extend(host_rows(f.logps));
                }
                Some(out)
            }
            _ => None,
        };
        if let Some(f) = log {
            for i in 0..r.len() {
                let mut row = json!({
                    "step": step,
                    "prompt": prompts[r.prompt[i]].text,
                    "completion": r.texts[i],
                    "reward": adv.rewards[i],
                    "advantage": adv.advantages[i],
                    "tokens": r.completions[i].len(),
                    "truncated": r.truncated[i],
                });
                for (k, (func, _)) in self.rewards.iter().enumerate() {
                    row[func.name()] = json!(scored.per_func[i][k]);
                }
                for (c, v) in &scored.components {
                    row[c] = json!(v[i]);
                }
                writeln!(f, "{row}")?;
            }
            f.flush()?;
        }
        Ok(Batch {
            prompts: prompt_ids,
            rollouts: r,
            advantages: adv.advantages,
            ref_logps,
            active_tokens: active,
            metrics: m,
        })
    }

    /// The loss of micro-batch `idx` of `batch` (scaled for accumulation), with metrics.
    fn micro_loss(
        &self,
        model: &Transformer<B>,
        batch: &Batch,
        idx: &[usize],
        first_pass: bool,
        micro_batches: usize,
        window: &mut MetricWindow,
    ) -> Tensor<B, 1> {
        let s = self.s;
        let r = &batch.rollouts;
        let prompts: Vec<&[u32]> = idx.iter().map(|&i| batch.prompts[i].as_slice()).collect();
        let comps: Vec<&[u32]> = idx.iter().map(|&i| r.completions[i].as_slice()).collect();
        let cb = completion_batch::<B>(&prompts, &comps, self.pad, &self.device);
        let width = cb.completion_width;
        let truncated: Vec<bool> = idx.iter().map(|&i| r.truncated[i]).collect();
        let mask_host = self.mask_of(&comps, &truncated, width);
        let mask = rows_tensor::<B>(&mask_host, width, &self.device);
        let f = completion_forward(model, &cb, s.temperature, true);
        // On-policy (the first pass, or never importance-weighted): old = logp detached.
        let old = (!first_pass && self.plan.importance_weighted).then(|| {
            let rows: Vec<Vec<f64>> = idx.iter().map(|&i| r.logps[i].iter().map(|&x| x as f64).collect()).collect();
            rows_tensor::<B>(&rows, width, &self.device)
        });
        let reference = batch.ref_logps.as_ref().map(|rl| {
            let rows: Vec<Vec<f64>> = idx.iter().map(|&i| rl[i].clone()).collect();
            rows_tensor::<B>(&rows, width, &self.device)
        });
        let adv: Vec<f64> = idx.iter().map(|&i| batch.advantages[i]).collect();
        let adv_t = Tensor::<B, 1>::from_data(
            align_model::burn::tensor::TensorData::new(adv.clone(), [adv.len()]).convert::<B::FloatElem>(),
            &self.device,
        );
        let terms = grpo_per_token_loss(f.logps, old, reference, adv_t, &self.plan.objective);
        let loss = grpo_aggregate(
            terms.per_token_loss,
            mask.clone(),
            self.plan.loss_type,
            s.max_completion_length,
            batch.active_tokens,
        );
        // TRL: dapo's normaliser already covers the whole generation batch; the others
        // average over the accumulated micro-batches.
        let loss = match self.plan.loss_type {
            GrpoLossType::Dapo => loss,
            _ => loss / micro_batches as f64,
        };
        if let Some(kl) = terms.per_token_kl {
            window.add("kl", masked_mean(kl.detach(), mask.clone()).mean().into_scalar().elem::<f64>());
        }
        if let Some(e) = f.entropy {
            window.add("entropy", masked_mean(e, mask.clone()).mean().into_scalar().elem::<f64>());
        }
        let ratio = host_rows(terms.ratio.detach());
        let (lo, hi) = self.plan.objective.clip.unwrap_or((s.epsilon, s.epsilon_high.unwrap_or(s.epsilon)));
        let c = grpo_clip_metrics(&ratio, &adv, &mask_host, lo, hi);
        window.add("clip_ratio/low_mean", c.low_mean);
        window.add("clip_ratio/high_mean", c.high_mean);
        window.add("clip_ratio/region_mean", c.region_mean);
        loss
    }
}

fn grpo_on<B: AutodiffFusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    cfg.check_sections("grpo", Some("grpo"))?;
    let s = cfg.grpo.clone().context("the GRPO stage needs a [grpo] section with its reward functions")?;
    let plan = s.plan()?;
    let args = &cfg.training;
    let per_device = args.per_device_train_batch_size;
    let accumulation = args.gradient_accumulation_steps;
    if per_device == 0 || accumulation == 0 {
        bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
    }
    let generation_size = per_device * accumulation;
    if !generation_size.is_multiple_of(s.num_generations) {
        bail!(
            "per_device_train_batch_size × gradient_accumulation_steps = {generation_size} completions per generation \
             batch is not a multiple of num_generations = {}",
            s.num_generations
        );
    }
    let prompts_per_generation = generation_size / s.num_generations;

    let pre = load_pretrained::<B>(&cfg.model.path, Heads::LM, device)?;
    let tok = pre.tokenizer;
    let pad = tok.pad_token_id.or(tok.eos_token_id).context("the tokenizer has neither a pad nor an EOS token")?;
    let train_prompts = load_prompts(&tok, &cfg.data, &cfg.tokenize, "train")?;
    let eval_prompts = match &cfg.eval_data {
        Some(d) => load_prompts(&tok, d, &cfg.tokenize, "eval")?,
        None => vec![],
    };
    let rewards = build_terms::<B::InnerBackend>(&s.rewards, device)?;
    let mut model = pre.model;
    if let Some(l) = &cfg.lora {
        let (m, names) = align_lora::attach(model, l, args.seed)?;
        tracing::info!(modules = names.len(), r = l.r, "LoRA attached");
        model = m;
    }
    let dtype = if args.bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    model = align_model::cast_float(model, dtype);
    // Under LoRA the reference is the policy with adapters disabled (taken per generation).
    let frozen = (s.beta != 0.0 && cfg.lora.is_none()).then(|| model.valid());
    let model_config = model.config.clone();

    let batches_per_epoch = train_prompts.len().div_ceil(prompts_per_generation);
    let total = match args.max_steps {
        Some(n) => n,
        None => ((batches_per_epoch as f64 * args.num_train_epochs).ceil().max(1.0) as usize) * s.num_iterations,
    };
    let warmup = args.warmup(total);
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out.join("checkpoints")).with_context(|| out.display().to_string())?;
    std::fs::write(out.join("config.toml"), toml::to_string(cfg)?)?;
    let mut loader = Loader::new(train_prompts.len(), prompts_per_generation, args.seed, true);
    let mut opt = AdamW::<B>::new(args.adamw());
    let (mut step, mut generation) = (0usize, 0usize);
    let lora = cfg.lora.clone();
    let resumed = resume_point(out, resume)?;
    if let Some((at, dir)) = &resumed {
        let state: RlState = read_state(dir, args.seed, total)?;
        model = load_trainable(model, lora.as_ref(), &model_config, Heads::LM, dir, device)?;
        model = align_model::cast_float(model, dtype);
        load_optimizer::<B>(&mut opt, &dir.join("optimizer.safetensors"), device)?;
        opt.step = *at as u64;
        loader.restore(state.loader);
        (step, generation) = (*at, state.generation);
        tracing::info!(step = at, checkpoint = %dir.display(), "resumed");
    }
    let mut logs = RunLogs::open(out, resumed.map(|(at, _)| at))?;
    let stage = Stage::<B> { cfg, s: &s, plan, tok: &tok, pad, rewards, device: device.clone() };
    tracing::info!(
        prompts = train_prompts.len(),
        prompts_per_generation,
        completions_per_generation = generation_size,
        steps = total,
        "GRPO"
    );
    let progress = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    progress.set_position(step as u64);
    let eval_every = args.eval_steps.filter(|&e| e > 0 && !eval_prompts.is_empty());
    if args.eval_on_start && step == 0 && eval_every.is_some() {
        logs.log_eval_on_start(stage.evaluate(&model.valid(), &eval_prompts, 0)?)?;
    }

    let mut window = MetricWindow::default();
    let mut last_saved = step;
    let (mut window_loss, mut window_tokens, mut window_steps, mut window_start) =
        (0.0, 0usize, 0usize, Instant::now());
    while step < total {
        // A new generation batch from the current policy.
        let idx = loader.next_batch();
        let prompts: Vec<&RlPrompt> = idx.iter().map(|&i| &train_prompts[i]).collect();
        let policy = model.valid();
        let adapters_off = (s.beta != 0.0 && lora.is_some()).then(|| {
            let mut m = policy.clone();
            m.set_adapters_enabled(false);
            m
        });
        let batch = stage.generate(
            &policy,
            frozen.as_ref().or(adapters_off.as_ref()),
            &prompts,
            args.seed.wrapping_add(1_000_003 * generation as u64),
            step + 1,
            s.log_completions.then_some(&mut logs.completions),
        )?;
        generation += 1;
        let n = batch.rollouts.len();
        let order: Vec<usize> = (0..n).collect();
        let micro: Vec<&[usize]> = order.chunks(per_device).collect();
        for pass in 0..s.num_iterations {
            if step >= total {
                break;
            }
            let t0 = Instant::now();
            // Every step of a generation batch logs its rollout metrics.
            for (k, v) in &batch.metrics {
                window.add(k.clone(), *v);
            }
            let lr = learning_rate(args.learning_rate, args.lr_scheduler_type, step, warmup, total, args.num_cycles);
            B::seed(device, args.seed.wrapping_add(step as u64));
            let mut accumulated: Option<GradientsParams> = None;
            let mut loss_value = 0.0f64;
            let mut fed = 0usize;
            for chunk in &micro {
                let loss = stage.micro_loss(&model, &batch, chunk, pass == 0, micro.len(), &mut window);
                loss_value += loss.clone().into_scalar().elem::<f64>();
                fed +=
                    chunk.iter().map(|&i| batch.prompts[i].len() + batch.rollouts.completions[i].len()).sum::<usize>();
                accumulated = Some(accumulate(&model, loss, accumulated));
            }
            if !loss_value.is_finite() {
                bail!(
                    "step {}: loss is {loss_value}; stopping. The last good checkpoint is intact under {}",
                    step + 1,
                    out.join("checkpoints").display()
                );
            }
            let grads = accumulated.context("a generation batch with no micro-batches")?;
            let norm;
            (model, norm) = clipped_step(&mut opt, model, grads, lr, args.max_grad_norm);
            step += 1;
            window_loss += loss_value;
            window_tokens += fed;
            window_steps += 1;
            window.add("grad_norm", norm);
            window.add("train_tokens_per_second", fed as f64 / t0.elapsed().as_secs_f64().max(1e-9));
            progress.set_position(step as u64);
            progress.set_message(format!(
                "loss {loss_value:.4} reward {:.3}",
                batch.metrics.get("reward").copied().unwrap_or(f64::NAN)
            ));
            let eval = match eval_every {
                Some(e) if step.is_multiple_of(e) || step == total => {
                    Some(stage.evaluate(&model.valid(), &eval_prompts, step)?)
                }
                _ => None,
            };
            if step.is_multiple_of(args.logging_steps.max(1)) || step == total || eval.is_some() {
                let elapsed = window_start.elapsed().as_secs_f64();
                let mut extra = window.take();
                extra.remove("grad_norm");
                if let Some(e) = &eval {
                    extra.extend(e.iter().map(|(k, v)| (format!("eval_{k}"), *v)));
                }
                let m = StepMetrics {
                    step,
                    epoch: generation as f64 / batches_per_epoch as f64,
                    loss: Some(window_loss / window_steps.max(1) as f64),
                    learning_rate: lr,
                    grad_norm: norm,
                    tokens_per_second: window_tokens as f64 / elapsed.max(1e-9),
                    step_seconds: t0.elapsed().as_secs_f64(),
                    eval_loss: None,
                    extra,
                };
                tracing::info!(
                    step,
                    loss = %crate::logfmt::opt(m.loss),
                    reward = %crate::logfmt::opt(m.extra.get("reward").copied()),
                    kl = %crate::logfmt::opt(m.extra.get("kl").copied()),
                    eval_reward = %crate::logfmt::opt(m.extra.get("eval_reward").copied()),
                    "grpo"
                );
                logs.log(m)?;
                (window_loss, window_tokens, window_steps, window_start) = (0.0, 0, 0, Instant::now());
            }
            // Checkpoints fall between generation batches (nothing of a batch is saved): at
            // the first boundary at or after each multiple of save_steps.
            let boundary = pass + 1 == s.num_iterations;
            let due = args.save_steps > 0 && step / args.save_steps > last_saved / args.save_steps;
            if boundary && due && step < total {
                last_saved = step;
                let state = RlState {
                    step,
                    generation,
                    loader: loader.state(),
                    seed: args.seed,
                    total_steps: total,
                    kl_coef: None,
                };
                let save = |dir: &Path| save_trainable(&model, lora.as_ref(), HfHead::CausalLm, dir);
                logs.checkpoint(&save, &opt, &state, out, args.save_total_limit)?;
            }
        }
    }
    progress.finish_and_clear();
    let model = if args.bf16 { opt.model_with_masters(model) } else { model };
    let final_dir = out.join("final");
    export_policy(&model, lora.as_ref(), &cfg.model.path, &tok, &final_dir)?;
    tracing::info!(final_dir = %final_dir.display(), steps = step, "stage done");
    Ok(final_dir)
}
