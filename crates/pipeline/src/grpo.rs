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
use std::path::PathBuf;

use align_data::GenerationPrompt;
use align_lora::LoraConfig;
use align_losses::grpo::{GrpoLossType, grpo_advantages, grpo_aggregate, grpo_clip_metrics, grpo_per_token_loss};
use align_losses::masked_mean;
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::{ElementConversion, Tensor};
use align_model::{AutodiffFusedOps, FusedOps, Heads, ModelConfig, Transformer};
use anyhow::{Context, Result};

use crate::config::StageConfig;
pub use crate::config::grpo::{GrpoPlan, GrpoSettings, LengthNormalization, LossVariant};
use align_rollout::{Generation, Rollouts};

use crate::rl::{
    GroupBatch, GroupStage, Groups, OnlineData, completion_batch, completion_forward, completion_mask, host_rows,
    mean_std, prompts_per_generation, rows_tensor, sample_and_score,
};
use crate::stage::{StageMain, frozen_copy, on_autodiff, starting_model};
use crate::train::{MicroLoss, Round, train};

/// Sampling at `temperature` with the stage's settings.
fn sampling(s: &GrpoSettings, temperature: f32) -> Generation {
    let (k, p, stop) = (s.top_k, s.top_p, &s.stop_strings);
    Generation::new(temperature, k, p, s.max_completion_length, s.min_new_tokens, stop, s.include_stop_str_in_output)
}

/// Run (or resume) the GRPO stage on backend `B`; returns `final/`.
pub fn run_grpo<B: FusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    on_autodiff::<B, _>(cfg, Grpo { cfg, resume }, device)
}

/// GRPO as a [`Stage`]: a round samples one generation batch of `num_generations`
/// completions per prompt and trains on it for `num_iterations` steps.
struct GrpoStage<B: AutodiffFusedOps> {
    data: OnlineData,
    s: GrpoSettings,
    plan: GrpoPlan,
    /// The reference without LoRA (under LoRA: the policy with its adapters disabled).
    frozen: Option<Transformer<B::InnerBackend>>,
    config: ModelConfig,
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

impl<B: AutodiffFusedOps> GrpoStage<B> {
    fn lora(&self) -> Option<&LoraConfig> {
        self.data.cfg.lora.as_ref()
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
        prompts: &[&GenerationPrompt],
        round: Round,
    ) -> Result<(Batch, Vec<serde_json::Value>)> {
        let s = &self.s;
        let sampling = sampling(s, s.temperature);
        let (seed, first_row) = (round.generation_seed(), (round.first_item * s.num_generations) as u64);
        let (tok, rewards) = (&self.data.tok, &self.data.rewards);
        let g = sample_and_score(policy, tok, prompts, s.num_generations, &sampling, seed, first_row, rewards)?;
        let weights: Vec<f64> = self.data.rewards.iter().map(|(_, w)| *w).collect();
        // Over the whole batch (every replica's groups): `scale_rewards = "batch"` and the
        // logged statistics are the batch's, as on one device.
        let adv = grpo_advantages(&g.view.per_func, &weights, s.num_generations, &self.plan.advantages)
            .map_err(anyhow::Error::msg)?;
        let mut m = g.metrics.clone();
        let total: Vec<f64> = adv.rewards.iter().flatten().copied().collect();
        let (mean, std) = mean_std(&total);
        m.insert("reward".into(), mean);
        m.insert("reward_std".into(), std);
        m.insert("frac_reward_zero_std".into(), adv.frac_reward_zero_std);
        // DAPO's normaliser: the active completion tokens of the whole batch.
        let view = &g.view;
        let active: f64 = (view.lengths.iter().zip(&view.truncated))
            .filter(|&(_, &t)| !(t && s.mask_truncated_completions))
            .map(|(&l, _)| l.min(s.max_completion_length) as f64)
            .sum();
        let n = g.rollouts.len();
        let (own_rewards, own_advantages) = (view.own(&adv.rewards, n), view.own(&adv.advantages, n).to_vec());
        let bs = self.data.cfg.training.per_device_train_batch_size;
        let ref_logps = reference
            .filter(|_| s.beta != 0.0)
            .map(|m| g.reference_logps(m, self.data.pad, s.temperature, bs, &self.device));
        let rows = g.log_rows(round.step + 1, prompts, &self.data.rewards, own_rewards, &own_advantages);
        let batch = Batch {
            prompts: g.prompts,
            rollouts: g.rollouts,
            advantages: own_advantages,
            ref_logps,
            active_tokens: active,
            metrics: m,
        };
        Ok((batch, rows))
    }
}

impl<B: AutodiffFusedOps> GroupStage<B> for GrpoStage<B> {
    type Batch = Batch;

    fn data(&self) -> &OnlineData {
        &self.data
    }

    fn data_mut(&mut self) -> &mut OnlineData {
        &mut self.data
    }

    fn group(&self) -> (usize, usize) {
        (self.s.num_generations, self.s.num_iterations)
    }

    fn log_completions(&self) -> bool {
        self.s.log_completions
    }

    fn eval_sampling(&self) -> Generation {
        sampling(&self.s, self.s.eval_temperature)
    }

    fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> &B::Device {
        &self.device
    }

    fn sample(&mut self, model: &Transformer<B>, draws: &[Vec<usize>], round: Round) -> Result<Batch> {
        let prompts = self.data.prompts(draws);
        let policy = model.valid();
        let adapters_off = (self.s.beta != 0.0 && self.lora().is_some()).then(|| {
            let mut m = policy.clone();
            m.set_adapters_enabled(false);
            m
        });
        let reference = self.frozen.as_ref().or(adapters_off.as_ref());
        let (batch, rows) = self.generate(&policy, reference, &prompts, round)?;
        self.data.log(&rows)?;
        Ok(batch)
    }

    /// The loss of micro-batch `idx` of `batch` (scaled for accumulation), with metrics.
    fn group_loss(
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
        let cb = completion_batch::<B>(&prompts, &comps, self.data.pad, &self.device);
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
        Ok(MicroLoss { loss, metrics, metrics_with_units: vec![], units: 1.0, fed_tokens })
    }
}

impl GroupBatch for Batch {
    fn completions(&self) -> usize {
        self.rollouts.len()
    }

    fn metrics(&self) -> &BTreeMap<String, f64> {
        &self.metrics
    }
}

#[derive(Clone)]
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
        let data = OnlineData::load::<A::InnerBackend>("grpo", cfg, start.tokenizer, start.pad_id, &s.rewards, device)?;
        tracing::info!(
            prompts = data.train.len(),
            prompts_per_generation,
            completions_per_generation = prompts_per_generation * s.num_generations,
            "GRPO"
        );
        let model = start.model;
        // Under LoRA the reference is the policy with adapters disabled (taken per generation).
        let frozen = (s.beta != 0.0 && cfg.lora.is_none()).then(|| frozen_copy(&model, args.bf16));
        let stage = GrpoStage::<A> { data, s, plan, frozen, config: model.config.clone(), device: device.clone() };
        train(&mut Groups(stage), model, args, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}
