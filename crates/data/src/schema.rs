//! The dataset schemas TRL users have on disk, under TRL's column names, parsed and
//! validated into typed [`Example`]s.

use std::collections::BTreeMap;

use align_model::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};
use crate::source::{Record, kind};

/// Which schema rows follow; `auto` decides per row from the columns present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaKind {
    #[default]
    Auto,
    /// `text`
    Text,
    /// `prompt` + `completion`
    PromptCompletion,
    /// `messages` (role/content)
    Conversation,
    /// `prompt` (optional: implicit) + `chosen` + `rejected` (+ optional `margin`)
    Preference,
    /// `prompt` + `completion` + `label` (bool)
    UnpairedPreference,
    /// `prompt` + `answer`, for RL with a ground truth
    PromptAnswer,
    /// `prompt` alone (TRL's prompt-only type: PPO, GRPO with model rewards, best-of-N)
    PromptOnly,
    /// `conversation` (human/assistant turns) + `meta_eval_score` (+ `score_reason`)
    ScoredConversation,
}

/// A prompt or completion: plain text or chat messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Messages(Vec<ChatMessage>),
}

impl Content {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// One validated row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "schema", rename_all = "snake_case")]
pub enum Example {
    Text {
        text: String,
    },
    PromptCompletion {
        prompt: Content,
        completion: Content,
    },
    Conversation {
        messages: Vec<ChatMessage>,
    },
    /// `margin`: optional, how much better chosen is (TRL's reward-model margin column).
    Preference {
        prompt: Content,
        chosen: Content,
        rejected: Content,
        margin: Option<f64>,
    },
    UnpairedPreference {
        prompt: Content,
        completion: Content,
        label: bool,
    },
    PromptAnswer {
        prompt: Content,
        answer: String,
    },
    PromptOnly {
        prompt: Content,
    },
    ScoredConversation {
        messages: Vec<ChatMessage>,
        score: f64,
        reason: Option<String>,
    },
}

/// Renames columns to TRL's names before parsing: `{canonical: column_in_file}`.
pub type ColumnMap = BTreeMap<String, String>;

/// Apply a column mapping to a row's fields.
pub fn map_columns(fields: &mut Map<String, Value>, columns: &ColumnMap) {
    for (canonical, source) in columns {
        if let Some(v) = fields.remove(source) {
            fields.insert(canonical.clone(), v);
        }
    }
}

struct Row<'a> {
    loc: &'a Location,
    fields: &'a Map<String, Value>,
}

impl Row<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> DataError {
        DataError::at(self.loc, Some(field), msg)
    }

    fn get(&self, field: &str) -> Result<&Value> {
        self.fields.get(field).filter(|v| !v.is_null()).ok_or_else(|| self.err(field, "missing"))
    }

    fn string(&self, field: &str) -> Result<String> {
        match self.get(field)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.err(field, format!("expected a string, found {}", kind(other)))),
        }
    }

    fn non_empty(&self, field: &str) -> Result<String> {
        let s = self.string(field)?;
        if s.is_empty() {
            return Err(self.err(field, "is empty"));
        }
        Ok(s)
    }

    /// A list of `{role, content}` messages with known roles.
    fn messages(&self, field: &str, roles: &[(&str, &str)]) -> Result<Vec<ChatMessage>> {
        let list = match self.get(field)? {
            Value::Array(a) => a,
            other => return Err(self.err(field, format!("expected a list of messages, found {}", kind(other)))),
        };
        if list.is_empty() {
            return Err(self.err(field, "is an empty list of messages"));
        }
        list.iter()
            .enumerate()
            .map(|(i, m)| {
                let f = format!("{field}[{i}]");
                let obj =
                    m.as_object().ok_or_else(|| self.err(&f, format!("expected an object, found {}", kind(m))))?;
                let role = match obj.get("role") {
                    Some(Value::String(r)) => r,
                    Some(other) => {
                        return Err(self.err(&format!("{f}.role"), format!("expected a string, found {}", kind(other))));
                    }
                    None => return Err(self.err(&format!("{f}.role"), "missing")),
                };
                let role = roles.iter().find(|(from, _)| from == role).map(|(_, to)| *to).ok_or_else(|| {
                    let known: Vec<&str> = roles.iter().map(|(r, _)| *r).collect();
                    self.err(&format!("{f}.role"), format!("unknown role {role:?} (expected one of {known:?})"))
                })?;
                let content = match obj.get("content") {
                    Some(Value::String(c)) => c.clone(),
                    Some(other) => {
                        return Err(
                            self.err(&format!("{f}.content"), format!("expected a string, found {}", kind(other)))
                        );
                    }
                    None => return Err(self.err(&format!("{f}.content"), "missing")),
                };
                Ok(ChatMessage::new(role, content))
            })
            .collect()
    }

    fn content(&self, field: &str) -> Result<Content> {
        match self.get(field)? {
            Value::String(s) if s.is_empty() => Err(self.err(field, "is empty")),
            Value::String(s) => Ok(Content::Text(s.clone())),
            Value::Array(_) => Ok(Content::Messages(self.messages(field, CHAT_ROLES)?)),
            other => Err(self.err(field, format!("expected a string or a list of messages, found {}", kind(other)))),
        }
    }
}

const CHAT_ROLES: &[(&str, &str)] = &[("system", "system"), ("user", "user"), ("assistant", "assistant")];
const SCORED_ROLES: &[(&str, &str)] = &[("human", "user"), ("assistant", "assistant")];

/// Roles must alternate user/assistant after an optional leading system message.
fn check_alternation(row: &Row, field: &str, msgs: &[ChatMessage], first: &str) -> Result<()> {
    let start = usize::from(msgs.first().is_some_and(|m| m.role == "system"));
    let mut expect = first;
    for (i, m) in msgs.iter().enumerate().skip(start) {
        if m.role != expect {
            return Err(row.err(
                &format!("{field}[{i}].role"),
                format!("roles do not alternate: expected {expect:?}, found {:?}", m.role),
            ));
        }
        expect = if expect == "user" { "assistant" } else { "user" };
    }
    Ok(())
}

fn detect(fields: &Map<String, Value>) -> Option<SchemaKind> {
    let has = |k: &str| fields.get(k).is_some_and(|v| !v.is_null());
    Some(if has("chosen") && has("rejected") {
        SchemaKind::Preference
    } else if has("conversation") && has("meta_eval_score") {
        SchemaKind::ScoredConversation
    } else if has("messages") {
        SchemaKind::Conversation
    } else if has("prompt") && has("completion") && has("label") {
        SchemaKind::UnpairedPreference
    } else if has("prompt") && has("completion") {
        SchemaKind::PromptCompletion
    } else if has("prompt") && has("answer") {
        SchemaKind::PromptAnswer
    } else if has("text") {
        SchemaKind::Text
    } else if has("prompt") {
        SchemaKind::PromptOnly
    } else {
        return None;
    })
}

/// TRL's implicit prompt: the shared prefix of chosen and rejected (whole messages for
/// conversations; characters for text, backing off a trailing space so the completions
/// keep their leading space).
fn split_implicit_prompt(row: &Row, chosen: Content, rejected: Content) -> Result<(Content, Content, Content)> {
    match (chosen, rejected) {
        (Content::Messages(c), Content::Messages(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if n == 0 {
                return Err(row.err("prompt", "missing, and chosen and rejected share no leading messages"));
            }
            if n == c.len() || n == r.len() {
                return Err(row.err("chosen", "chosen and rejected are identical up to the shorter one's end"));
            }
            Ok((
                Content::Messages(c[..n].to_vec()),
                Content::Messages(c[n..].to_vec()),
                Content::Messages(r[n..].to_vec()),
            ))
        }
        (Content::Text(c), Content::Text(r)) => {
            let mut n = c.char_indices().zip(r.chars()).take_while(|((_, a), b)| a == b).count();
            let mut byte = c.char_indices().nth(n).map_or(c.len(), |(i, _)| i);
            if n > 0 && c[..byte].ends_with(' ') {
                n -= 1;
                byte -= 1;
            }
            if n == 0 {
                return Err(row.err("prompt", "missing, and chosen and rejected share no prefix"));
            }
            if byte >= c.len() || byte >= r.len() {
                return Err(row.err("chosen", "chosen and rejected are identical up to the shorter one's end"));
            }
            Ok((
                Content::Text(c[..byte].to_string()),
                Content::Text(c[byte..].to_string()),
                Content::Text(r[byte..].to_string()),
            ))
        }
        _ => Err(row.err("rejected", "chosen and rejected must both be text or both be messages")),
    }
}

fn check_prompt_completion(row: &Row, prompt: &Content, completion: &Content, completion_field: &str) -> Result<()> {
    match (prompt, completion) {
        (Content::Text(_), Content::Text(_)) => Ok(()),
        (Content::Messages(p), Content::Messages(c)) => {
            check_alternation(row, "prompt", p, "user")?;
            if p.last().is_some_and(|m| m.role != "user") {
                return Err(row.err("prompt", "a conversational prompt must end with a user message"));
            }
            check_alternation(row, completion_field, c, "assistant")?;
            if c.iter().any(|m| m.content.is_empty()) {
                return Err(row.err(completion_field, "has an empty message"));
            }
            Ok(())
        }
        _ => Err(row.err(completion_field, "prompt and completion must both be text or both be messages")),
    }
}

impl SchemaKind {
    /// The column that says a row means this schema even when the row is broken.
    fn key_field(self) -> &'static str {
        match self {
            SchemaKind::Auto => "",
            SchemaKind::Text => "text",
            SchemaKind::PromptCompletion | SchemaKind::PromptOnly => "prompt",
            SchemaKind::Conversation => "messages",
            SchemaKind::Preference => "chosen",
            SchemaKind::UnpairedPreference => "completion",
            SchemaKind::PromptAnswer => "answer",
            SchemaKind::ScoredConversation => "conversation",
        }
    }
}

impl Example {
    /// Parse and validate one row for a stage that reads only `accepts` (empty: any).
    /// Under `auto`, a row detected as another kind is parsed as the first accepted kind
    /// whose key column it has, so a broken row gets that schema's error (`field
    /// completion: missing`, with file and line) rather than a wrong kind; a row with none
    /// of them is refused at its line.
    pub fn from_record_as(record: &Record, schema: SchemaKind, accepts: &[SchemaKind]) -> Result<Example> {
        if schema != SchemaKind::Auto || accepts.is_empty() {
            return Self::from_record(record, schema);
        }
        let detected = detect(&record.fields);
        if detected.is_some_and(|d| accepts.contains(&d)) {
            return Self::from_record(record, SchemaKind::Auto);
        }
        let has = |k: &str| record.fields.get(k).is_some();
        match accepts.iter().find(|a| has(a.key_field())) {
            Some(&kind) => Self::from_record(record, kind),
            None => {
                let cols: Vec<&String> = record.fields.keys().collect();
                let wanted: Vec<String> = accepts.iter().map(|a| format!("{a:?}")).collect();
                Err(DataError::at(
                    &record.location,
                    None,
                    format!(
                        "the columns {cols:?} are {}, but this stage reads {} rows (map columns with `columns`)",
                        detected.map_or("no known schema".to_string(), |d| format!("{d:?} data")),
                        wanted.join(" or ")
                    ),
                ))
            }
        }
    }

    /// Parse and validate one row under `schema`.
    pub fn from_record(record: &Record, schema: SchemaKind) -> Result<Example> {
        let row = Row { loc: &record.location, fields: &record.fields };
        let schema = match schema {
            SchemaKind::Auto => detect(&record.fields).ok_or_else(|| {
                let cols: Vec<&String> = record.fields.keys().collect();
                DataError::at(
                    &record.location,
                    None,
                    format!("no known schema fits the columns {cols:?} (map columns with `columns`)"),
                )
            })?,
            s => s,
        };
        Ok(match schema {
            SchemaKind::Auto => unreachable!("resolved above"),
            SchemaKind::Text => Example::Text { text: row.non_empty("text")? },
            SchemaKind::PromptCompletion => {
                let (prompt, completion) = (row.content("prompt")?, row.content("completion")?);
                check_prompt_completion(&row, &prompt, &completion, "completion")?;
                Example::PromptCompletion { prompt, completion }
            }
            SchemaKind::Conversation => {
                let messages = row.messages("messages", CHAT_ROLES)?;
                check_alternation(&row, "messages", &messages, "user")?;
                if !messages.iter().any(|m| m.role == "assistant") {
                    return Err(row.err("messages", "has no assistant message to train on"));
                }
                if let Some((i, _)) =
                    messages.iter().enumerate().find(|(_, m)| m.role == "assistant" && m.content.is_empty())
                {
                    return Err(row.err(&format!("messages[{i}].content"), "is empty"));
                }
                Example::Conversation { messages }
            }
            SchemaKind::Preference => {
                let (chosen, rejected) = (row.content("chosen")?, row.content("rejected")?);
                let (prompt, chosen, rejected) = if row.fields.get("prompt").is_some_and(|v| !v.is_null()) {
                    (row.content("prompt")?, chosen, rejected)
                } else {
                    split_implicit_prompt(&row, chosen, rejected)?
                };
                check_prompt_completion(&row, &prompt, &chosen, "chosen")?;
                check_prompt_completion(&row, &prompt, &rejected, "rejected")?;
                let margin = match row.fields.get("margin") {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => Some(
                        n.as_f64().filter(|x| x.is_finite()).ok_or_else(|| row.err("margin", "not a finite number"))?,
                    ),
                    Some(other) => return Err(row.err("margin", format!("expected a number, found {}", kind(other)))),
                };
                Example::Preference { prompt, chosen, rejected, margin }
            }
            SchemaKind::UnpairedPreference => {
                let (prompt, completion) = (row.content("prompt")?, row.content("completion")?);
                check_prompt_completion(&row, &prompt, &completion, "completion")?;
                let label = match row.get("label")? {
                    Value::Bool(b) => *b,
                    other => return Err(row.err("label", format!("expected true or false, found {}", kind(other)))),
                };
                Example::UnpairedPreference { prompt, completion, label }
            }
            SchemaKind::PromptAnswer => {
                let prompt = row.content("prompt")?;
                if let Content::Messages(m) = &prompt {
                    check_alternation(&row, "prompt", m, "user")?;
                }
                let answer = match row.get("answer")? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => {
                        return Err(row.err("answer", format!("expected a string or a number, found {}", kind(other))));
                    }
                };
                Example::PromptAnswer { prompt, answer }
            }
            SchemaKind::PromptOnly => {
                let prompt = row.content("prompt")?;
                if let Content::Messages(m) = &prompt {
                    check_alternation(&row, "prompt", m, "user")?;
                }
                Example::PromptOnly { prompt }
            }
            SchemaKind::ScoredConversation => {
                let messages = row.messages("conversation", SCORED_ROLES)?;
                check_alternation(&row, "conversation", &messages, "user")?;
                let score = match row.get("meta_eval_score")? {
                    Value::Number(n) => n
                        .as_f64()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| row.err("meta_eval_score", "not a finite number"))?,
                    other => {
                        return Err(row.err("meta_eval_score", format!("expected a number, found {}", kind(other))));
                    }
                };
                let reason = match row.fields.get("score_reason") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => {
                        return Err(row.err("score_reason", format!("expected a string, found {}", kind(other))));
                    }
                };
                Example::ScoredConversation { messages, score, reason }
            }
        })
    }
}
