//! Built-in adapters for the real sets align ships recipes for: PIQA (`goal`, `sol1`,
//! `sol2`, `label`) and GSM8K (`question`, `answer` ending in `#### N`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DataError, Result};
use crate::schema::{Content, Example};
use crate::source::{Record, kind};

/// The r1_zero prompt (CS336 / "understand-r1-zero"); `{question}` is replaced.
pub const R1_ZERO_PROMPT: &str = include_str!("r1_zero.prompt");

/// Which adapter turns a row into an [`Example`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adapter {
    /// PIQA → prompt "Question: {goal}\nAnswer:", completion " {correct solution}".
    PiqaSft,
    /// PIQA → the same prompt, chosen = correct solution, rejected = the other.
    PiqaPreference,
    /// GSM8K → r1_zero prompt + ground-truth answer (for RL).
    Gsm8kR1Zero,
    /// GSM8K → r1_zero prompt + the worked solution as " {steps} </think> <answer> {N} </answer>".
    Gsm8kSft,
}

/// A multiple-choice item scored by log-likelihood (lm-eval's PIQA form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultipleChoice {
    pub context: String,
    /// Continuations, each starting with the separator (" " for PIQA).
    pub choices: Vec<String>,
    pub gold: usize,
}

fn string(r: &Record, field: &str) -> Result<String> {
    match r.fields.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => {
            Err(DataError::at(&r.location, Some(field), format!("expected a string, found {}", kind(other))))
        }
        None => Err(DataError::at(&r.location, Some(field), "missing")),
    }
}

/// lm-eval's PIQA context.
pub fn piqa_context(goal: &str) -> String {
    format!("Question: {goal}\nAnswer:")
}

/// A PIQA row as a multiple-choice item (lm-eval: continuation " " + solution).
pub fn piqa_item(r: &Record) -> Result<MultipleChoice> {
    let (goal, sol1, sol2) = (string(r, "goal")?, string(r, "sol1")?, string(r, "sol2")?);
    let gold = match r.fields.get("label") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|l| l <= 1) => n.as_u64().unwrap_or(0) as usize,
        Some(other) => {
            return Err(DataError::at(&r.location, Some("label"), format!("expected 0 or 1, found {other}")));
        }
        None => return Err(DataError::at(&r.location, Some("label"), "missing")),
    };
    Ok(MultipleChoice { context: piqa_context(&goal), choices: vec![format!(" {sol1}"), format!(" {sol2}")], gold })
}

/// GSM8K's ground truth: the text after `#### `, commas removed.
pub fn gsm8k_ground_truth(answer: &str) -> Option<String> {
    let (_, gt) = answer.rsplit_once("#### ")?;
    let gt = gt.trim().replace(',', "");
    (!gt.is_empty()).then_some(gt)
}

/// The worked steps of a GSM8K answer, without the `<<a*b=c>>` calculator annotations.
pub fn gsm8k_reasoning(answer: &str) -> String {
    let steps = answer.rsplit_once("#### ").map_or(answer, |(s, _)| s);
    let mut out = String::with_capacity(steps.len());
    let mut rest = steps;
    while let Some(i) = rest.find("<<") {
        out.push_str(&rest[..i]);
        match rest[i..].find(">>") {
            Some(j) => rest = &rest[i + j + 2..],
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// The r1_zero prompt for a question.
pub fn r1_zero_prompt(question: &str) -> String {
    R1_ZERO_PROMPT.replace("{question}", question)
}

impl Adapter {
    pub fn apply(self, r: &Record) -> Result<Example> {
        Ok(match self {
            Adapter::PiqaSft => {
                let item = piqa_item(r)?;
                Example::PromptCompletion {
                    prompt: Content::Text(item.context),
                    completion: Content::Text(item.choices[item.gold].clone()),
                }
            }
            Adapter::PiqaPreference => {
                let item = piqa_item(r)?;
                Example::Preference {
                    prompt: Content::Text(item.context),
                    chosen: Content::Text(item.choices[item.gold].clone()),
                    rejected: Content::Text(item.choices[1 - item.gold].clone()),
                    margin: None,
                }
            }
            Adapter::Gsm8kR1Zero | Adapter::Gsm8kSft => {
                let (question, answer) = (string(r, "question")?, string(r, "answer")?);
                let gt = gsm8k_ground_truth(&answer)
                    .ok_or_else(|| DataError::at(&r.location, Some("answer"), "has no \"#### \" ground truth"))?;
                let prompt = Content::Text(r1_zero_prompt(&question));
                if self == Adapter::Gsm8kR1Zero {
                    Example::PromptAnswer { prompt, answer: gt }
                } else {
                    let completion = format!(" {} </think> <answer> {gt} </answer>", gsm8k_reasoning(&answer));
                    Example::PromptCompletion { prompt, completion: Content::Text(completion) }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_parts() {
        let a = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 1,000 total.\n#### 1,072";
        assert_eq!(gsm8k_ground_truth(a).as_deref(), Some("1072"));
        assert_eq!(gsm8k_reasoning(a), "Natalia sold 48/2 = 24 clips in May.\nSo 1,000 total.");
        assert!(r1_zero_prompt("2+2?").ends_with("User: 2+2?\nAssistant: <think>"));
    }
}
