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
use std::time::Instant;

use align_data::{DatasetConfig, ExampleTokenizer, LossPositions, TokenizeConfig, TokenizedSequence, pad_right};
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{Int, Tensor, TensorData};
use align_model::{FusedOps, TokenBatch, Tokenizer, Transformer, spread_rows};
use align_reward::{Reward, Sample};
use align_rollout::{SamplingConfig, generate_text_groups};
use anyhow::{Context, Result};
use serde_json::json;

/// A prompt to generate from, with the row it came from (rewards read ground truths and
/// external scores from it).
#[derive(Debug, Clone)]
pub struct RlPrompt {
    pub ids: Vec<u32>,
    /// The prompt as the policy sees it (decoded ids, special tokens kept).
    pub text: String,
    /// `align_data::Example` as JSON.
    pub example: serde_json::Value,
}

/// Every row's generation prompt (`prompt` column, or a conversation before its last
/// assistant turn); a row without one is an error naming the file and row.
pub fn load_prompts(
    tok: &Tokenizer,
    data: &DatasetConfig,
    tokenize: &TokenizeConfig,
    what: &str,
) -> Result<Vec<RlPrompt>> {
    let (examples, _) = align_data::load_examples(data)?;
    let mut t = ExampleTokenizer::new(tok, tokenize.clone());
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let at = || format!("{}: row {}", data.path.display(), data.skip + i + 1);
        let ids = t
            .generation_prompt(ex)
            .with_context(at)?
            .with_context(|| format!("{}: plain text has no prompt to generate from", at()))?;
        let text = tok.decode(&ids, false).with_context(at)?;
        out.push(RlPrompt { ids, text, example: serde_json::to_value(ex)? });
    }
    t.log_stats(what);
    if out.is_empty() {
        anyhow::bail!("{}: no prompts", data.path.display());
    }
    Ok(out)
}

/// Sampling settings of a generation batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub stop_strings: Vec<String>,
    pub include_stop_str_in_output: bool,
}

/// The completions of a generation batch, prompt-major (`group` per prompt).
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    /// Index into the generation's prompts of each completion.
    pub prompt: Vec<usize>,
    pub completions: Vec<Vec<u32>>,
    /// Log-probs under the sampling temperature, one per completion token.
    pub logps: Vec<Vec<f32>>,
    pub texts: Vec<String>,
    /// Ended by `max_new_tokens` rather than EOS or a stop string.
    pub truncated: Vec<bool>,
    pub seconds: f64,
}

impl Rollouts {
    /// Length and speed metrics of the batch, by TRL's names.
    pub fn length_metrics(&self) -> BTreeMap<String, f64> {
        let lens: Vec<f64> = self.completions.iter().map(|c| c.len() as f64).collect();
        let mut m = BTreeMap::new();
        m.insert("completions/mean_length".into(), mean_std(&lens).0);
        m.insert("completions/max_length".into(), lens.iter().copied().fold(0.0, f64::max));
        m.insert("completions/min_length".into(), lens.iter().copied().fold(f64::INFINITY, f64::min));
        let truncated = self.truncated.iter().filter(|&&t| t).count();
        m.insert("completions/clipped_ratio".into(), truncated as f64 / self.len().max(1) as f64);
        m.insert("rollout_tokens_per_second".into(), self.tokens() as f64 / self.seconds.max(1e-9));
        m.insert("rollout_seconds".into(), self.seconds);
        m
    }

    pub fn len(&self) -> usize {
        self.completions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }
    pub fn tokens(&self) -> usize {
        self.completions.iter().map(Vec::len).sum()
    }
}

/// Sample `group` completions of each prompt from `model`, seeded by `seed`.
pub fn rollout<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    prompts: &[&RlPrompt],
    group: usize,
    sampling: &Generation,
    seed: u64,
) -> Rollouts {
    let t0 = Instant::now();
    let pad = tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0);
    let cfg = SamplingConfig {
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        max_new_tokens: sampling.max_new_tokens,
        min_new_tokens: sampling.min_new_tokens,
        stop_token_ids: tok.eos_token_id.into_iter().collect(),
        seed,
    };
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let outs = generate_text_groups(
        model,
        tok,
        &ids,
        group,
        pad,
        &cfg,
        &sampling.stop_strings,
        sampling.include_stop_str_in_output,
    );
    let mut r = Rollouts::default();
    for (i, o) in outs.into_iter().enumerate() {
        r.prompt.push(i / group.max(1));
        r.truncated.push(!o.completion.stopped);
        r.completions.push(o.completion.tokens);
        r.logps.push(o.completion.logprobs);
        r.texts.push(o.text);
    }
    r.seconds = t0.elapsed().as_secs_f64();
    r
}

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
    /// Per function `rewards/<name>/{mean,std}`, components, lengths and sampling speed.
    pub metrics: BTreeMap<String, f64>,
}

/// Sample `group` completions of each prompt from `policy` and score them.
pub fn sample_and_score<B: FusedOps>(
    policy: &Transformer<B>,
    tok: &Tokenizer,
    prompts: &[&RlPrompt],
    group: usize,
    sampling: &Generation,
    seed: u64,
    rewards: &[(Box<dyn Reward>, f64)],
) -> Result<ScoredGeneration> {
    let r = rollout(policy, tok, prompts, group, sampling, seed);
    let scored = score_rollouts(rewards, prompts, &r)?;
    let mut metrics = r.length_metrics();
    for (k, (f, _)) in rewards.iter().enumerate() {
        let v: Vec<f64> = scored.per_func.iter().filter_map(|x| x[k]).collect();
        let (mean, std) = mean_std(&v);
        metrics.insert(format!("rewards/{}/mean", f.name()), mean);
        metrics.insert(format!("rewards/{}/std", f.name()), std);
    }
    for (c, v) in &scored.components {
        metrics.insert(format!("rewards/{c}"), mean_std(v).0);
    }
    let prompt_ids = r.prompt.iter().map(|&p| prompts[p].ids.clone()).collect();
    Ok(ScoredGeneration { prompts: prompt_ids, rollouts: r, scored, metrics })
}

impl ScoredGeneration {
    /// The `completions.jsonl` rows of the batch: prompt, completion, each function's reward
    /// and component, and the stage's `reward` and `advantage` of each completion.
    pub fn log_rows(
        &self,
        step: usize,
        prompts: &[&RlPrompt],
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

    /// Append rows (flushed).
    pub fn write(&mut self, rows: &[serde_json::Value]) -> Result<()> {
        for row in rows {
            writeln!(self.file, "{row}")?;
        }
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

/// Best-of-N (rejection sampling): `n` samples of each prompt (one prefill per prompt,
/// several prompts per batch), scored by `reward`, the best kept. A selection's `prompt`
/// is the row's own `prompt` (text or messages), so the file trains the SFT stage as is.
pub fn best_of_n<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    reward: &dyn align_reward::Reward,
    prompts: &[RlPrompt],
    n: usize,
    sampling: &Generation,
    seed: u64,
) -> Result<Vec<align_reward::BestOfN>> {
    if n == 0 {
        anyhow::bail!("best-of-n needs n >= 1");
    }
    // About 64 sequences per decoding batch.
    let per_batch = (64 / n).max(1);
    let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "best-of-n {bar:30} {pos}/{len} prompts [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let mut out = Vec::with_capacity(prompts.len());
    for (b, chunk) in prompts.chunks(per_batch).enumerate() {
        let ps: Vec<&RlPrompt> = chunk.iter().collect();
        let r = rollout(model, tok, &ps, n, sampling, seed.wrapping_add(b as u64));
        let samples: Vec<align_reward::Sample> = (0..r.len())
            .map(|i| align_reward::Sample {
                prompt: &ps[r.prompt[i]].text,
                completion: &r.texts[i],
                completion_ids: &r.completions[i],
                example: &ps[r.prompt[i]].example,
            })
            .collect();
        let scores = reward.score_batch(&samples)?;
        for (p, prompt) in ps.iter().enumerate() {
            let candidates = (p * n..(p + 1) * n)
                .map(|i| align_reward::Candidate { completion: r.texts[i].clone(), reward: scores[i].score })
                .collect();
            let row_prompt = prompt.example.get("prompt").cloned().unwrap_or_else(|| prompt.text.clone().into());
            let sel = align_reward::BestOfN::select(row_prompt, candidates)
                .with_context(|| format!("prompt {}: every candidate's reward is NaN", out.len() + 1))?;
            out.push(sel);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Scores of a generation batch: per function, and the components of each.
pub struct Scored {
    /// `[completion][function]`
    pub per_func: Vec<Vec<Option<f64>>>,
    /// `(function name, component) → value per completion`
    pub components: BTreeMap<String, Vec<f64>>,
}

/// Score completions with every reward function.
pub fn score_rollouts(rewards: &[(Box<dyn Reward>, f64)], prompts: &[&RlPrompt], r: &Rollouts) -> Result<Scored> {
    let samples: Vec<Sample> = (0..r.len())
        .map(|i| Sample {
            prompt: &prompts[r.prompt[i]].text,
            completion: &r.texts[i],
            completion_ids: &r.completions[i],
            example: &prompts[r.prompt[i]].example,
        })
        .collect();
    let mut per_func = vec![vec![None; rewards.len()]; r.len()];
    let mut components = BTreeMap::<String, Vec<f64>>::new();
    for (k, (f, _)) in rewards.iter().enumerate() {
        let outs = f.score_batch(&samples)?;
        for (i, o) in outs.into_iter().enumerate() {
            per_func[i][k] = (!o.score.is_nan()).then_some(o.score);
            for (c, v) in o.components {
                components.entry(format!("{}/{c}", f.name())).or_insert_with(|| vec![0.0; r.len()])[i] = v;
            }
        }
    }
    Ok(Scored { per_func, components })
}

/// Mean reward (and per function and component) of one greedy (or `eval_temperature`)
/// completion per held-out prompt; each sample, with its rewards, is a line of `samples`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_prompts<B: FusedOps>(
    policy: &Transformer<B>,
    tok: &Tokenizer,
    rewards: &[(Box<dyn Reward>, f64)],
    prompts: &[RlPrompt],
    sampling: &Generation,
    batch_size: usize,
    seed: u64,
    samples: &Path,
) -> Result<BTreeMap<String, f64>> {
    let bs = batch_size.max(1);
    let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} prompts [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    if let Some(dir) = samples.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(samples).with_context(|| samples.display().to_string())?;
    let (mut totals, mut sums, mut n) = (vec![], BTreeMap::<String, f64>::new(), 0usize);
    let mut lengths = vec![];
    for (b, chunk) in prompts.chunks(bs).enumerate() {
        let ps: Vec<&RlPrompt> = chunk.iter().collect();
        let r = rollout(policy, tok, &ps, 1, sampling, seed.wrapping_add(b as u64));
        let scored = score_rollouts(rewards, &ps, &r)?;
        for i in 0..r.len() {
            let mut total = 0.0;
            let mut row = json!({"prompt": ps[i].text, "completion": r.texts[i], "tokens": r.completions[i].len()});
            for (k, (func, w)) in rewards.iter().enumerate() {
                let v = scored.per_func[i][k].unwrap_or(0.0);
                total += w * v;
                *sums.entry(format!("rewards/{}", func.name())).or_default() += v;
                row[func.name()] = json!(v);
            }
            for (c, v) in &scored.components {
                *sums.entry(format!("rewards/{c}")).or_default() += v[i];
                row[c] = json!(v[i]);
            }
            row["reward"] = json!(total);
            writeln!(f, "{row}")?;
            totals.push(total);
            lengths.push(r.completions[i].len() as f64);
            n += 1;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let mut m: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k, v / n.max(1) as f64)).collect();
    m.insert("reward".into(), mean_std(&totals).0);
    m.insert("completions/mean_length".into(), mean_std(&lengths).0);
    Ok(m)
}
