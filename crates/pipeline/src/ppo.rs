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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use align_data::Loader;
use align_lora::LoraConfig;
use align_losses::KlEstimator;
use align_losses::ppo::{
    AdaptiveKl, INVALID_LOGPROB, gae, mask_after, masked_whiten, ppo_policy_loss, ppo_token_rewards, ppo_value_loss,
    valid_mask,
};
use align_model::AutodiffFusedOps;
use align_model::FusedOps;
use align_model::burn::backend::Autodiff;
use align_model::burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use align_model::burn::module::{AutodiffModule, Module, Param};
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{ElementConversion, FloatDType, Tensor, TensorData};
use align_model::weights::{SafetensorsSource, TensorMap, save_safetensors};
use align_model::{Heads, HfHead, ModelConfig, Transformer, WeightSource, export, load_pretrained, save_pretrained};
use align_reward::{RewardSpec, RewardTerm, build_terms};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::StageConfig;
use crate::optim::{AdamW, learning_rate};
use crate::rl::{
    CompletionBatch, Generation, MetricWindow, RlPrompt, RlState, RunLogs, completion_batch, completion_forward,
    evaluate_prompts, export_policy, host_rows, load_prompts, mean_std, rollout, rows_tensor, score_rollouts,
};
use crate::trainer::{
    StepMetrics, accumulate, clipped_step, load_optimizer, load_trainable, read_state, resume_point, save_trainable,
};

/// Where the values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Critic {
    /// Its own network (TRL's value model), initialised from `value_model_path`.
    #[default]
    Separate,
    /// A scalar value head on the policy's trunk (TRL's older `ValueHead`): one forward
    /// for both, the trunk shared by both losses.
    Shared,
}

/// `[ppo]`: TRL `PPOConfig` names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoSettings {
    /// What scores a completion (usually `{ kind = "model", path = "<reward stage>/final" }`;
    /// any reward functions, weighted). Required.
    pub rewards: Vec<RewardTerm>,
    /// separate | shared. Default separate.
    pub critic: Critic,
    /// The separate critic's starting checkpoint. Default: the first `model` reward's
    /// path (TRL's recipe starts the value model from the reward model), else the policy's.
    pub value_model_path: Option<PathBuf>,
    /// Tokens per completion at most (TRL `response_length`). Default 53.
    pub max_completion_length: usize,
    /// Default 0.7.
    pub temperature: f32,
    /// Default 1.0 (off).
    pub top_p: f32,
    /// Default 0 (off).
    pub top_k: usize,
    /// Default 0.
    pub min_new_tokens: usize,
    /// Passes over each rollout batch. Default 4.
    pub num_ppo_epochs: usize,
    /// Minibatches per pass (an optimizer step each). Default 1.
    pub num_mini_batches: usize,
    /// KL coefficient (the initial one when adaptive). Default 0.05.
    pub kl_coef: f64,
    /// k1 | k3 (TRL `kl_estimator`). Default k1.
    pub kl_estimator: KlEstimator,
    /// Adapt kl_coef toward `kl_target` (Ziegler et al. 2019). Default false.
    pub adaptive_kl: bool,
    /// The KL (summed over a completion, averaged over the batch) to hold. Default 6.0.
    pub kl_target: f64,
    /// Completions over which the coefficient may move by ≈ 20%. Default 10000.
    pub kl_horizon: f64,
    /// Default 0.2.
    pub cliprange: f64,
    /// Default 0.2.
    pub cliprange_value: f64,
    /// Default 0.1.
    pub vf_coef: f64,
    /// Default 1.0.
    pub gamma: f64,
    /// Default 0.95.
    pub lam: f64,
    /// Whiten the per-token rewards before GAE. Default false.
    pub whiten_rewards: bool,
    /// Subtracted from the score of a completion without EOS. Default none.
    pub missing_eos_penalty: Option<f64>,
    /// Temperature of the held-out evaluation (0 = greedy). Default 0.0.
    pub eval_temperature: f32,
    /// Write every completion with its score and KL to `completions.jsonl`. Default true.
    pub log_completions: bool,
}

impl Default for PpoSettings {
    fn default() -> Self {
        PpoSettings {
            rewards: vec![],
            critic: Critic::Separate,
            value_model_path: None,
            max_completion_length: 53,
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            min_new_tokens: 0,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: false,
            kl_target: 6.0,
            kl_horizon: 10000.0,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            missing_eos_penalty: None,
            eval_temperature: 0.0,
            log_completions: true,
        }
    }
}

impl PpoSettings {
    fn generation(&self, temperature: f32) -> Generation {
        Generation {
            temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_completion_length,
            min_new_tokens: self.min_new_tokens,
            stop_strings: vec![],
            include_stop_str_in_output: true,
        }
    }
}

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

/// A head's parameters made trainable (LoRA freezes the whole base first).
fn trainable<B: Backend>(l: &mut align_model::burn::nn::Linear<B>) {
    l.weight = Param::from_tensor(l.weight.val().detach()).set_require_grad(true);
    if let Some(b) = l.bias.as_mut() {
        *b = Param::from_tensor(b.val().detach()).set_require_grad(true);
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
    head.weight =
        Param::from_tensor(Tensor::<B, 2>::from_data(TensorData::new(w.data, [out, inp]), device).transpose());
    head.bias = Some(Param::from_tensor(Tensor::<B, 1>::from_data(TensorData::new(b.data, [out]), device)));
    trainable(head);
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

/// Run (or resume) the PPO stage on backend `B`; returns `final/`.
pub fn run_ppo<B: FusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    if cfg.training.gradient_checkpointing {
        ppo_on::<Autodiff<B, BalancedCheckpointing>>(cfg, resume, device)
    } else {
        ppo_on::<Autodiff<B>>(cfg, resume, device)
    }
}

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
}

fn ppo_on<B: AutodiffFusedOps>(cfg: &StageConfig, resume: bool, device: &B::Device) -> Result<PathBuf> {
    cfg.check_sections("ppo", Some("ppo"))?;
    let s = cfg.ppo.clone().context("the PPO stage needs a [ppo] section with its reward functions")?;
    if s.rewards.is_empty() {
        bail!("[ppo] needs at least one reward function, e.g. rewards = [{{ kind = \"model\", path = \"…/final\" }}]");
    }
    if s.num_ppo_epochs == 0 || s.num_mini_batches == 0 {
        bail!("num_ppo_epochs and num_mini_batches must be at least 1");
    }
    if s.adaptive_kl && (s.kl_target <= 0.0 || s.kl_horizon <= 0.0) {
        bail!("adaptive KL needs kl_target > 0 and kl_horizon > 0");
    }
    let args = &cfg.training;
    let (per_device, accumulation) = (args.per_device_train_batch_size, args.gradient_accumulation_steps);
    if per_device == 0 || accumulation == 0 {
        bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
    }
    // TRL: a rollout batch is per_device × accumulation × num_mini_batches prompts.
    let mini_batch = per_device * accumulation;
    let batch_size = mini_batch * s.num_mini_batches;

    let shared = s.critic == Critic::Shared;
    let pre = load_pretrained::<B>(&cfg.model.path, Heads { lm: true, score: false, value: shared }, device)?;
    let tok = pre.tokenizer;
    let pad = tok.pad_token_id.or(tok.eos_token_id).context("the tokenizer has neither a pad nor an EOS token")?;
    let eos = tok.eos_token_id;
    let train_prompts = load_prompts(&tok, &cfg.data, &cfg.tokenize, "train")?;
    let eval_prompts = match &cfg.eval_data {
        Some(d) => load_prompts(&tok, d, &cfg.tokenize, "eval")?,
        None => vec![],
    };
    let rewards = build_terms::<B::InnerBackend>(&s.rewards, device)?;
    let mut policy = pre.model;
    let critic = if shared {
        None
    } else {
        let path = s.value_model_path.clone().unwrap_or_else(|| {
            s.rewards
                .iter()
                .find_map(|t| match &t.spec {
                    RewardSpec::Model { path, .. } => Some(path.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| cfg.model.path.clone())
        });
        let c = load_pretrained::<B>(&path, Heads { lm: false, score: true, value: false }, device)
            .with_context(|| format!("the value model {}", path.display()))?;
        tracing::info!(value_model = %path.display(), "critic");
        Some(c.model)
    };
    let mut critic = critic;
    if let Some(l) = &cfg.lora {
        let (m, names) = align_lora::attach(policy, l, args.seed)?;
        tracing::info!(modules = names.len(), r = l.r, "LoRA attached to the policy");
        policy = m;
        if let Some(v) = policy.value_head.as_mut() {
            trainable(v);
        }
        if let Some(c) = critic.take() {
            let (mut c, _) = align_lora::attach(c, l, args.seed.wrapping_add(1))?;
            if let Some(h) = c.score.as_mut() {
                trainable(h);
            }
            critic = Some(c);
        }
    }
    let nets = Networks {
        lora: cfg.lora.clone(),
        policy_config: policy.config.clone(),
        critic_config: critic.as_ref().map(|c| c.config.clone()),
    };
    let dtype = if args.bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    let mut model = align_model::cast_float(ActorCritic { policy, critic }, dtype);
    let frozen = cfg.lora.is_none().then(|| model.policy.valid());

    let updates_per_epoch = train_prompts.len().div_ceil(batch_size);
    let total = match args.max_steps {
        Some(n) => n,
        None => (updates_per_epoch as f64 * args.num_train_epochs).ceil().max(1.0) as usize,
    };
    let optimizer_steps_per_update = s.num_ppo_epochs * s.num_mini_batches;
    let total_optimizer_steps = total * optimizer_steps_per_update;
    let warmup = args.warmup(total_optimizer_steps);
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out.join("checkpoints")).with_context(|| out.display().to_string())?;
    std::fs::write(out.join("config.toml"), toml::to_string(cfg)?)?;
    let mut loader = Loader::new(train_prompts.len(), batch_size, args.seed, true);
    let mut opt = AdamW::<B>::new(args.adamw());
    let mut kl = AdaptiveKl { value: s.kl_coef, target: s.kl_target, horizon: s.kl_horizon };
    let (mut step, mut generation) = (0usize, 0usize);
    let resumed = resume_point(out, resume)?;
    if let Some((at, dir)) = &resumed {
        let state: RlState = read_state(dir, args.seed, total)?;
        model = align_model::cast_float(nets.load(model, dir, device)?, dtype);
        load_optimizer::<B>(&mut opt, &dir.join("optimizer.safetensors"), device)?;
        opt.step = (at * optimizer_steps_per_update) as u64;
        loader.restore(state.loader);
        (step, generation) = (*at, state.generation);
        if let Some(c) = state.kl_coef {
            kl.value = c;
        }
        tracing::info!(step = at, checkpoint = %dir.display(), "resumed");
    }
    let mut logs = RunLogs::open(out, resumed.map(|(at, _)| at))?;
    tracing::info!(prompts = train_prompts.len(), batch_size, updates = total, critic = ?s.critic, "PPO");
    let progress = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    progress.set_position(step as u64);
    let eval_every = args.eval_steps.filter(|&e| e > 0 && !eval_prompts.is_empty());
    let evaluate = |policy: &Transformer<B::InnerBackend>, at: usize| {
        evaluate_prompts(
            policy,
            &tok,
            &rewards,
            &eval_prompts,
            &s.generation(s.eval_temperature),
            per_device,
            args.seed,
            &out.join(format!("eval/step-{at}.jsonl")),
        )
    };
    if args.eval_on_start && step == 0 && eval_every.is_some() {
        logs.log_eval_on_start(evaluate(&model.policy.valid(), 0)?)?;
    }

    let mut window = MetricWindow::default();
    let (mut window_loss, mut window_tokens, mut window_steps, mut window_start) =
        (0.0, 0usize, 0usize, Instant::now());
    while step < total {
        let t0 = Instant::now();
        let idx = loader.next_batch();
        let prompts: Vec<&RlPrompt> = idx.iter().map(|&i| &train_prompts[i]).collect();
        let inner = model.valid();
        let r = rollout(
            &inner.policy,
            &tok,
            &prompts,
            1,
            &s.generation(s.temperature),
            args.seed.wrapping_add(1_000_003 * generation as u64),
        );
        generation += 1;
        let n = r.len();
        let scored = score_rollouts(&rewards, &prompts, &r)?;
        let raw_scores: Vec<f64> = scored
            .per_func
            .iter()
            .map(|fs| fs.iter().zip(&rewards).map(|(x, (_, w))| x.unwrap_or(0.0) * w).sum())
            .collect();
        let has_eos: Vec<bool> = r.completions.iter().map(|c| eos.is_some_and(|e| c.last() == Some(&e))).collect();
        let scores: Vec<f64> = match s.missing_eos_penalty {
            Some(p) => raw_scores.iter().zip(&has_eos).map(|(x, &e)| if e { *x } else { x - p }).collect(),
            None => raw_scores.clone(),
        };
        let prompt_ids: Vec<Vec<u32>> = r.prompt.iter().map(|&p| prompts[p].ids.clone()).collect();
        let width = r.completions.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let seq_lengths: Vec<usize> = r.completions.iter().map(|c| c.len().saturating_sub(1)).collect();
        // Reference log-probs and old values, one no-grad forward per micro-batch.
        let reference = match &frozen {
            Some(f) => f.clone(),
            None => {
                let mut m = inner.policy.clone();
                m.set_adapters_enabled(false);
                m
            }
        };
        let (mut ref_logps, mut values) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for start in (0..n).step_by(per_device) {
            let end = (start + per_device).min(n);
            let ps: Vec<&[u32]> = prompt_ids[start..end].iter().map(Vec::as_slice).collect();
            let cs: Vec<&[u32]> = r.completions[start..end].iter().map(Vec::as_slice).collect();
            let cb = completion_batch::<B::InnerBackend>(&ps, &cs, pad, device);
            ref_logps.extend(host_rows(completion_forward(&reference, &cb, s.temperature, false).logps));
            values.extend(host_rows(inner.values(&cb, None)));
        }
        let pad_rows = |rows: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            rows.into_iter()
                .map(|mut v| {
                    v.resize(width, 0.0);
                    v
                })
                .collect()
        };
        let logps: Vec<Vec<f64>> = pad_rows(r.logps.iter().map(|l| l.iter().map(|&x| x as f64).collect()).collect());
        let logps = mask_after(&logps, &seq_lengths, 0, INVALID_LOGPROB);
        let ref_logps = mask_after(&pad_rows(ref_logps), &seq_lengths, 0, INVALID_LOGPROB);
        let values = mask_after(&pad_rows(values), &seq_lengths, 1, 0.0);
        let token_rewards = ppo_token_rewards(&logps, &ref_logps, &scores, &seq_lengths, kl.value, s.kl_estimator);
        let mut per_token = token_rewards.rewards.clone();
        if s.whiten_rewards {
            per_token =
                masked_whiten(&per_token, &valid_mask(width, &seq_lengths, 1), false).map_err(anyhow::Error::msg)?;
            per_token = mask_after(&per_token, &seq_lengths, 1, 0.0);
        }
        let (advantages, returns) = gae(&per_token, &values, s.gamma, s.lam);
        let advantages = masked_whiten(&advantages, &valid_mask(width, &seq_lengths, 0), true)
            .map_err(anyhow::Error::msg)
            .context("a rollout batch needs at least two completion tokens to whiten advantages")?;
        let advantages = mask_after(&advantages, &seq_lengths, 0, 0.0);
        let rollout_seconds = t0.elapsed().as_secs_f64();

        // What the TRL PPO trainer logs for the batch.
        let kl_sums: Vec<f64> = token_rewards.kl.iter().map(|k| k.iter().sum()).collect();
        let nsr_sums: Vec<f64> = token_rewards.non_score_reward.iter().map(|k| k.iter().sum()).collect();
        let mean_kl = mean_std(&kl_sums).0;
        let mut batch_metrics = BTreeMap::<String, f64>::new();
        batch_metrics.insert("objective/kl".into(), mean_kl);
        batch_metrics.insert(
            "objective/entropy".into(),
            mean_std(&r.logps.iter().map(|l| -l.iter().map(|&x| x as f64).sum::<f64>()).collect::<Vec<_>>()).0,
        );
        batch_metrics.insert("objective/non_score_reward".into(), mean_std(&nsr_sums).0);
        batch_metrics.insert(
            "objective/rlhf_reward".into(),
            mean_std(&scores.iter().zip(&nsr_sums).map(|(a, b)| a + b).collect::<Vec<_>>()).0,
        );
        batch_metrics.insert("objective/scores".into(), mean_std(&scores).0);
        batch_metrics.insert("kl_coef".into(), kl.value);
        for (k, (f, _)) in rewards.iter().enumerate() {
            let v: Vec<f64> = scored.per_func.iter().filter_map(|x| x[k]).collect();
            batch_metrics.insert(format!("rewards/{}/mean", f.name()), mean_std(&v).0);
        }
        for (c, v) in &scored.components {
            batch_metrics.insert(format!("rewards/{c}"), mean_std(v).0);
        }
        let lens: Vec<f64> = r.completions.iter().map(|c| c.len() as f64).collect();
        batch_metrics.insert("completions/mean_length".into(), mean_std(&lens).0);
        batch_metrics
            .insert("completions/eos_ratio".into(), has_eos.iter().filter(|&&e| e).count() as f64 / n.max(1) as f64);
        batch_metrics.insert("rollout_tokens_per_second".into(), r.tokens() as f64 / r.seconds.max(1e-9));
        if s.log_completions {
            for i in 0..n {
                let mut row = json!({
                    "step": step + 1,
                    "prompt": prompts[r.prompt[i]].text,
                    "completion": r.texts[i],
                    "score": scores[i],
                    "kl": kl_sums[i],
                    "tokens": r.completions[i].len(),
                });
                for (k, (f, _)) in rewards.iter().enumerate() {
                    row[f.name()] = json!(scored.per_func[i][k]);
                }
                writeln!(logs.completions, "{row}")?;
            }
            logs.completions.flush()?;
        }
        let batch = Batch {
            prompts: prompt_ids,
            completions: r.completions,
            seq_lengths,
            logprobs: logps,
            values,
            advantages,
            returns,
        };

        // num_ppo_epochs passes, each over shuffled minibatches of micro-batches.
        let t_train = Instant::now();
        let (mut loss_sum, mut fed, mut norm) = (0.0f64, 0usize, 0.0f64);
        let mut shuffle = align_model::SplitMix64::new(args.seed ^ (generation as u64).wrapping_mul(0x9E37_79B9));
        for epoch in 0..s.num_ppo_epochs {
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..order.len()).rev() {
                let j = (shuffle.uniform() * (i + 1) as f64) as usize;
                order.swap(i, j.min(i));
            }
            for (k, mb) in order.chunks(mini_batch).enumerate() {
                let opt_step = step * optimizer_steps_per_update + epoch * s.num_mini_batches + k;
                let lr = learning_rate(
                    args.learning_rate,
                    args.lr_scheduler_type,
                    opt_step,
                    warmup,
                    total_optimizer_steps,
                    args.num_cycles,
                );
                B::seed(device, args.seed.wrapping_add(opt_step as u64));
                let micro: Vec<&[usize]> = mb.chunks(per_device).collect();
                let mut accumulated: Option<GradientsParams> = None;
                for idx in &micro {
                    let (loss, stats) = micro_loss(&model, &batch, idx, &s, pad, device);
                    for (name, v) in stats {
                        window.add(name, v);
                    }
                    let loss = loss / micro.len() as f64;
                    loss_sum += loss.clone().into_scalar().elem::<f64>();
                    fed += idx.iter().map(|&i| batch.prompts[i].len() + batch.completions[i].len()).sum::<usize>();
                    accumulated = Some(accumulate(&model, loss, accumulated));
                }
                let grads = accumulated.context("a minibatch with no micro-batches")?;
                (model, norm) = clipped_step(&mut opt, model, grads, lr, args.max_grad_norm);
            }
        }
        let loss_value = loss_sum / optimizer_steps_per_update as f64;
        if !loss_value.is_finite() {
            bail!(
                "update {}: loss is {loss_value}; stopping. The last good checkpoint is intact under {}",
                step + 1,
                out.join("checkpoints").display()
            );
        }
        if s.adaptive_kl {
            kl.update(mean_kl, n);
        }
        step += 1;
        for (k, v) in &batch_metrics {
            window.add(k.clone(), *v);
        }
        window.add("rollout_seconds", rollout_seconds);
        window.add("train_tokens_per_second", fed as f64 / t_train.elapsed().as_secs_f64().max(1e-9));
        window_loss += loss_value;
        window_tokens += fed;
        window_steps += 1;
        progress.set_position(step as u64);
        progress.set_message(format!(
            "score {:.3} kl {mean_kl:.3} kl_coef {:.4}",
            batch_metrics["objective/scores"], kl.value
        ));
        let eval = match eval_every {
            Some(e) if step.is_multiple_of(e) || step == total => Some(evaluate(&model.policy.valid(), step)?),
            _ => None,
        };
        if step.is_multiple_of(args.logging_steps.max(1)) || step == total || eval.is_some() {
            let mut extra = window.take();
            if let Some(e) = &eval {
                extra.extend(e.iter().map(|(k, v)| (format!("eval_{k}"), *v)));
            }
            let lr = learning_rate(
                args.learning_rate,
                args.lr_scheduler_type,
                step * optimizer_steps_per_update - 1,
                warmup,
                total_optimizer_steps,
                args.num_cycles,
            );
            let m = StepMetrics {
                step,
                epoch: generation as f64 / updates_per_epoch as f64,
                loss: Some(window_loss / window_steps.max(1) as f64),
                learning_rate: lr,
                grad_norm: norm,
                tokens_per_second: window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9),
                step_seconds: t0.elapsed().as_secs_f64(),
                eval_loss: None,
                extra,
            };
            tracing::info!(
                step,
                score = %crate::logfmt::opt(m.extra.get("objective/scores").copied()),
                kl = %crate::logfmt::opt(m.extra.get("objective/kl").copied()),
                kl_coef = %crate::logfmt::opt(m.extra.get("kl_coef").copied()),
                eval_reward = %crate::logfmt::opt(m.extra.get("eval_reward").copied()),
                "ppo"
            );
            logs.log(m)?;
            (window_loss, window_tokens, window_steps, window_start) = (0.0, 0, 0, Instant::now());
        }
        if args.save_steps > 0 && step.is_multiple_of(args.save_steps) && step < total {
            let state = RlState {
                step,
                generation,
                loader: loader.state(),
                seed: args.seed,
                total_steps: total,
                kl_coef: Some(kl.value),
            };
            let save = |dir: &Path| nets.save(&model, dir);
            logs.checkpoint(&save, &opt, &state, out, args.save_total_limit)?;
        }
    }
    progress.finish_and_clear();
    let model = if args.bf16 { opt.model_with_masters(model) } else { model };
    let final_dir = out.join("final");
    export_policy(&model.policy, cfg.lora.as_ref(), &cfg.model.path, &tok, &final_dir)?;
    if model.policy.value_head.is_some() {
        save_value_head(&model.policy, &final_dir)?;
    }
    if let Some(c) = &model.critic {
        let merged = if cfg.lora.is_some() { align_lora::merge_and_unload(c.valid()) } else { c.valid() };
        save_pretrained(&merged, Some(&tok), HfHead::SequenceClassification, &final_dir.join("value_model"))?;
    }
    tracing::info!(final_dir = %final_dir.display(), updates = step, "stage done");
    Ok(final_dir)
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
