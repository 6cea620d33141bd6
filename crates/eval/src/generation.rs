//! Generation evals of a policy: the held-out reward of one completion per prompt, and
//! best-of-N selection (rejection sampling) by a reward.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use align_data::GenerationPrompt;
use align_model::{FusedOps, Tokenizer, Transformer};
use align_reward::{BestOfN, Candidate, Reward, Sample, score_rollouts};
use align_rollout::{Generation, rollout};
use anyhow::{Context, Result};
use serde_json::json;

fn ids<'a>(prompts: &[&'a GenerationPrompt]) -> Vec<&'a [u32]> {
    prompts.iter().map(|p| p.ids.as_slice()).collect()
}

/// Mean reward (and per function and component) of one greedy (or `eval_temperature`)
/// completion per held-out prompt; each sample, with its rewards, is a line of `samples`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_prompts<B: FusedOps>(
    policy: &Transformer<B>,
    tok: &Tokenizer,
    rewards: &[(Box<dyn Reward>, f64)],
    prompts: &[GenerationPrompt],
    sampling: &Generation,
    batch_size: usize,
    seed: u64,
    samples: &Path,
) -> Result<BTreeMap<String, f64>> {
    let bs = batch_size.max(1);
    let bar = crate::progress(prompts.len(), "eval (prompts)");
    if let Some(dir) = samples.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(samples).with_context(|| samples.display().to_string())?;
    let (mut totals, mut sums, mut n) = (vec![], BTreeMap::<String, f64>::new(), 0usize);
    let mut lengths = vec![];
    for (b, chunk) in prompts.chunks(bs).enumerate() {
        let ps: Vec<&GenerationPrompt> = chunk.iter().collect();
        let r = rollout(policy, tok, &ids(&ps), 1, sampling, seed.wrapping_add(b as u64), 0)?;
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
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut m: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k, v / n.max(1) as f64)).collect();
    m.insert("reward".into(), mean(&totals));
    m.insert("completions/mean_length".into(), mean(&lengths));
    Ok(m)
}

/// Best-of-N (rejection sampling): `n` samples of each prompt (one prefill per prompt,
/// several prompts per batch), scored by `reward`, the best kept. A selection's `prompt`
/// is the row's own `prompt` (text or messages), so the file trains the SFT stage as is.
pub fn best_of_n<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    reward: &dyn Reward,
    prompts: &[GenerationPrompt],
    n: usize,
    sampling: &Generation,
    seed: u64,
) -> Result<Vec<BestOfN>> {
    if n == 0 {
        anyhow::bail!("best-of-n needs n >= 1");
    }
    // About 64 sequences per decoding batch.
    let per_batch = (64 / n).max(1);
    let bar = crate::progress(prompts.len(), "best-of-n (prompts)");
    let mut out = Vec::with_capacity(prompts.len());
    for (b, chunk) in prompts.chunks(per_batch).enumerate() {
        let ps: Vec<&GenerationPrompt> = chunk.iter().collect();
        let r = rollout(model, tok, &ids(&ps), n, sampling, seed.wrapping_add(b as u64), 0)?;
        let samples: Vec<Sample> = (0..r.len())
            .map(|i| Sample {
                prompt: &ps[r.prompt[i]].text,
                completion: &r.texts[i],
                completion_ids: &r.completions[i],
                example: &ps[r.prompt[i]].example,
            })
            .collect();
        let scores = reward.score_batch(&samples)?;
        for (p, prompt) in ps.iter().enumerate() {
            let candidates = (p * n..(p + 1) * n)
                .map(|i| {
                    let completion = after_prompt(tok, &prompt.ids, &r.completions[i], &r.texts[i])?;
                    Ok(Candidate { completion, reward: scores[i].score })
                })
                .collect::<Result<_>>()?;
            let row_prompt = prompt.example.get("prompt").cloned().unwrap_or_else(|| prompt.text.clone().into());
            let sel = BestOfN::select(row_prompt, candidates)
                .with_context(|| format!("prompt {}: every candidate's reward is NaN", out.len() + 1))?;
            out.push(sel);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A completion's text as it reads after its prompt: decoded together with the prompt, the
/// prompt's own decoding cut off. A selection is written as prompt text + completion text,
/// and a tokenizer that joins words with spaces decodes a completion alone without the
/// space before its first word ("<think>6" would be one unknown word); `alone` (the text
/// decoded by itself) when the joint decoding does not start with the prompt's.
fn after_prompt(tok: &Tokenizer, prompt: &[u32], completion: &[u32], alone: &str) -> Result<String> {
    let head = tok.decode(prompt, true)?;
    let full = tok.decode(&[prompt, completion].concat(), true)?;
    Ok(full.strip_prefix(&head).map_or_else(|| alone.to_string(), str::to_string))
}

/// Best-of-N selections as the seed recipe prints them: each prompt, then every candidate
/// with its reward, the best marked.
pub fn best_of_n_listing(prompts: &[GenerationPrompt], selections: &[BestOfN]) -> String {
    let mut text = String::new();
    for (i, (p, sel)) in prompts.iter().zip(selections).enumerate() {
        text.push_str(&format!("=== prompt {} ===\n{}\n", i + 1, p.text));
        for (k, c) in sel.candidates.iter().enumerate() {
            let mark = if k == sel.best { "  <== best" } else { "" };
            text.push_str(&format!(
                "--- candidate {} (reward {:.4}){mark}\n{}\n",
                k + 1,
                c.reward,
                c.completion.trim_end()
            ));
        }
    }
    text
}
