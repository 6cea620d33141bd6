//! Scored conversations (`conversation`, `meta_eval_score`, `score_reason`) as more than
//! their assistant turns:
//!
//! - **Score conditioning** (Decision Transformer, Chen et al. 2021, conditions actions on
//!   the return to go; SteerLM, Dong et al. 2023, on attribute values in the prompt): the
//!   row's score, written as a control string, prefixes its first user turn. Generating
//!   with the control string of a chosen score then asks for a reply of that quality.
//! - **The critique task** (self-critique training): the row's `score_reason` is a
//!   critique of its assistant reply. A second example asks for that critique and the score,
//!   given the conversation; [`CritiqueTask::revision`] then asks the model to rewrite its
//!   reply under a critique (Self-Refine, Madaan et al. 2023).

use align_model::ChatMessage;

use crate::error::{DataError, Result};
use crate::schema::{Content, Example};

/// The default control string: `<score>9</score>` and a newline before the prompt.
pub const DEFAULT_SCORE_FORMAT: &str = "<score>{score}</score>\n";

/// The default critique instruction (`{max_score}` is replaced).
pub const DEFAULT_CRITIQUE_INSTRUCTION: &str =
    "Critique the assistant's last reply in the conversation below, then rate it from 0 to {max_score}.";

/// A score as a control string writes it: integers without a fraction ("9", not "9.0"),
/// anything else in Rust's shortest round-tripping form ("4.5").
pub fn score_text(score: f64) -> String {
    if score.fract() == 0.0 && score.abs() < 1e15 { format!("{}", score as i64) } else { format!("{score}") }
}

/// Conditions a conversation on a score: `format` with `{score}` replaced, prefixed to the
/// first user turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreCondition {
    format: String,
}

impl ScoreCondition {
    /// `format` must hold `{score}` once: without it every example would get the same
    /// prefix and nothing could be conditioned.
    pub fn new(format: &str) -> Result<Self> {
        match format.matches("{score}").count() {
            1 => Ok(ScoreCondition { format: format.to_string() }),
            n => Err(DataError::Config(format!(
                "score conditioning format {format:?}: must contain `{{score}}` exactly once, found {n}"
            ))),
        }
    }

    /// The control string for `score`.
    pub fn control(&self, score: f64) -> String {
        self.format.replace("{score}", &score_text(score))
    }

    /// `prompt` as a user writes it, conditioned on `score`.
    pub fn prompt(&self, prompt: &str, score: f64) -> String {
        format!("{}{prompt}", self.control(score))
    }

    /// The conversation with the control string before its first user turn's content.
    /// `None` when it has no user turn.
    pub fn conversation(&self, messages: &[ChatMessage], score: f64) -> Option<Vec<ChatMessage>> {
        let first = messages.iter().position(|m| m.role == "user")?;
        let mut out = messages.to_vec();
        out[first].content = self.prompt(&messages[first].content, score);
        Some(out)
    }

    /// `ex` with its prompt conditioned on `score` (a text prompt prefixed, a conversation's
    /// first user turn prefixed); `None` for plain text or a conversation without a user
    /// turn.
    pub fn example(&self, ex: &Example, score: f64) -> Option<Example> {
        let content = |c: &Content| match c {
            Content::Text(t) => Some(Content::Text(self.prompt(t, score))),
            Content::Messages(m) => self.conversation(m, score).map(Content::Messages),
        };
        let mut out = ex.clone();
        match &mut out {
            Example::Text { .. } => return None,
            Example::PromptCompletion { prompt, .. }
            | Example::Preference { prompt, .. }
            | Example::UnpairedPreference { prompt, .. }
            | Example::PromptAnswer { prompt, .. }
            | Example::PromptOnly { prompt } => *prompt = content(prompt)?,
            Example::Conversation { messages } | Example::ScoredConversation { messages, .. } => {
                *messages = self.conversation(messages, score)?
            }
        }
        Some(out)
    }
}

/// The critique task built from scored conversations.
#[derive(Debug, Clone, PartialEq)]
pub struct CritiqueTask {
    /// The instruction before the conversation (`{max_score}` replaced).
    pub instruction: String,
    /// The top of the score scale the critique rates on.
    pub max_score: f64,
}

impl CritiqueTask {
    pub fn new(instruction: &str, max_score: f64) -> Result<Self> {
        if !(max_score.is_finite() && max_score > 0.0) {
            return Err(DataError::Config(format!("critique max_score must be a positive number, found {max_score}")));
        }
        Ok(CritiqueTask { instruction: instruction.replace("{max_score}", &score_text(max_score)), max_score })
    }

    /// The user turn asking for a critique of the conversation's last assistant reply: the
    /// instruction, then each turn as `Role: content`. `None` without an assistant turn.
    pub fn prompt(&self, messages: &[ChatMessage]) -> Option<ChatMessage> {
        let last = messages.iter().rposition(|m| m.role == "assistant")?;
        let transcript: Vec<String> = messages[..=last]
            .iter()
            .map(|m| {
                let mut role = m.role.clone();
                if let Some(f) = role.get_mut(0..1) {
                    f.make_ascii_uppercase();
                }
                format!("{role}: {}", m.content)
            })
            .collect();
        Some(ChatMessage::new("user", format!("{}\n\n{}", self.instruction, transcript.join("\n\n"))))
    }

    /// What the critique turn says: the critique, then `Score: N` on its own line.
    pub fn target(reason: &str, score: f64) -> String {
        format!("{}\nScore: {}", reason.trim_end(), score_text(score))
    }

    /// The critique example of a scored conversation: the [`Self::prompt`] user turn and
    /// the [`Self::target`] assistant turn. `None` without an assistant turn.
    pub fn example(&self, messages: &[ChatMessage], score: f64, reason: &str) -> Option<Vec<ChatMessage>> {
        Some(vec![self.prompt(messages)?, ChatMessage::new("assistant", Self::target(reason, score))])
    }

    /// The score a generated critique gives: the number after `Score:` on its first line
    /// that starts with it (what the critique target ends with; a model that runs on past
    /// it does not change it), else after its first `Score:` anywhere (a word-level
    /// tokenizer decodes without newlines), when it is within [0, max_score].
    pub fn parse_score(&self, critique: &str) -> Option<f64> {
        let at = match critique.lines().map(str::trim_start).find(|l| l.starts_with("Score:")) {
            Some(line) => line,
            None => &critique[critique.find("Score:")?..],
        };
        let rest = at["Score:".len()..].trim_start();
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let x: f64 = rest[..end].trim_end_matches('.').parse().ok()?;
        (0.0..=self.max_score).contains(&x).then_some(x)
    }

    /// Self-Refine's refinement step: the conversation so far, the draft reply, and a user
    /// turn that hands back the critique and asks for a better reply.
    pub fn revision(messages: &[ChatMessage], draft: &str, critique: &str) -> Vec<ChatMessage> {
        let mut out = messages.to_vec();
        out.push(ChatMessage::new("assistant", draft));
        out.push(ChatMessage::new(
            "user",
            format!(
                "A reviewer wrote this critique of your reply:\n\n{}\n\nWrite an improved reply to my previous message that addresses the critique. Give only the reply.",
                critique.trim()
            ),
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "What is 2 + 2?"),
            ChatMessage::new("assistant", "4"),
        ]
    }

    #[test]
    fn scores_are_written_without_a_needless_fraction() {
        assert_eq!(score_text(9.0), "9");
        assert_eq!(score_text(4.5), "4.5");
        assert_eq!(score_text(-1.0), "-1");
        assert_eq!(score_text(0.1 + 0.2), "0.30000000000000004");
    }

    #[test]
    fn the_control_string_prefixes_the_first_user_turn_only() {
        let c = ScoreCondition::new(DEFAULT_SCORE_FORMAT).unwrap();
        let out = c.conversation(&conv(), 5.0).unwrap();
        assert_eq!(out[0], conv()[0]);
        assert_eq!(out[1].content, "<score>5</score>\nWhat is 2 + 2?");
        assert_eq!(out[2], conv()[2]);
        assert_eq!(c.prompt("hi", 1.0), "<score>1</score>\nhi");
        assert!(c.conversation(&[ChatMessage::new("assistant", "x")], 1.0).is_none());
        // Any prompt: text prefixed, messages' first user turn prefixed, plain text refused.
        let text = Example::PromptAnswer { prompt: Content::Text("2 + 2?".into()), answer: "4".into() };
        let Some(Example::PromptAnswer { prompt: Content::Text(t), answer }) = c.example(&text, 9.0) else { panic!() };
        assert_eq!((t.as_str(), answer.as_str()), ("<score>9</score>\n2 + 2?", "4"));
        let chat = Example::PromptOnly { prompt: Content::Messages(conv()[..2].to_vec()) };
        let Some(Example::PromptOnly { prompt: Content::Messages(m) }) = c.example(&chat, 2.0) else { panic!() };
        assert_eq!(m[1].content, "<score>2</score>\nWhat is 2 + 2?");
        assert!(c.example(&Example::Text { text: "x".into() }, 1.0).is_none());
        for bad in ["no placeholder", "{score} twice {score}"] {
            let e = ScoreCondition::new(bad).unwrap_err().to_string();
            assert!(e.contains("exactly once"), "{e}");
        }
    }

    #[test]
    fn the_critique_example_shows_the_conversation_and_asks_for_reason_and_score() {
        let t = CritiqueTask::new(DEFAULT_CRITIQUE_INSTRUCTION, 5.0).unwrap();
        let ex = t.example(&conv(), 4.0, "Correct but terse.\n").unwrap();
        assert_eq!(ex[0].role, "user");
        assert_eq!(
            ex[0].content,
            "Critique the assistant's last reply in the conversation below, then rate it from 0 to 5.\n\n\
             System: Be brief.\n\nUser: What is 2 + 2?\n\nAssistant: 4"
        );
        assert_eq!(ex[1], ChatMessage::new("assistant", "Correct but terse.\nScore: 4"));
        assert!(t.example(&conv()[..2], 4.0, "x").is_none());
        assert!(CritiqueTask::new("x", 0.0).is_err());
    }

    #[test]
    fn a_critique_score_is_read_from_its_first_score_line_else_its_first_score() {
        let t = CritiqueTask::new(DEFAULT_CRITIQUE_INSTRUCTION, 5.0).unwrap();
        assert_eq!(t.parse_score("Good.\nScore: 4"), Some(4.0));
        assert_eq!(t.parse_score("Fine.\n  Score: 3.5.\nThe working\nScore: 1"), Some(3.5));
        assert_eq!(t.parse_score("The Score: 2 is inline.\nScore: 1"), Some(1.0));
        assert_eq!(t.parse_score("right . Score: 5 The working"), Some(5.0), "decoded without newlines");
        assert_eq!(t.parse_score("Score: 7"), None, "beyond max_score");
        assert_eq!(t.parse_score("Score: high"), None);
        assert_eq!(t.parse_score("no score"), None);
        let r = CritiqueTask::revision(&conv()[..2], "5", "Wrong sum.");
        assert_eq!(r.len(), 4);
        assert_eq!(r[2], ChatMessage::new("assistant", "5"));
        assert!(r[3].content.contains("Wrong sum."));
    }
}
