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
use std::path::{Path, PathBuf};

use align_lora::LoraConfig;
use align_losses::grpo::{
    AdvantageConfig, GrpoLossType, GrpoObjective, MultiObjective, ScaleRewards, grpo_advantages, grpo_aggregate,
    grpo_clip_metrics, grpo_per_token_loss,
};
use align_losses::masked_mean;
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::{ElementConversion, Tensor};
use align_model::{AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Tokenizer, Transformer};
use align_reward::{Reward, RewardTerm, build_terms};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::StageConfig;
use crate::rl::{
    CompletionLog, Generation, RlPrompt, Rollouts, completion_batch, completion_forward, completion_mask,
    evaluate_prompts, host_rows, load_prompts, mean_std, prompts_per_generation, rows_tensor, sample_and_score,
};
use crate::stage::{StageMain, frozen_copy, on_autodiff, starting_model};
use crate::train::{Evaluation, MicroLoss, Round, Shape, Stage, export_policy, load_trainable, save_trainable, train};

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
    on_autodiff::<B, _>(cfg.training.gradient_checkpointing, Grpo { cfg, resume }, device)
}

/// GRPO as a [`Stage`]: a round samples one generation batch of `num_generations`
/// completions per prompt and trains on it for `num_iterations` steps.
struct GrpoStage<'a, B: AutodiffFusedOps> {
    cfg: &'a StageConfig,
    s: GrpoSettings,
    plan: GrpoPlan,
    tok: Tokenizer,
    pad: u32,
    rewards: Vec<(Box<dyn Reward>, f64)>,
    train_prompts: Vec<RlPrompt>,
    eval_prompts: Vec<RlPrompt>,
    /// The reference without LoRA (under LoRA: the policy with its adapters disabled).
    frozen: Option<Transformer<B::InnerBackend>>,
    config: ModelConfig,
    log: Option<CompletionLog>,
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

impl<B: AutodiffFusedOps> GrpoStage<'_, B> {
    fn lora(&self) -> Option<&LoraConfig> {
        self.cfg.lora.as_ref()
    }

    fn mask_of(&self, completions: &[&[u32]], truncated: &[bool], width: usize) -> Vec<Vec<f64>> {
        let exclude: Vec<bool> = truncated.iter().map(|&t| t && self.s.mask_truncated_completions).collect();
        completion_mask(completions, width, &exclude)
    }

    /// Sample, score and compute advantages (and reference log-probs) for one generation;
    /// also returns its `completions.jsonl` rows.
    fn generate(
        &self,
        policy: &Transformer<B::InnerBackend>,
        reference: Option<&Transformer<B::InnerBackend>>,
        prompts: &[&RlPrompt],
        seed: u64,
        step: usize,
    ) -> Result<(Batch, Vec<serde_json::Value>)> {
        let s = &self.s;
        let sampling = s.generation(s.temperature);
        let g = sample_and_score(policy, &self.tok, prompts, s.num_generations, &sampling, seed, &self.rewards)?;
        let weights: Vec<f64> = self.rewards.iter().map(|(_, w)| *w).collect();
        let adv = grpo_advantages(&g.scored.per_func, &weights, s.num_generations, &self.plan.advantages)
            .map_err(anyhow::Error::msg)?;
        let mut m = g.metrics.clone();
        let total: Vec<f64> = adv.rewards.iter().flatten().copied().collect();
        let (mean, std) = mean_std(&total);
        m.insert("reward".into(), mean);
        m.insert("reward_std".into(), std);
        m.insert("frac_reward_zero_std".into(), adv.frac_reward_zero_std);
        let r = &g.rollouts;
        let refs: Vec<&[u32]> = r.completions.iter().map(Vec::as_slice).collect();
        let active: f64 = self.mask_of(&refs, &r.truncated, s.max_completion_length).iter().flatten().sum();
        let bs = self.cfg.training.per_device_train_batch_size;
        let ref_logps = reference
            .filter(|_| s.beta != 0.0)
            .map(|m| g.reference_logps(m, self.pad, s.temperature, bs, &self.device));
        let rows = g.log_rows(step, prompts, &self.rewards, &adv.rewards, &adv.advantages);
        let batch = Batch {
            prompts: g.prompts,
            rollouts: g.rollouts,
            advantages: adv.advantages,
            ref_logps,
            active_tokens: active,
            metrics: m,
        };
        Ok((batch, rows))
    }
}

impl<B: AutodiffFusedOps> Stage<B> for GrpoStage<'_, B> {
    type Model = Transformer<B>;
    type Batch = Batch;

    fn shape(&self) -> Shape {
        let t = &self.cfg.training;
        Shape {
            items: self.train_prompts.len(),
            draw_size: t.per_device_train_batch_size * t.gradient_accumulation_steps / self.s.num_generations.max(1),
            draws_per_round: 1,
            steps_per_round: self.s.num_iterations,
            updates_per_step: 1,
        }
    }

    fn next_batch(&mut self, model: &Transformer<B>, draws: Vec<Vec<usize>>, round: Round) -> Result<Batch> {
        let prompts: Vec<&RlPrompt> = draws.concat().into_iter().map(|i| &self.train_prompts[i]).collect();
        let policy = model.valid();
        let adapters_off = (self.s.beta != 0.0 && self.lora().is_some()).then(|| {
            let mut m = policy.clone();
            m.set_adapters_enabled(false);
            m
        });
        let reference = self.frozen.as_ref().or(adapters_off.as_ref());
        let (batch, rows) = self.generate(&policy, reference, &prompts, round.generation_seed(), round.step + 1)?;
        if let Some(log) = self.log.as_mut() {
            log.write(&rows)?;
        }
        Ok(batch)
    }

    fn micro_batches(&self, batch: &Batch, _pass: usize, _update: usize) -> Vec<Vec<usize>> {
        let order: Vec<usize> = (0..batch.rollouts.len()).collect();
        order.chunks(self.cfg.training.per_device_train_batch_size.max(1)).map(<[usize]>::to_vec).collect()
    }

    /// The loss of micro-batch `idx` of `batch` (scaled for accumulation), with metrics.
    fn loss(
        &self,
        model: &Transformer<B>,
        batch: &Batch,
        pass: usize,
        idx: &[usize],
        micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let s = &self.s;
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
        let old = (pass > 0 && self.plan.importance_weighted).then(|| {
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
        let mut metrics = vec![];
        if let Some(kl) = terms.per_token_kl {
            metrics.push(("kl", masked_mean(kl.detach(), mask.clone()).mean().into_scalar().elem::<f64>()));
        }
        if let Some(e) = f.entropy {
            metrics.push(("entropy", masked_mean(e, mask.clone()).mean().into_scalar().elem::<f64>()));
        }
        let ratio = host_rows(terms.ratio.detach());
        let (lo, hi) = self.plan.objective.clip.unwrap_or((s.epsilon, s.epsilon_high.unwrap_or(s.epsilon)));
        let c = grpo_clip_metrics(&ratio, &adv, &mask_host, lo, hi);
        metrics.push(("clip_ratio/low_mean", c.low_mean));
        metrics.push(("clip_ratio/high_mean", c.high_mean));
        metrics.push(("clip_ratio/region_mean", c.region_mean));
        let fed_tokens = prompts.iter().chain(&comps).map(|x| x.len()).sum();
        Ok(MicroLoss { loss, metrics, units: 1.0, fed_tokens })
    }

    fn batch_metrics(&self, batch: &Batch) -> Vec<(String, f64)> {
        batch.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn open_logs(&mut self, output_dir: &Path, resumed_at: Option<usize>) -> Result<()> {
        if self.s.log_completions {
            self.log = Some(CompletionLog::open(output_dir, resumed_at)?);
        }
        Ok(())
    }

    fn evaluate(&mut self, model: &Transformer<B>, step: usize) -> Result<Option<Evaluation>> {
        if self.eval_prompts.is_empty() {
            return Ok(None);
        }
        let t = &self.cfg.training;
        let samples = self.cfg.output_dir.join(format!("eval/step-{step}.jsonl"));
        let sampling = self.s.generation(self.s.eval_temperature);
        let (policy, prompts) = (model.valid(), &self.eval_prompts);
        let metrics = evaluate_prompts(
            &policy,
            &self.tok,
            &self.rewards,
            prompts,
            &sampling,
            t.per_device_train_batch_size,
            t.seed,
            &samples,
        )?;
        Ok(Some(Evaluation { loss: None, metrics }))
    }

    fn save_weights(&self, model: &Transformer<B>, dir: &Path) -> Result<()> {
        save_trainable(model, self.lora(), HfHead::CausalLm, dir)
    }

    fn load_weights(&self, model: Transformer<B>, dir: &Path) -> Result<Transformer<B>> {
        load_trainable(model, self.lora(), &self.config, Heads::LM, dir, &self.device)
    }

    fn export(&self, model: &Transformer<B>, final_dir: &Path) -> Result<()> {
        export_policy(model, self.lora(), &self.cfg.model.path, &self.tok, HfHead::CausalLm, final_dir)
    }

    fn headline(&self) -> &'static [&'static str] {
        &["reward", "kl", "eval_reward"]
    }

    fn progress(&self, batch: &Batch) -> String {
        format!("reward {}", crate::logfmt::opt(batch.metrics.get("reward").copied()))
    }
}

struct Grpo<'a> {
    cfg: &'a StageConfig,
    resume: bool,
}

impl StageMain for Grpo<'_> {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf> {
        let cfg = self.cfg;
        cfg.check_sections("grpo", Some("grpo"))?;
        let s = cfg.grpo.clone().context("the GRPO stage needs a [grpo] section with its reward functions")?;
        let plan = s.plan()?;
        let args = &cfg.training;
        let prompts_per_generation = prompts_per_generation(args, s.num_generations)?;
        let start = starting_model::<A>(cfg, Heads::LM, device)?;
        let tok = start.tokenizer;
        let train_prompts = load_prompts(&tok, &cfg.data, &cfg.tokenize, "train")?;
        let eval_prompts = match &cfg.eval_data {
            Some(d) => load_prompts(&tok, d, &cfg.tokenize, "eval")?,
            None => vec![],
        };
        let rewards = build_terms::<A::InnerBackend>(&s.rewards, device)?;
        tracing::info!(
            prompts = train_prompts.len(),
            prompts_per_generation,
            completions_per_generation = prompts_per_generation * s.num_generations,
            "GRPO"
        );
        let model = start.model;
        // Under LoRA the reference is the policy with adapters disabled (taken per generation).
        let frozen = (s.beta != 0.0 && cfg.lora.is_none()).then(|| frozen_copy(&model, args.bf16));
        let mut stage = GrpoStage::<A> {
            cfg,
            s,
            plan,
            tok,
            pad: start.pad_id,
            rewards,
            train_prompts,
            eval_prompts,
            frozen,
            config: model.config.clone(),
            log: None,
            device: device.clone(),
        };
        train(&mut stage, model, args, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}
