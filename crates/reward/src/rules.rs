//! Rule rewards: functions of the text (and the example's ground truth), no model.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::math::{gsm8k_lm_eval_matches, r1_zero_reward};
use crate::{Result, Reward, RewardError, RewardOutput, Sample, example_str};

/// The r1_zero grader (CS336): score = answer reward; components `format_reward` and
/// `answer_reward`. The ground truth is the example's `answer_field` (a GSM8K worked
/// answer "… #### N" is reduced to N).
#[derive(Debug, Clone)]
pub struct R1Zero {
    pub answer_field: String,
    /// Score = format_reward·format_weight + answer_reward·(1 − format_weight): 0 is the
    /// grader's reward; > 0 shapes it with a format bonus (as many GRPO recipes do).
    pub format_weight: f64,
}

fn ground_truth(answer: &str) -> String {
    match answer.rsplit_once("#### ") {
        Some((_, n)) => n.trim().replace(',', ""),
        None => answer.trim().to_string(),
    }
}

impl Reward for R1Zero {
    fn name(&self) -> &str {
        "r1_zero"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        let gt = ground_truth(example_str(self.name(), s.example, &self.answer_field)?);
        let r = r1_zero_reward(s.completion, &gt);
        let w = self.format_weight;
        Ok(RewardOutput {
            score: r.format_reward * w + r.answer_reward * (1.0 - w),
            components: BTreeMap::from([
                ("format_reward".to_string(), r.format_reward),
                ("answer_reward".to_string(), r.answer_reward),
            ]),
        })
    }
}

/// Partial credit towards the r1_zero format, for policies that never produce it whole
/// (the strict grader then gives every sample 0 and GRPO no signal): the mean of four
/// checks, in order — "</think>" appears; an "<answer>" follows it; an "</answer>" follows
/// that; and "</think> <answer>" appears exactly (the grader's condition). Each check is a
/// component. A fully formatted response scores 1.
#[derive(Debug, Clone)]
pub struct R1ZeroFormat;

impl Reward for R1ZeroFormat {
    fn name(&self) -> &str {
        "r1_zero_format"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        let t = s.completion;
        let think = t.find("</think>");
        let open = think.and_then(|i| t[i..].find("<answer>").map(|j| i + j));
        let close = open.and_then(|i| t[i..].find("</answer>"));
        let checks = [
            ("think_closed", think.is_some()),
            ("answer_opened", open.is_some()),
            ("answer_closed", close.is_some()),
            ("exact", t.contains("</think> <answer>") && t.contains("</answer>")),
        ];
        let components: BTreeMap<String, f64> =
            checks.iter().map(|(k, v)| (k.to_string(), if *v { 1.0 } else { 0.0 })).collect();
        Ok(RewardOutput { score: components.values().sum::<f64>() / 4.0, components })
    }
}

/// Which number lm-eval's GSM8K reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gsm8kMatchMode {
    /// The number after "#### ".
    Strict,
    /// The last number in the text.
    #[default]
    Flexible,
}

/// 1 if the completion's number equals the ground truth (lm-eval's GSM8K match, the same
/// function `align eval gsm8k` uses), else 0.
#[derive(Debug, Clone)]
pub struct Gsm8kMatch {
    pub answer_field: String,
    pub mode: Gsm8kMatchMode,
}

impl Reward for Gsm8kMatch {
    fn name(&self) -> &str {
        "gsm8k"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        let gt = ground_truth(example_str(self.name(), s.example, &self.answer_field)?);
        let (strict, flexible) = gsm8k_lm_eval_matches(s.completion, &gt);
        Ok(RewardOutput::scalar(match self.mode {
            Gsm8kMatchMode::Strict => strict,
            Gsm8kMatchMode::Flexible => flexible,
        }))
    }
}

/// DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476; TRL
/// `get_soft_overlong_punishment`): 0 up to `max_tokens − cache_tokens` completion tokens,
/// then falling linearly to −1 at `max_tokens`, −1 beyond.
#[derive(Debug, Clone)]
pub struct SoftOverlong {
    pub max_tokens: usize,
    pub cache_tokens: usize,
}

impl Reward for SoftOverlong {
    fn name(&self) -> &str {
        "length"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        if s.completion_ids.is_empty() && !s.completion.is_empty() {
            return Err(RewardError::Input {
                reward: self.name().into(),
                message: "needs the completion's token ids".into(),
            });
        }
        let len = s.completion_ids.len() as f64;
        let (max, cache) = (self.max_tokens as f64, self.cache_tokens as f64);
        let score = if len <= max - cache {
            0.0
        } else if len <= max {
            (max - cache - len) / cache.max(1.0)
        } else {
            -1.0
        };
        Ok(RewardOutput::scalar(score))
    }
}

/// A coherence signal in [0, 1] that is low for degenerate text: the fraction of distinct
/// word n-grams (loops repeat them) times the fraction of characters that are letters,
/// digits, punctuation or whitespace (byte soup and stray scripts are not). Empty text
/// scores 0. Components: `distinct`, `clean`.
#[derive(Debug, Clone)]
pub struct Coherence {
    pub n: usize,
}

/// Fraction of distinct word `n`-grams (1 when there are fewer than `n` words).
pub fn distinct_ngrams(text: &str, n: usize) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    let n = n.max(1);
    if words.len() < n {
        return 1.0;
    }
    let grams: Vec<&[&str]> = words.windows(n).collect();
    let distinct: HashSet<&[&str]> = grams.iter().copied().collect();
    distinct.len() as f64 / grams.len() as f64
}

impl Reward for Coherence {
    fn name(&self) -> &str {
        "coherence"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        let text = s.completion.trim();
        if text.is_empty() {
            return Ok(RewardOutput {
                score: 0.0,
                components: BTreeMap::from([("distinct".into(), 0.0), ("clean".into(), 0.0)]),
            });
        }
        let distinct = distinct_ngrams(text, self.n);
        let chars = text.chars().count() as f64;
        let clean = text
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || c.is_ascii_punctuation() || c.is_whitespace() || c.is_alphabetic())
            .filter(|&c| c != '\u{fffd}')
            .count() as f64
            / chars;
        Ok(RewardOutput {
            score: distinct * clean,
            components: BTreeMap::from([("distinct".into(), distinct), ("clean".into(), clean)]),
        })
    }
}
