//! Faithfulness: how much of a completion's wording follows the row's reference reply and
//! the conversation it answers, by ROUGE-L F1 (Lin 2004).

use std::collections::BTreeMap;

use align_model::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Result, Reward, RewardError, RewardOutput, Sample};

/// Word tokens as Google's `rouge-score` (`rouge_score/tokenize.py`, the default tokenizer
/// of `RougeScorer`, no stemmer) makes them: lowercase (full Unicode case mapping, as
/// Python's `str.lower`), every character outside `[a-z0-9]` a space, split on whitespace.
/// So "It's 3:45pm" is `it s 3 45pm` and non-ASCII letters split words ("naïve" → `na ve`),
/// as they do there: scores match that package's, the one papers report.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    let lower: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { ' ' })
        .collect();
    lower.split_whitespace().map(str::to_string).collect()
}

/// Length of the longest common subsequence of two token lists (one DP row, so memory is
/// linear in the shorter side even for a long context).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut row = vec![0usize; short.len() + 1];
    for x in long {
        let mut diag = 0;
        for (j, y) in short.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[short.len()]
}

/// ROUGE-L F1 of `completion` against `reference` (Lin 2004, "ROUGE: A Package for
/// Automatic Evaluation of Summaries", §3.1 with β = 1, as `rouge-score` computes it):
/// P = LCS / |completion|, R = LCS / |reference|, F1 = 2PR / (P + R); 0 when either has no
/// tokens or they share none.
pub fn rouge_l_f1(reference: &str, completion: &str) -> f64 {
    let (r, c) = (rouge_tokens(reference), rouge_tokens(completion));
    if r.is_empty() || c.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(&r, &c) as f64;
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    if p + rec > 0.0 { 2.0 * p * rec / (p + rec) } else { 0.0 }
}

/// What a completion is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaithfulnessAgainst {
    /// The row's reference reply.
    Reference,
    /// The conversation before it.
    Context,
    /// The mean of the two.
    #[default]
    Both,
}

/// A row's reference reply and the context it answers; either may be absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grounding {
    pub reference: Option<String>,
    pub context: Option<String>,
}

/// The reference reply and context of a dataset row (`align_data::Example` as JSON, or any
/// object with the same fields):
/// - `messages` (conversation, scored_conversation): the reference is the last assistant
///   turn, the context every message before it (any role), contents joined with "\n";
/// - otherwise the reference is `completion` (prompt_completion) or `answer`
///   (prompt_answer), the context `prompt`; text or messages, whose contents are joined
///   with "\n". An unpaired-preference row's completion is no reference (it may be the
///   undesirable one), nor is anything in a preference row.
pub fn grounding(reward: &str, example: &Value) -> Result<Grounding> {
    if let Some(m) = example.get("messages") {
        let messages = messages(reward, "messages", m)?;
        return Ok(match messages.iter().rposition(|m| m.role == "assistant") {
            Some(last) => {
                Grounding { reference: Some(messages[last].content.clone()), context: Some(joined(&messages[..last])) }
            }
            None => Grounding { reference: None, context: Some(joined(&messages)) },
        });
    }
    let reference = match example.get("schema").and_then(Value::as_str) {
        Some("unpaired_preference" | "preference") => None,
        _ => match (example.get("completion"), example.get("answer")) {
            (Some(c), _) => Some(content(reward, "completion", c)?),
            (None, Some(a)) => Some(content(reward, "answer", a)?),
            (None, None) => None,
        },
    };
    let context = example.get("prompt").map(|p| content(reward, "prompt", p)).transpose()?;
    Ok(Grounding { reference, context })
}

fn joined(messages: &[ChatMessage]) -> String {
    messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
}

fn messages(reward: &str, field: &str, v: &Value) -> Result<Vec<ChatMessage>> {
    Vec::<ChatMessage>::deserialize(v).map_err(|e| RewardError::Input {
        reward: reward.into(),
        message: format!("example field `{field}` is not a list of {{role, content}} messages: {e}"),
    })
}

/// A Content (text, or messages whose contents are joined with "\n") as one text.
fn content(reward: &str, field: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(_) => Ok(joined(&messages(reward, field, v)?)),
        other => Err(RewardError::Input {
            reward: reward.into(),
            message: format!("example field `{field}` is neither text nor messages: {other}"),
        }),
    }
}

/// ROUGE-L F1 of the completion against the row's reference reply, its context, or the
/// mean of both ([`grounding`] says where each comes from). A wording signal, not a
/// judgement: it rewards saying what the reference says (and staying on the context's
/// words), so it is meant as one weighted term among others. Components `rouge_l_reference`
/// and `rouge_l_context`, whichever are computed.
#[derive(Debug, Clone)]
pub struct Faithfulness {
    pub against: FaithfulnessAgainst,
}

impl Faithfulness {
    fn missing(&self, what: &str, fields: &str) -> RewardError {
        RewardError::Input {
            reward: self.name().into(),
            message: format!("example has no {what} ({fields}); set `against` to compare with what the rows have"),
        }
    }
}

impl Reward for Faithfulness {
    fn name(&self) -> &str {
        "faithfulness"
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        let g = grounding(self.name(), s.example)?;
        let mut components = BTreeMap::new();
        if self.against != FaithfulnessAgainst::Context {
            let r = g.reference.as_deref().ok_or_else(|| {
                self.missing("reference reply", "an assistant turn in `messages`, `completion` or `answer`")
            })?;
            components.insert("rouge_l_reference".to_string(), rouge_l_f1(r, s.completion));
        }
        if self.against != FaithfulnessAgainst::Reference {
            let c = g.context.as_deref().ok_or_else(|| self.missing("context", "`messages` or `prompt`"))?;
            components.insert("rouge_l_context".to_string(), rouge_l_f1(c, s.completion));
        }
        let score = components.values().sum::<f64>() / components.len() as f64;
        Ok(RewardOutput { score, components })
    }
}
