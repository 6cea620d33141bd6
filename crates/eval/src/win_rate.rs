//! Win rate of model A over model B on a prompt set, judged by a reward model: each model
//! completes every prompt, the reward model scores prompt + completion (tokenised as the
//! reward stage tokenises a prompt/completion row), and A wins a prompt when its score is
//! higher (a tie counts half).

use align_data::{Content, Example, ExampleTokenizer, TokenizeConfig, Tokenized, TokenizedSequence};
use align_model::FusedOps;
use align_model::{Tokenizer, Transformer};
use align_reward::score_sequences;
use align_rollout::{SamplingConfig, generate_text};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::multiple_choice::{WithStderr, mean_with_stderr};

/// A model with its tokenizer.
pub struct Contender<'a, B: FusedOps> {
    pub model: &'a Transformer<B>,
    pub tokenizer: &'a Tokenizer,
}

impl<'a, B: FusedOps> Contender<'a, B> {
    pub fn of(m: &'a align_model::Pretrained<B>) -> Self {
        Contender { model: &m.model, tokenizer: &m.tokenizer }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinSample {
    pub prompt: String,
    pub completion_a: String,
    pub completion_b: String,
    pub reward_a: f64,
    pub reward_b: f64,
    /// 1 (A wins), 0.5 (tie) or 0.
    pub win: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinSummary {
    pub num_prompts: usize,
    pub win_rate: WithStderr,
    pub mean_reward_a: f64,
    pub mean_reward_b: f64,
}

fn complete<B: FusedOps>(
    c: &Contender<B>,
    prompts: &[String],
    cfg: &SamplingConfig,
    batch: usize,
) -> Result<Vec<String>> {
    let pad = c.tokenizer.pad_token_id.or(c.tokenizer.eos_token_id).unwrap_or(0);
    let mut cfg = cfg.clone();
    cfg.stop_token_ids.extend(c.tokenizer.eos_token_id);
    let mut out = vec![];
    for (k, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> =
            chunk.iter().map(|p| c.tokenizer.encode(p, true)).collect::<align_model::Result<_>>()?;
        cfg.seed = cfg.seed.wrapping_add(k as u64);
        out.extend(generate_text(c.model, c.tokenizer, &ids, pad, &cfg, &[], false)?.into_iter().map(|t| t.text));
    }
    Ok(out)
}

/// Reward-model scores of prompt + completion rows.
pub fn reward_scores<B: FusedOps>(
    rm: &Contender<B>,
    prompts: &[String],
    completions: &[String],
    batch: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let mut t = ExampleTokenizer::new(
        rm.tokenizer,
        TokenizeConfig { max_length: None, max_prompt_length: None, ..Default::default() },
    );
    let mut seqs = vec![];
    for (p, c) in prompts.iter().zip(completions) {
        if c.is_empty() {
            // An empty completion: score the prompt alone followed by EOS.
            let mut ids = rm.tokenizer.encode(p, true)?;
            ids.extend(rm.tokenizer.eos_token_id);
            seqs.push(TokenizedSequence { loss_mask: vec![true; ids.len()], input_ids: ids });
            continue;
        }
        let ex = Example::PromptCompletion { prompt: Content::Text(p.clone()), completion: Content::Text(c.clone()) };
        match t.tokenize(&ex)? {
            Tokenized::Sequence(s) => seqs.push(s),
            other => bail!("unexpected tokenisation {other:?}"),
        }
    }
    let pad = rm.tokenizer.pad_token_id.or(rm.tokenizer.eos_token_id).unwrap_or(0);
    let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
    Ok(score_sequences(rm.model, &refs, pad, batch, device))
}

/// A's win rate over B on `prompts`.
pub fn win_rate<B: FusedOps>(
    a: &Contender<B>,
    b: &Contender<B>,
    rm: &Contender<B>,
    prompts: &[String],
    sampling: &SamplingConfig,
    batch: usize,
    device: &B::Device,
) -> Result<(Vec<WinSample>, WinSummary)> {
    if rm.model.score.is_none() {
        bail!("the judge has no score head: pass a reward model");
    }
    let ca = complete(a, prompts, sampling, batch)?;
    let cb = complete(b, prompts, sampling, batch)?;
    let ra = reward_scores(rm, prompts, &ca, batch, device)?;
    let rb = reward_scores(rm, prompts, &cb, batch, device)?;
    let samples: Vec<WinSample> = (0..prompts.len())
        .map(|i| WinSample {
            prompt: prompts[i].clone(),
            completion_a: ca[i].clone(),
            completion_b: cb[i].clone(),
            reward_a: ra[i],
            reward_b: rb[i],
            win: if ra[i] > rb[i] {
                1.0
            } else if ra[i] == rb[i] {
                0.5
            } else {
                0.0
            },
        })
        .collect();
    let n = samples.len().max(1) as f64;
    let summary = WinSummary {
        num_prompts: samples.len(),
        win_rate: mean_with_stderr(&samples.iter().map(|s| s.win).collect::<Vec<_>>()),
        mean_reward_a: ra.iter().sum::<f64>() / n,
        mean_reward_b: rb.iter().sum::<f64>() / n,
    };
    Ok((samples, summary))
}
