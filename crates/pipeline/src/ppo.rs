//! PPO for RLHF (`align ppo`): Schulman et al. 2017 (arXiv:1707.06347) as Ouyang et al.
//! 2022 apply it and TRL's `PPOTrainer` runs it.
//!
//! Each update samples one completion per prompt from the policy, scores it with the reward
//! functions (usually the reward model of the reward stage), turns the score and a per-token
//! KL penalty against the reference into per-token rewards, estimates advantages with GAE
//! against the critic's values, whitens them, then runs `num_ppo_epochs` passes of clipped
//! policy and value losses over `num_mini_batches` minibatches (one optimizer step each).
//! The KL coefficient is fixed, or adapted toward `kl_target` (Ziegler et al. 2019).
//!
//! The critic is a separate network (TRL's value model: a sequence-classification
//! checkpoint whose score head reads every position) or a value head on the policy's trunk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use align_data::GenerationPrompt;
use align_data::Loader;
use align_lora::LoraConfig;
use align_losses::ppo::{
    AdaptiveKl, INVALID_LOGPROB, apply_missing_eos_penalty, gae, mask_after, masked_whiten, ppo_policy_loss,
    ppo_token_rewards, ppo_value_loss, sequence_lengths, truncate_after_stop, valid_mask,
};
use align_model::burn::module::{AutodiffModule, Module};
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{ElementConversion, Tensor, TensorData};
use align_model::weights::{SafetensorsSource, TensorMap, save_safetensors};
use align_model::{
    AutodiffFusedOps, FusedOps, Heads, HfHead, ModelConfig, Transformer, WeightSource, export, load_pretrained,
    save_pretrained,
};
use align_reward::RewardSpec;
use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::config::StageConfig;
pub use crate::config::ppo::{Critic, PpoSettings};
use align_rollout::Generation;

use crate::rl::{
    CompletionBatch, OnlineData, ScoredGeneration, completion_batch, completion_forward, host_rows, mean_std,
    rows_tensor, sample_and_score,
};
use crate::stage::{StageMain, frozen_copy, on_autodiff, starting_model, train_in_full};
use crate::train::{
    Evaluation, MicroLoss, Round, Shape, Split, Stage, export_policy, load_trainable, save_trainable, train,
};

/// The trained networks: the policy and, unless the value head sits on its trunk, the
/// critic.
#[derive(Module, Debug)]
pub struct ActorCritic<B: Backend> {
    pub policy: Transformer<B>,
    pub critic: Option<Transformer<B>>,
}

impl<B: FusedOps> ActorCritic<B> {
    /// Values `[b, completion_width]` of the states before each completion token.
    fn values(&self, batch: &CompletionBatch<B>, policy_hidden: Option<Tensor<B, 3>>) -> Tensor<B, 2> {
        let [b, w] = batch.targets.dims();
        match &self.critic {
            Some(c) => {
                let h = batch.completion_states(c.forward_hidden(&batch.tokens, None));
                c.scores(h).expect("the critic has a score head").narrow(2, 0, 1).reshape([b, w])
            }
            None => {
                let h = policy_hidden
                    .unwrap_or_else(|| batch.completion_states(self.policy.forward_hidden(&batch.tokens, None)));
                self.policy.values(h).expect("the policy has a value head")
            }
        }
    }
}

/// The value head on the policy trunk, in TRL's names (`v_head.summary.*`).
fn save_value_head<B: Backend>(policy: &Transformer<B>, dir: &Path) -> Result<()> {
    let full = export(policy, HfHead::CausalLm)?;
    let mut m = TensorMap::default();
    for k in ["v_head.summary.weight", "v_head.summary.bias"] {
        let t = full.0.get(k).with_context(|| format!("the policy has no {k}"))?;
        m.0.insert(k.into(), t.clone());
    }
    save_safetensors(&m, &dir.join("value_head.safetensors"))?;
    Ok(())
}

fn load_value_head<B: Backend>(policy: &mut Transformer<B>, dir: &Path, device: &B::Device) -> Result<()> {
    let mut src = SafetensorsSource::open_files(&[dir.join("value_head.safetensors")])?;
    let w = src.load("v_head.summary.weight")?;
    let b = src.load("v_head.summary.bias")?;
    let [out, inp] = [w.shape[0], w.shape[1]];
    let head = policy.value_head.as_mut().context("the policy has no value head")?;
    // HF stores [out, in]; Burn's Linear holds [in, out].
    head.weight = align_model::burn::module::Param::from_tensor(
        Tensor::<B, 2>::from_data(TensorData::new(w.data, [out, inp]), device).transpose(),
    );
    head.bias = Some(align_model::burn::module::Param::from_tensor(Tensor::<B, 1>::from_data(
        TensorData::new(b.data, [out]),
        device,
    )));
    train_in_full(head);
    Ok(())
}

struct Networks {
    lora: Option<LoraConfig>,
    policy_config: ModelConfig,
    critic_config: Option<ModelConfig>,
}

impl Networks {
    fn save<B: Backend>(&self, m: &ActorCritic<B>, dir: &Path) -> Result<()> {
        save_trainable(&m.policy, self.lora.as_ref(), HfHead::CausalLm, dir)?;
        if m.policy.value_head.is_some() {
            save_value_head(&m.policy, dir)?;
        }
        if let Some(c) = &m.critic {
            let d = dir.join("value_model");
            std::fs::create_dir_all(&d)?;
            save_trainable(c, self.lora.as_ref(), HfHead::SequenceClassification, &d)?;
        }
        Ok(())
    }

    fn load<B: Backend>(&self, m: ActorCritic<B>, dir: &Path, device: &B::Device) -> Result<ActorCritic<B>> {
        let shared = m.policy.value_head.is_some();
        let heads = Heads { lm: true, score: false, value: shared };
        let mut policy = load_trainable(m.policy, self.lora.as_ref(), &self.policy_config, heads, dir, device)?;
        if shared {
            load_value_head(&mut policy, dir, device)?;
        }
        let critic = match (m.critic, &self.critic_config) {
            (Some(c), Some(cfg)) => {
                let heads = Heads { lm: false, score: true, value: false };
                Some(load_trainable(c, self.lora.as_ref(), cfg, heads, &dir.join("value_model"), device)?)
            }
            _ => None,
        };
        Ok(ActorCritic { policy, critic })
    }
}

/// Sampling at `temperature` with the stage's settings (PPO completions end at EOS only).
fn sampling(s: &PpoSettings, temperature: f32) -> Generation {
    Generation::new(temperature, s.top_k, s.top_p, s.max_completion_length, s.min_new_tokens, &[], true)
}

/// Run (or resume) the PPO stage on backend `B`; returns `final/`.
pub fn run_ppo<B: FusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    on_autodiff::<B, _>(cfg, Ppo { cfg, resume }, device)
}

/// Padding of response rows for align-losses' helpers: not a token id, so a completion's
/// EOS stays in its sequence even where the tokenizer's pad token is its EOS (TRL pads
/// with the pad token and so drops that EOS from the sequence, an artefact of pad = EOS).
const NO_TOKEN: i64 = -1;

/// One rollout batch after post-processing: everything the PPO epochs train on, host-side.
struct Batch {
    prompts: Vec<Vec<u32>>,
    completions: Vec<Vec<u32>>,
    /// Index of each completion's last token.
    seq_lengths: Vec<usize>,
    /// Old log-probs, `INVALID_LOGPROB` after each completion.
    logprobs: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
    advantages: Vec<Vec<f64>>,
    returns: Vec<Vec<f64>>,
    /// The minibatches of each update: `num_ppo_epochs` shuffles, `num_mini_batches` each.
    minibatches: Vec<Vec<usize>>,
    /// The KL summed over a completion, averaged over the batch (adaptive control).
    mean_kl: f64,
    metrics: BTreeMap<String, f64>,
}

/// PPO as a [`Stage`]: a round samples one completion per prompt and trains on it for
/// `num_ppo_epochs × num_mini_batches` updates, logged as one step.
struct PpoStage<B: AutodiffFusedOps> {
    data: OnlineData,
    s: PpoSettings,
    /// The reference without LoRA (under LoRA: the policy with its adapters disabled).
    frozen: Option<Transformer<B::InnerBackend>>,
    nets: Networks,
    kl: AdaptiveKl,
    device: B::Device,
}

impl<B: AutodiffFusedOps> PpoStage<B> {
    fn mini_batch(&self) -> usize {
        self.data.cfg.training.per_device_train_batch_size * self.data.cfg.training.gradient_accumulation_steps
    }

    /// Score a rollout and turn it into per-token advantages and returns (TRL's
    /// `PPOTrainer.train` up to its epochs); also returns its `completions.jsonl` rows.
    fn post_process(
        &self,
        model: &ActorCritic<B::InnerBackend>,
        prompts: &[&GenerationPrompt],
        round: Round,
    ) -> Result<(Batch, Vec<serde_json::Value>)> {
        let s = &self.s;
        let seed = round.generation_seed();
        let tok = &self.data.tok;
        let sampling = sampling(s, s.temperature);
        let first_row = round.first_item as u64;
        let g = sample_and_score(&model.policy, tok, prompts, 1, &sampling, seed, first_row, &self.data.rewards)?;
        let (r, prompt_ids) = (&g.rollouts, &g.prompts);
        let scored = self.score(&g)?;
        let (ref_logps, values) = self.reference_and_values(model, prompt_ids, &scored.completions);
        let sampled: Vec<Vec<f64>> = r.logps.iter().map(|l| l.iter().map(|&x| x as f64).collect()).collect();
        // From here on, the whole batch (every replica's completions, in rank order): the
        // whitening, the KL control and the minibatches are one device's.
        let local = Completions {
            prompts: prompt_ids.clone(),
            responses: scored.completions.clone(),
            seq_lengths: scored.seq_lengths.clone(),
            scores: scored.scores.clone(),
            has_eos: scored.has_eos.clone(),
            sampled,
            ref_logps,
            values,
        };
        let all = local.gather::<B::InnerBackend>(&self.device)?;
        let width = all.sampled.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let seq_lengths = &all.seq_lengths;
        let pad_rows = |rows: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            rows.into_iter()
                .map(|mut v| {
                    v.resize(width, 0.0);
                    v
                })
                .collect()
        };
        let logps = mask_after(&pad_rows(all.sampled.clone()), seq_lengths, 0, INVALID_LOGPROB);
        let ref_logps = mask_after(&pad_rows(all.ref_logps.clone()), seq_lengths, 0, INVALID_LOGPROB);
        let values = mask_after(&pad_rows(all.values.clone()), seq_lengths, 1, 0.0);
        let token_rewards =
            ppo_token_rewards(&logps, &ref_logps, &all.scores, seq_lengths, self.kl.value, s.kl_estimator);
        let mut per_token = token_rewards.rewards.clone();
        if s.whiten_rewards {
            per_token =
                masked_whiten(&per_token, &valid_mask(width, seq_lengths, 1), false).map_err(anyhow::Error::msg)?;
            per_token = mask_after(&per_token, seq_lengths, 1, 0.0);
        }
        let (advantages, returns) = gae(&per_token, &values, s.gamma, s.lam);
        let advantages = masked_whiten(&advantages, &valid_mask(width, seq_lengths, 0), true)
            .map_err(anyhow::Error::msg)
            .context("a rollout batch needs at least two completion tokens to whiten advantages")?;
        let advantages = mask_after(&advantages, seq_lengths, 0, 0.0);
        let kl_sums: Vec<f64> = token_rewards.kl.iter().map(|k| k.iter().sum()).collect();
        let metrics = self.metrics(&g, &all, &kl_sums, &token_rewards.non_score_reward);
        let offset = g.view.offset;
        let log_rows = (0..r.len())
            .map(|i| {
                let mut row = json!({
                    "step": round.step + 1,
                    "prompt": prompts[r.prompt[i]].text,
                    "completion": r.texts[i],
                    "score": scored.scores[i],
                    "kl": kl_sums[offset + i],
                    "tokens": scored.completions[i].len(),
                });
                for (k, (f, _)) in self.data.rewards.iter().enumerate() {
                    row[f.name()] = json!(g.scored.per_func[i][k]);
                }
                row
            })
            .collect();
        let batch = Batch {
            minibatches: self.minibatches(all.prompts.len(), round),
            prompts: all.prompts,
            completions: all.responses,
            seq_lengths: all.seq_lengths,
            logprobs: logps,
            values,
            advantages,
            returns,
            mean_kl: mean_std(&kl_sums).0,
            metrics,
        };
        Ok((batch, log_rows))
    }

    /// The score of each completion (weighted reward functions, less `missing_eos_penalty`
    /// without EOS) and its sequence as align-losses' helpers cut it.
    fn score(&self, g: &ScoredGeneration) -> Result<ScoredResponses> {
        let r = &g.rollouts;
        let raw: Vec<f64> = g
            .scored
            .per_func
            .iter()
            .map(|fs| fs.iter().zip(&self.data.rewards).map(|(x, (_, w))| x.unwrap_or(0.0) * w).sum())
            .collect();
        let width = r.completions.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let eos = self.data.tok.eos_token_id.map(i64::from);
        let rows: Vec<Vec<i64>> = r
            .completions
            .iter()
            .map(|c| c.iter().map(|&t| t as i64).chain(std::iter::repeat(NO_TOKEN)).take(width).collect())
            .collect();
        let responses = match eos {
            Some(e) => truncate_after_stop(&rows, e, NO_TOKEN),
            None => rows,
        };
        let scores = match (self.s.missing_eos_penalty, eos) {
            (Some(p), Some(e)) => apply_missing_eos_penalty(&raw, &responses, e, p),
            (Some(p), None) => raw.iter().map(|x| x - p).collect(),
            (None, _) => raw,
        };
        Ok(ScoredResponses {
            scores,
            seq_lengths: sequence_lengths(&responses, NO_TOKEN),
            has_eos: responses.iter().map(|row| eos.is_some_and(|e| row.contains(&e))).collect(),
            completions: responses
                .iter()
                .map(|row| row.iter().take_while(|&&t| t != NO_TOKEN).map(|&t| t as u32).collect())
                .collect(),
        })
    }

    /// Reference log-probs and the critic's values of every completion, one no-grad forward
    /// per micro-batch.
    fn reference_and_values(
        &self,
        model: &ActorCritic<B::InnerBackend>,
        prompt_ids: &[Vec<u32>],
        completions: &[Vec<u32>],
    ) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let reference = match &self.frozen {
            Some(f) => f.clone(),
            None => {
                let mut m = model.policy.clone();
                m.set_adapters_enabled(false);
                m
            }
        };
        let (mut ref_logps, mut values) = (vec![], vec![]);
        let per_device = self.data.cfg.training.per_device_train_batch_size.max(1);
        for (ps, cs) in prompt_ids.chunks(per_device).zip(completions.chunks(per_device)) {
            let ps: Vec<&[u32]> = ps.iter().map(Vec::as_slice).collect();
            let cs: Vec<&[u32]> = cs.iter().map(Vec::as_slice).collect();
            let cb = completion_batch::<B::InnerBackend>(&ps, &cs, self.data.pad, &self.device);
            ref_logps.extend(host_rows(completion_forward(&reference, &cb, self.s.temperature, false).logps));
            values.extend(host_rows(model.values(&cb, None)));
        }
        (ref_logps, values)
    }

    /// What TRL's PPO trainer logs for a rollout batch.
    fn metrics(
        &self,
        g: &ScoredGeneration,
        all: &Completions,
        kl_sums: &[f64],
        non_score_reward: &[Vec<f64>],
    ) -> BTreeMap<String, f64> {
        let nsr_sums: Vec<f64> = non_score_reward.iter().map(|k| k.iter().sum()).collect();
        let mean = |v: &[f64]| mean_std(v).0;
        // Lengths, speed and each reward function's mean and std come with the batch.
        let mut m = g.metrics.clone();
        m.insert("objective/kl".into(), mean(kl_sums));
        let entropy: Vec<f64> = all.sampled.iter().map(|l| -l.iter().sum::<f64>()).collect();
        m.insert("objective/entropy".into(), mean(&entropy));
        m.insert("objective/non_score_reward".into(), mean(&nsr_sums));
        let rlhf: Vec<f64> = all.scores.iter().zip(&nsr_sums).map(|(a, b)| a + b).collect();
        m.insert("objective/rlhf_reward".into(), mean(&rlhf));
        m.insert("objective/scores".into(), mean(&all.scores));
        m.insert("kl_coef".into(), self.kl.value);
        let eos = all.has_eos.iter().filter(|&&e| e).count();
        m.insert("completions/eos_ratio".into(), eos as f64 / all.scores.len().max(1) as f64);
        m
    }

    /// The minibatches of each update: `num_ppo_epochs` shuffles of the batch (align-data's
    /// loader), `num_mini_batches` each (a short last batch leaves later slots empty).
    fn minibatches(&self, n: usize, round: Round) -> Vec<Vec<usize>> {
        // A data-parallel run's minibatch is the replicas' together: one device's, over the
        // whole (gathered) batch.
        let size = self.mini_batch() * crate::distributed::Replica::current().world;
        let mut order = Loader::new(n, size, round.generation_seed(), true);
        let mut out = vec![];
        for _ in 0..self.s.num_ppo_epochs {
            let drawn = order.batches_per_epoch();
            out.extend((0..drawn).map(|_| order.next_batch()));
            out.extend((drawn..self.s.num_mini_batches).map(|_| vec![]));
        }
        out
    }
}

/// A rollout's scores and sequences after align-losses' helpers.
struct ScoredResponses {
    scores: Vec<f64>,
    /// Index of each completion's last token.
    seq_lengths: Vec<usize>,
    has_eos: Vec<bool>,
    completions: Vec<Vec<u32>>,
}

/// What post-processing reads of each completion of a rollout batch.
struct Completions {
    prompts: Vec<Vec<u32>>,
    /// The completions cut after their stop token.
    responses: Vec<Vec<u32>>,
    seq_lengths: Vec<usize>,
    scores: Vec<f64>,
    has_eos: Vec<bool>,
    /// The sampler's log-probs, reference log-probs and values, a row per completion.
    sampled: Vec<Vec<f64>>,
    ref_logps: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
}

impl Completions {
    /// Every replica's completions in rank order (this replica's alone on one device).
    fn gather<B: Backend>(self, device: &B::Device) -> Result<Completions> {
        let replica = crate::distributed::Replica::current();
        if replica.world == 1 {
            return Ok(self);
        }
        let ids = |v: &[u32]| v.iter().map(|&t| t as f64).collect::<Vec<f64>>();
        let mut rows = vec![];
        for i in 0..self.scores.len() {
            rows.push(ids(&self.prompts[i]));
            rows.push(ids(&self.responses[i]));
            rows.push(vec![self.seq_lengths[i] as f64, self.scores[i], self.has_eos[i] as u8 as f64]);
            rows.extend([self.sampled[i].clone(), self.ref_logps[i].clone(), self.values[i].clone()]);
        }
        let all = replica.gather_rows::<B>(device, &rows, "gathering the rollout batch")?;
        let tokens = |v: &[f64]| v.iter().map(|&t| t as u32).collect::<Vec<u32>>();
        let mut out = Completions {
            prompts: vec![],
            responses: vec![],
            seq_lengths: vec![],
            scores: vec![],
            has_eos: vec![],
            sampled: vec![],
            ref_logps: vec![],
            values: vec![],
        };
        for c in all.chunks(6) {
            let [prompt, response, head, sampled, reference, values] = c else {
                bail!("gathering the rollout batch: a replica sent a cut record");
            };
            let [seq_length, score, has_eos] = head[..] else {
                bail!("gathering the rollout batch: a replica sent a cut record");
            };
            out.prompts.push(tokens(prompt));
            out.responses.push(tokens(response));
            out.seq_lengths.push(seq_length as usize);
            out.scores.push(score);
            out.has_eos.push(has_eos != 0.0);
            out.sampled.push(sampled.clone());
            out.ref_logps.push(reference.clone());
            out.values.push(values.clone());
        }
        Ok(out)
    }
}

impl<B: AutodiffFusedOps> Stage<B> for PpoStage<B> {
    type Model = ActorCritic<B>;
    type Batch = Batch;

    fn shape(&self) -> Shape {
        Shape {
            items: self.data.train.len(),
            draw_size: self.mini_batch() * self.s.num_mini_batches,
            draws_per_round: 1,
            steps_per_round: 1,
            split: Split::Generation,
            updates_per_step: self.s.num_ppo_epochs * self.s.num_mini_batches,
        }
    }

    fn next_batch(&mut self, model: &ActorCritic<B>, draws: Vec<Vec<usize>>, round: Round) -> Result<Batch> {
        let (batch, rows) = self.post_process(&model.valid(), &self.data.prompts(&draws), round)?;
        self.data.log(&rows)?;
        Ok(batch)
    }

    fn micro_batches(&self, batch: &Batch, _pass: usize, update: usize) -> Vec<Vec<usize>> {
        let per_device = self.data.cfg.training.per_device_train_batch_size.max(1);
        batch.minibatches[update].chunks(per_device).map(<[usize]>::to_vec).collect()
    }

    fn loss(
        &self,
        model: &ActorCritic<B>,
        batch: &Batch,
        _pass: usize,
        idx: &[usize],
        micro_batches: usize,
    ) -> Result<MicroLoss<B>> {
        let (loss, metrics) = micro_loss(model, batch, idx, &self.s, self.data.pad, &self.device);
        let fed_tokens = idx.iter().map(|&i| batch.prompts[i].len() + batch.completions[i].len()).sum();
        Ok(MicroLoss { loss: loss / micro_batches as f64, metrics, metrics_with_units: vec![], units: 1.0, fed_tokens })
    }

    fn batch_metrics(&self, batch: &Batch) -> Vec<(String, f64)> {
        batch.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn after_step(&mut self, batch: &Batch) {
        if self.s.adaptive_kl {
            self.kl.update(batch.mean_kl, batch.completions.len());
        }
    }

    fn state(&self) -> serde_json::Value {
        json!({ "kl_coef": self.kl.value })
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        if let Some(c) = state.get("kl_coef").and_then(serde_json::Value::as_f64) {
            self.kl.value = c;
        }
        Ok(())
    }

    fn open_logs(&mut self, output_dir: &Path, resumed_at: Option<usize>) -> Result<()> {
        self.data.open_log(self.s.log_completions, output_dir, resumed_at)
    }

    fn evaluate(&mut self, model: &ActorCritic<B>, step: usize) -> Result<Option<Evaluation>> {
        self.data.evaluate(&model.policy.valid(), &sampling(&self.s, self.s.eval_temperature), step)
    }

    fn save_weights(&self, model: &ActorCritic<B>, dir: &Path) -> Result<()> {
        self.nets.save(model, dir)
    }

    fn load_weights(&self, model: ActorCritic<B>, dir: &Path) -> Result<ActorCritic<B>> {
        self.nets.load(model, dir, &self.device)
    }

    fn export(&self, model: &ActorCritic<B>, final_dir: &Path) -> Result<()> {
        let lora = self.nets.lora.as_ref();
        export_policy(&model.policy, lora, &self.data.cfg.model.path, &self.data.tok, HfHead::CausalLm, final_dir)?;
        if model.policy.value_head.is_some() {
            save_value_head(&model.policy, final_dir)?;
        }
        if let Some(c) = &model.critic {
            let merged = if lora.is_some() { align_lora::merge_and_unload(c.valid()) } else { c.valid() };
            save_pretrained(
                &merged,
                Some(&self.data.tok),
                HfHead::SequenceClassification,
                &final_dir.join("value_model"),
            )?;
        }
        Ok(())
    }

    fn headline(&self) -> &'static [&'static str] {
        &["objective/scores", "objective/kl", "kl_coef", "eval_reward"]
    }

    fn progress(&self, batch: &Batch) -> String {
        format!("kl {} kl_coef {}", crate::logfmt::Sig(batch.mean_kl), crate::logfmt::Sig(self.kl.value))
    }
}

#[derive(Clone)]
struct Ppo<'a> {
    cfg: &'a StageConfig,
    resume: bool,
}

impl StageMain for Ppo<'_> {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf> {
        let cfg = self.cfg;
        cfg.check_sections("ppo", Some("ppo"))?;
        let s = cfg.ppo.clone().context("the PPO stage needs a [ppo] section with its reward functions")?;
        if s.rewards.is_empty() {
            bail!(
                "[ppo] needs at least one reward function, e.g. rewards = [{{ kind = \"model\", path = \"…/final\" }}]"
            );
        }
        if s.num_ppo_epochs == 0 || s.num_mini_batches == 0 {
            bail!("num_ppo_epochs and num_mini_batches must be at least 1");
        }
        if s.adaptive_kl && (s.kl_target <= 0.0 || s.kl_horizon <= 0.0) {
            bail!("adaptive KL needs kl_target > 0 and kl_horizon > 0");
        }
        let args = &cfg.training;
        let shared = s.critic == Critic::Shared;
        let start = starting_model::<A>(cfg, Heads { lm: true, score: false, value: shared }, device)?;
        let data = OnlineData::load::<A::InnerBackend>("ppo", cfg, start.tokenizer, start.pad_id, &s.rewards, device)?;
        let mut policy = start.model;
        let mut critic = None;
        if !shared {
            let path = s.value_model_path.clone().unwrap_or_else(|| {
                s.rewards
                    .iter()
                    .find_map(|t| match &t.spec {
                        RewardSpec::Model { path, .. } => Some(path.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| cfg.model.path.clone())
            });
            let c = load_pretrained::<A>(&path, Heads { lm: false, score: true, value: false }, device)
                .with_context(|| format!("the value model {}", path.display()))?;
            tracing::info!(value_model = %path.display(), "critic");
            critic = Some(c.model);
        }
        if let Some(l) = &cfg.lora {
            if let Some(v) = policy.value_head.as_mut() {
                train_in_full(v);
            }
            if let Some(c) = critic.take() {
                let (mut c, _) = align_lora::attach(c, l, args.seed.wrapping_add(1))?;
                if let Some(h) = c.score.as_mut() {
                    train_in_full(h);
                }
                critic = Some(c);
            }
        }
        let nets = Networks {
            lora: cfg.lora.clone(),
            policy_config: policy.config.clone(),
            critic_config: critic.as_ref().map(|c| c.config.clone()),
        };
        let frozen = cfg.lora.is_none().then(|| frozen_copy(&policy, args.bf16));
        tracing::info!(prompts = data.train.len(), critic = ?s.critic, "PPO");
        let kl = AdaptiveKl { value: s.kl_coef, target: s.kl_target, horizon: s.kl_horizon };
        let mut stage = PpoStage::<A> { data, s, frozen, nets, kl, device: device.clone() };
        train(&mut stage, ActorCritic { policy, critic }, args, &cfg.output_dir, self.resume)?;
        Ok(cfg.output_dir.join("final"))
    }
}

/// The PPO loss `pg + vf_coef·vf` of micro-batch `idx`, with TRL's per-minibatch stats.
fn micro_loss<B: AutodiffFusedOps>(
    model: &ActorCritic<B>,
    batch: &Batch,
    idx: &[usize],
    s: &PpoSettings,
    pad: u32,
    device: &B::Device,
) -> (Tensor<B, 1>, Vec<(&'static str, f64)>) {
    let prompts: Vec<&[u32]> = idx.iter().map(|&i| batch.prompts[i].as_slice()).collect();
    let comps: Vec<&[u32]> = idx.iter().map(|&i| batch.completions[i].as_slice()).collect();
    let cb = completion_batch::<B>(&prompts, &comps, pad, device);
    let w = cb.completion_width;
    let seq: Vec<usize> = idx.iter().map(|&i| batch.seq_lengths[i]).collect();
    let rows = |src: &Vec<Vec<f64>>| -> Vec<Vec<f64>> { idx.iter().map(|&i| src[i].clone()).collect() };
    let t = |v: Vec<Vec<f64>>| rows_tensor::<B>(&v, w, device);
    let mask = t(valid_mask(w, &seq, 0));
    let mask_p1 = t(valid_mask(w, &seq, 1));
    let f = completion_forward(&model.policy, &cb, s.temperature, false);
    // INVALID_LOGPROB after each completion, as the stored old log-probs hold.
    let logp = f.logps.clone() * mask.clone() + (mask.clone().neg() + 1.0) * INVALID_LOGPROB;
    let shared_hidden = model.critic.is_none().then(|| f.hidden.clone());
    let vpred = model.values(&cb, shared_hidden) * mask_p1.clone();
    let pg =
        ppo_policy_loss(logp.clone(), t(rows(&batch.logprobs)), t(rows(&batch.advantages)), mask.clone(), s.cliprange);
    let vf = ppo_value_loss(vpred, t(rows(&batch.values)), t(rows(&batch.returns)), mask_p1, s.cliprange_value);
    let ratio = (logp.detach() - t(rows(&batch.logprobs))).exp().mean();
    let scalar = |x: Tensor<B, 1>| x.detach().into_scalar().elem::<f64>();
    let stats = vec![
        ("policy/approxkl_avg", scalar(pg.approxkl.clone())),
        ("policy/clipfrac_avg", scalar(pg.clipfrac.clone())),
        ("loss/policy_avg", scalar(pg.loss.clone())),
        ("loss/value_avg", scalar(vf.loss.clone())),
        ("val/clipfrac_avg", scalar(vf.clipfrac.clone())),
        ("val/ratio", scalar(ratio)),
    ];
    (pg.loss + vf.loss * s.vf_coef, stats)
}
