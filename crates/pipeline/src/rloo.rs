//! RLOO (`align rloo`): REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024,
//! arXiv:2402.14740), as TRL's `RLOOTrainer` runs it. Each prompt gets `num_generations`
//! completions; a completion's reward carries its summed KL to the reference as a penalty,
//! its advantage is its reward less the mean of its siblings', and the update is a clipped
//! surrogate on whole-sequence log-probs (the math is `align_losses::rloo`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use align_losses::grpo::grpo_clip_metrics;
use align_losses::rloo::{rloo_advantages, rloo_loss};
use align_losses::{masked_mean, sequence_logprobs};
use align_model::burn::module::AutodiffModule;
use align_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use align_model::{AutodiffFusedOps, Heads, ModelConfig, Transformer};
use anyhow::{Context, Result, bail};

use crate::config::StageConfig;
pub use crate::config::rloo::RlooSettings;
use align_rollout::{Generation, Rollouts};

use crate::rl::{
    GroupBatch, GroupStage, Groups, OnlineData, completion_batch, completion_forward, completion_mask, mean_std,
    prompts_per_generation, rows_tensor, sample_and_score,
};
use crate::stage::{StageMain, frozen_copy, starting_model};
use crate::train::{MicroLoss, Round, train};

/// One generation batch with its advantages.
struct Batch {
    prompts: Vec<Vec<u32>>,
    rollouts: Rollouts,
    advantages: Vec<f64>,
    metrics: BTreeMap<String, f64>,
}

struct RlooStage<B: AutodiffFusedOps> {
    data: OnlineData,
    s: RlooSettings,
    /// The reference without LoRA (under LoRA: the policy with its adapters disabled).
    frozen: Option<Transformer<B::InnerBackend>>,
    config: ModelConfig,
    device: B::Device,
}

impl<B: AutodiffFusedOps> RlooStage<B> {
    /// The loss mask of completions `idx`: their tokens, none for masked truncated ones.
    fn mask(&self, r: &Rollouts, idx: &[usize], width: usize) -> Vec<Vec<f64>> {
        let comps: Vec<&[u32]> = idx.iter().map(|&i| r.completions[i].as_slice()).collect();
        let exclude: Vec<bool> = idx.iter().map(|&i| r.truncated[i] && self.s.mask_truncated_completions).collect();
        completion_mask(&comps, width, &exclude)
    }

    /// Σ_t of the sampler's log-probs of each completion under the loss mask.
    fn sampled_logps(&self, r: &Rollouts, idx: &[usize]) -> Vec<f64> {
        let mask = self.mask(r, idx, self.s.max_completion_length.max(1));
        idx.iter().zip(&mask).map(|(&i, m)| r.logps[i].iter().zip(m).map(|(&l, w)| l as f64 * w).sum()).collect()
    }
}

impl<B: AutodiffFusedOps> GroupStage<B> for RlooStage<B> {
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
        let (s, policy) = (&self.s, model.valid());
        let prompts = self.data.prompts(draws);
        let sampling = sampling(s, s.temperature);
        let (seed, first_row) = (round.generation_seed(), (round.first_item * s.num_generations) as u64);
        let (tok, rewards) = (&self.data.tok, &self.data.rewards);
        let g = sample_and_score(&policy, tok, &prompts, s.num_generations, &sampling, seed, first_row, rewards)?;
        let all: Vec<usize> = (0..g.rollouts.len()).collect();
        let kl = (s.beta != 0.0).then(|| {
            let reference = self.frozen.clone().unwrap_or_else(|| {
                let mut m = policy.clone();
                m.set_adapters_enabled(false);
                m
            });
            let bs = self.data.cfg.training.per_device_train_batch_size;
            let ref_logps = g.reference_logps(&reference, self.data.pad, s.temperature, bs, &self.device);
            let mask = self.mask(&g.rollouts, &all, self.s.max_completion_length.max(1));
            let sampled = self.sampled_logps(&g.rollouts, &all);
            let ref_sums = ref_logps.iter().zip(&mask).map(|(r, m)| r.iter().zip(m).map(|(x, w)| x * w).sum::<f64>());
            sampled.iter().zip(ref_sums).map(|(p, r)| p - r).collect::<Vec<f64>>()
        });
        // Over the whole batch (every replica's groups), as on one device: the KL of every
        // completion, then advantages normalised over the batch and its statistics.
        let kl = match kl {
            Some(local) => {
                let replica = crate::distributed::Replica::current();
                Some(replica.gather::<B::InnerBackend>(&self.device, &local, "gathering the KL")?.concat())
            }
            None => None,
        };
        let weights: Vec<f64> = self.data.rewards.iter().map(|(_, w)| *w).collect();
        let clip = s.reward_clip_range.map(|[lo, hi]| (lo, hi));
        let adv = rloo_advantages(
            &g.view.per_func,
            &weights,
            kl.as_deref(),
            s.beta,
            s.num_generations,
            s.normalize_advantages,
            clip,
        )
        .map_err(anyhow::Error::msg)?;
        let mut metrics = g.metrics.clone();
        let (mean, std) = mean_std(&adv.rewards.iter().copied().filter(|r| !r.is_nan()).collect::<Vec<_>>());
        metrics.insert("reward".into(), mean);
        metrics.insert("reward_std".into(), std);
        if let Some(kl) = &kl {
            metrics.insert("kl".into(), mean_std(kl).0);
        }
        let total: Vec<Option<f64>> = adv.rewards.iter().map(|r| (!r.is_nan()).then_some(*r)).collect();
        let n = g.rollouts.len();
        let advantages = g.view.own(&adv.advantages, n).to_vec();
        let rows = g.log_rows(round.step + 1, &prompts, &self.data.rewards, g.view.own(&total, n), &advantages);
        drop(prompts);
        self.data.log(&rows)?;
        Ok(Batch { prompts: g.prompts, rollouts: g.rollouts, advantages, metrics })
    }

    fn group_loss(
        &self,
        model: &Transformer<B>,
        batch: &Batch,
        pass: usize,
        idx: &[usize],
        micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let (s, r) = (&self.s, &batch.rollouts);
        let prompts: Vec<&[u32]> = idx.iter().map(|&i| batch.prompts[i].as_slice()).collect();
        let comps: Vec<&[u32]> = idx.iter().map(|&i| r.completions[i].as_slice()).collect();
        let cb = completion_batch::<B>(&prompts, &comps, self.data.pad, &self.device);
        let mask = rows_tensor::<B>(&self.mask(r, idx, cb.completion_width), cb.completion_width, &self.device);
        let f = completion_forward(model, &cb, s.temperature, true);
        let logps = sequence_logprobs(f.logps, mask.clone(), false);
        let column = |v: Vec<f64>| {
            Tensor::<B, 1>::from_data(TensorData::new(v, [idx.len()]).convert::<B::FloatElem>(), &self.device)
        };
        // The first pass is on-policy (old = the policy itself); later ones weigh by the ratio
        // to the sampler's log-probs.
        let old = if pass == 0 { logps.clone().detach() } else { column(self.sampled_logps(r, idx)) };
        let ratio: Vec<Vec<f64>> = (logps.clone().detach() - old.clone())
            .exp()
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .into_iter()
            .map(|x| vec![x])
            .collect();
        let adv: Vec<f64> = idx.iter().map(|&i| batch.advantages[i]).collect();
        let (lo, hi) = (s.epsilon, s.epsilon_high.unwrap_or(s.epsilon));
        let loss = rloo_loss(logps, old, column(adv.clone()), lo, hi).mean() / micro_batches as f64;
        let c = grpo_clip_metrics(&ratio, &adv, &vec![vec![1.0]; idx.len()], lo, hi);
        let mut metrics = vec![
            ("clip_ratio/low_mean", c.low_mean),
            ("clip_ratio/high_mean", c.high_mean),
            ("clip_ratio/region_mean", c.region_mean),
        ];
        if let Some(e) = f.entropy {
            metrics.push(("entropy", masked_mean(e, mask).mean().into_scalar().elem::<f64>()));
        }
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

/// Sampling at `temperature` with the stage's settings.
fn sampling(s: &RlooSettings, temperature: f32) -> Generation {
    let (k, p, stop) = (s.top_k, s.top_p, &s.stop_strings);
    Generation::new(temperature, k, p, s.max_completion_length, s.min_new_tokens, stop, s.include_stop_str_in_output)
}

/// Run (or resume) the RLOO stage on backend `B`; returns `final/`.
pub fn run_rloo<B: align_model::FusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    crate::stage::on_autodiff::<B, _>(cfg, Rloo { cfg, resume }, device)
}

#[derive(Clone)]
struct Rloo<'a> {
    cfg: &'a StageConfig,
    resume: bool,
}

impl StageMain for Rloo<'_> {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf> {
        let cfg = self.cfg;
        cfg.check_sections("rloo", Some("rloo"))?;
        let s = cfg.rloo.clone().context("the RLOO stage needs an [rloo] section with its reward functions")?;
        if s.rewards.is_empty() {
            bail!("[rloo] needs at least one reward function: [[rloo.rewards]] kind = \"r1_zero\", …");
        }
        if s.num_generations < 2 || s.num_iterations == 0 {
            bail!("RLOO needs num_generations >= 2 (the leave-one-out baseline) and num_iterations >= 1");
        }
        let per_generation = prompts_per_generation(&cfg.training, s.num_generations)?;
        let start = starting_model::<A>(cfg, Heads::LM, device)?;
        let data = OnlineData::load::<A::InnerBackend>("rloo", cfg, start.tokenizer, start.pad_id, &s.rewards, device)?;
        tracing::info!(prompts = data.train.len(), prompts_per_generation = per_generation, "RLOO");
        let model = start.model;
        let frozen = (s.beta != 0.0 && cfg.lora.is_none()).then(|| frozen_copy(&model, cfg.training.bf16));
        let stage = RlooStage::<A> { data, s, frozen, config: model.config.clone(), device: device.clone() };
        train(&mut Groups(stage), model, &cfg.training, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}
