//! Examples to token ids with loss masks.
//!
//! - `text`: every token is trained on; EOS appended.
//! - plain prompt/completion (and preference, unpaired): prompt and prompt+completion are
//!   tokenised separately and split at their common prefix (TRL), the completion gets EOS
//!   appended as an id, and only completion tokens are trained on. The mask comes from the
//!   structure, not from `id != pad`, so EOS stays in the loss when `pad == eos`.
//! - conversations: the chat format renders the whole conversation; assistant turns
//!   (including their end-of-turn marker) are trained on, located by rendering prefixes.

use align_model::{ChatMessage, ChatTemplate, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::schema::{Content, Example};

/// How conversations become text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatFormat {
    /// The model's own chat template (tokenizer_config.json or GGUF metadata).
    #[default]
    Template,
    /// No markup: each turn's content followed by "\n\n"; the generation prompt is empty.
    Standard,
    /// `<|{role}|>\n{content}\n` per turn; generation prompt `<|assistant|>\n`.
    RoleMarkers,
    /// `### {Role}:\n{content}\n\n` per turn (Role capitalised: System, User, Assistant);
    /// generation prompt `### Assistant:\n`.
    TurnMarkers,
}

/// Renders conversations in one [`ChatFormat`].
pub struct Formatter<'a> {
    pub format: ChatFormat,
    /// The model's template, or why it has none usable.
    pub template: std::result::Result<&'a ChatTemplate, String>,
}

impl Formatter<'_> {
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let turn = |m: &ChatMessage| match self.format {
            ChatFormat::Standard => format!("{}\n\n", m.content),
            ChatFormat::RoleMarkers => format!("<|{}|>\n{}\n", m.role, m.content),
            _ => {
                let mut role = m.role.clone();
                if let Some(f) = role.get_mut(0..1) {
                    f.make_ascii_uppercase();
                }
                format!("### {role}:\n{}\n\n", m.content)
            }
        };
        let generation = match self.format {
            ChatFormat::Standard => "",
            ChatFormat::RoleMarkers => "<|assistant|>\n",
            _ => "### Assistant:\n",
        };
        match self.format {
            ChatFormat::Template => {
                let t = self.template.as_ref().map_err(|e| {
                    DataError::Config(format!("chat_format = \"template\" needs the model's chat template: {e}"))
                })?;
                Ok(t.render(messages, add_generation_prompt, None)?)
            }
            _ => {
                let mut s: String = messages.iter().map(turn).collect();
                if add_generation_prompt {
                    s.push_str(generation);
                }
                Ok(s)
            }
        }
    }

    /// The rendered conversation as pieces, `true` where an assistant turn is.
    pub fn pieces(&self, messages: &[ChatMessage]) -> Result<Vec<(String, bool)>> {
        let full = self.render(messages, false)?;
        let mut pieces = Vec::new();
        let mut done = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) || before.len() < done {
                return Err(DataError::Config(format!(
                    "the chat format does not render conversations prefix by prefix (at message {i}), so \
                     assistant tokens cannot be located; use chat_format = \"role_markers\" or another named format"
                )));
            }
            pieces.push((full[done..before.len()].to_string(), false));
            pieces.push((full[before.len()..through.len()].to_string(), true));
            done = through.len();
        }
        if done < full.len() {
            pieces.push((full[done..].to_string(), false));
        }
        Ok(pieces)
    }
}

/// Truncation applied while tokenising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first tokens (drop the end).
    KeepStart,
    /// Keep the last tokens (drop the beginning) — TRL's default for prompts.
    #[default]
    KeepEnd,
}

/// Tokenisation settings (documented defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeConfig {
    /// Longest sequence (prompt + completion); `None` = no limit. Default 1024.
    pub max_length: Option<usize>,
    /// Longest prompt, truncated first (and never beyond max_length); `None` = no limit. Default 512.
    pub max_prompt_length: Option<usize>,
    /// Which end of the prompt survives truncation. Default keep_end.
    pub prompt_truncation: Truncation,
    /// How conversations are rendered. Default template.
    pub chat_format: ChatFormat,
    /// Append EOS to plain-text completions and `text` rows. Default true.
    pub append_eos: bool,
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        TokenizeConfig {
            max_length: Some(1024),
            max_prompt_length: Some(512),
            prompt_truncation: Truncation::KeepEnd,
            chat_format: ChatFormat::Template,
            append_eos: true,
        }
    }
}

/// A sequence to train on: ids and which of them are in the loss.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenizedSequence {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl TokenizedSequence {
    /// A prompt followed by a completion, the completion in the loss.
    pub fn completion(prompt: &[u32], completion: &[u32]) -> Self {
        TokenizedSequence {
            input_ids: prompt.iter().chain(completion).copied().collect(),
            loss_mask: std::iter::repeat_n(false, prompt.len())
                .chain(std::iter::repeat_n(true, completion.len()))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Tokens in the loss.
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// A prompt with its completion(s), split where the completion starts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenizedPrompted {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// What one example becomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Tokenized {
    /// text, prompt/completion, conversation, scored conversation
    Sequence(TokenizedSequence),
    /// preference pair sharing one prompt, with the row's margin if it has one
    Pair { prompt_ids: Vec<u32>, chosen_ids: Vec<u32>, rejected_ids: Vec<u32>, margin: Option<f64> },
    /// unpaired preference
    Labelled { prompted: TokenizedPrompted, label: bool },
    /// prompt only (RL), with the ground truth when the row has one
    Prompt { prompt_ids: Vec<u32>, answer: Option<String> },
}

/// Truncation counters for the stage log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TruncationStats {
    pub rows: usize,
    pub truncated_rows: usize,
    pub dropped_tokens: usize,
}

/// Tokenises examples with one tokenizer and config, counting truncation.
pub struct ExampleTokenizer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub config: TokenizeConfig,
    pub stats: TruncationStats,
    /// The tokenizer's longest token in bytes (see [`Self::text_cap`]).
    longest_token: usize,
}

impl<'a> ExampleTokenizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer, config: TokenizeConfig) -> Self {
        let longest_token = tokenizer.max_token_bytes().max(1);
        ExampleTokenizer { tokenizer, config, stats: TruncationStats::default(), longest_token }
    }

    /// The most bytes of one text field that can matter under `max_length`: no token is
    /// longer than the tokenizer's longest, so text beyond `max_length` of them is cut
    /// whatever it says. `None` without a `max_length`.
    fn text_cap(&self) -> Option<usize> {
        self.config.max_length.map(|n| n.saturating_mul(self.longest_token).saturating_add(1024))
    }

    /// `ex` with every text field cut to [`Self::text_cap`] bytes before tokenising, so a
    /// huge row costs memory in proportion to `max_length`, not to its size (the
    /// tokenizer needs some hundred bytes per input byte). A prompt kept by its end is
    /// cut at its start; everything else at its end. Those tokens would be truncated
    /// anyway: the result is the same.
    fn bounded<'e>(&self, ex: &'e Example) -> std::borrow::Cow<'e, Example> {
        let Some(cap) = self.text_cap() else { return std::borrow::Cow::Borrowed(ex) };
        let keep_end = self.config.prompt_truncation == Truncation::KeepEnd;
        if !example_texts(ex).any(|t| t.len() > cap) {
            return std::borrow::Cow::Borrowed(ex);
        }
        let mut ex = ex.clone();
        let cut_content = |c: &mut Content, keep_end: bool| match c {
            Content::Text(t) => cut_text(t, cap, keep_end),
            Content::Messages(m) => m.iter_mut().for_each(|m| cut_text(&mut m.content, cap, keep_end)),
        };
        match &mut ex {
            Example::Text { text } => cut_text(text, cap, false),
            Example::PromptCompletion { prompt, completion }
            | Example::UnpairedPreference { prompt, completion, .. } => {
                cut_content(prompt, keep_end);
                cut_content(completion, false);
            }
            Example::Preference { prompt, chosen, rejected, .. } => {
                cut_content(prompt, keep_end);
                cut_content(chosen, false);
                cut_content(rejected, false);
            }
            Example::PromptAnswer { prompt, .. } | Example::PromptOnly { prompt } => cut_content(prompt, keep_end),
            Example::Conversation { messages } | Example::ScoredConversation { messages, .. } => {
                messages.iter_mut().for_each(|m| cut_text(&mut m.content, cap, false))
            }
        }
        std::borrow::Cow::Owned(ex)
    }

    fn formatter(&self) -> Formatter<'a> {
        Formatter { format: self.config.chat_format, template: self.tokenizer.template().map_err(|e| e.to_string()) }
    }

    fn eos(&self) -> Result<Option<u32>> {
        if !self.config.append_eos {
            return Ok(None);
        }
        self.tokenizer
            .eos_token_id
            .map(Some)
            .ok_or_else(|| DataError::Config("append_eos is on but the tokenizer has no EOS token".into()))
    }

    /// A conversation (rendered) as one sequence with assistant-only loss.
    fn conversation(&self, messages: &[ChatMessage]) -> Result<TokenizedSequence> {
        let pieces = self.formatter().pieces(messages)?;
        let text: String = pieces.iter().map(|(p, _)| p.as_str()).collect();
        let mut spans = Vec::new();
        let mut at = 0;
        for (p, train) in &pieces {
            if *train {
                spans.push((at, at + p.len()));
            }
            at += p.len();
        }
        let (ids, offsets) = self.tokenizer.encode_with_offsets(&text, false)?;
        let loss_mask = offsets.iter().map(|&(s, _)| spans.iter().any(|&(a, b)| s >= a && s < b)).collect();
        Ok(TokenizedSequence { input_ids: ids, loss_mask })
    }

    /// Prompt and completion text: split at the common prefix of the two tokenisations.
    fn split(&self, prompt: &str, completion: &str, eos: bool) -> Result<TokenizedPrompted> {
        let p = self.tokenizer.encode(prompt, false)?;
        let full = self.tokenizer.encode(&format!("{prompt}{completion}"), false)?;
        let n = p.iter().zip(&full).take_while(|(a, b)| a == b).count();
        let mut completion_ids = full[n..].to_vec();
        if eos && let Some(e) = self.eos()? {
            completion_ids.push(e);
        }
        Ok(TokenizedPrompted { prompt_ids: full[..n].to_vec(), completion_ids })
    }

    /// Render a conversational prompt/completion and split it the same way.
    fn split_content(&mut self, prompt: &Content, completion: &Content) -> Result<TokenizedPrompted> {
        match (prompt, completion) {
            (Content::Text(p), Content::Text(c)) => self.split(p, c, true),
            (Content::Messages(p), Content::Messages(c)) => {
                let f = self.formatter();
                let ptext = f.render(p, true)?;
                let all: Vec<ChatMessage> = p.iter().chain(c).cloned().collect();
                let full = f.render(&all, false)?;
                let ctext = full.strip_prefix(ptext.as_str()).ok_or_else(|| {
                    DataError::Config(
                        "the chat format's generation prompt is not a prefix of the full conversation".into(),
                    )
                })?;
                // The template ends turns itself: no extra EOS.
                self.split(&ptext, ctext, false)
            }
            _ => Err(DataError::Config("prompt and completion must both be text or both be messages".into())),
        }
    }

    fn prompt_ids(&self, prompt: &Content) -> Result<Vec<u32>> {
        Ok(match prompt {
            Content::Text(p) => self.tokenizer.encode(p, false)?,
            Content::Messages(m) => self.tokenizer.encode(&self.formatter().render(m, true)?, false)?,
        })
    }

    /// Apply max_prompt_length to the prompt, then max_length to prompt + each completion
    /// (the prompt too, if it alone is longer); returns tokens dropped.
    fn truncate(&self, prompt: &mut Vec<u32>, completions: &mut [&mut Vec<u32>]) -> usize {
        let mut dropped = 0;
        let limit = match (self.config.max_prompt_length, self.config.max_length) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(mp) = limit
            && prompt.len() > mp
        {
            dropped += prompt.len() - mp;
            match self.config.prompt_truncation {
                Truncation::KeepStart => prompt.truncate(mp),
                Truncation::KeepEnd => {
                    prompt.drain(..prompt.len() - mp);
                }
            }
        }
        if let Some(ml) = self.config.max_length {
            let room = ml.saturating_sub(prompt.len());
            for c in completions.iter_mut() {
                if c.len() > room {
                    dropped += c.len() - room;
                    c.truncate(room);
                }
            }
        }
        dropped
    }

    fn truncate_sequence(&self, s: &mut TokenizedSequence) -> usize {
        match self.config.max_length {
            Some(ml) if s.len() > ml => {
                let n = s.len() - ml;
                s.input_ids.truncate(ml);
                s.loss_mask.truncate(ml);
                n
            }
            _ => 0,
        }
    }

    /// Tokenise many examples on `threads` threads (order kept; counts merged). Stops at
    /// the first error.
    pub fn tokenize_all(&mut self, examples: &[Example], threads: usize) -> Result<Vec<Tokenized>> {
        let threads = threads.max(1).min(examples.len().max(1));
        let chunk = examples.len().div_ceil(threads).max(1);
        let (tokenizer, config) = (self.tokenizer, self.config.clone());
        let parts: Vec<Result<(Vec<Tokenized>, TruncationStats)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = examples
                .chunks(chunk)
                .map(|part| {
                    let config = config.clone();
                    scope.spawn(move || {
                        let mut t = ExampleTokenizer::new(tokenizer, config);
                        let out = part.iter().map(|e| t.tokenize(e)).collect::<Result<Vec<_>>>()?;
                        Ok((out, t.stats))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("tokenizer thread panicked")).collect()
        });
        let mut out = Vec::with_capacity(examples.len());
        for part in parts {
            let (items, stats) = part?;
            self.stats.rows += stats.rows;
            self.stats.truncated_rows += stats.truncated_rows;
            self.stats.dropped_tokens += stats.dropped_tokens;
            out.extend(items);
        }
        Ok(out)
    }

    /// Write the truncation counts to the stage log.
    pub fn log_stats(&self, what: &str) {
        let s = self.stats;
        tracing::info!(
            data = what,
            rows = s.rows,
            truncated_rows = s.truncated_rows,
            dropped_tokens = s.dropped_tokens,
            "tokenised"
        );
    }

    fn count(&mut self, dropped: usize) {
        self.stats.rows += 1;
        if dropped > 0 {
            self.stats.truncated_rows += 1;
            self.stats.dropped_tokens += dropped;
        }
    }

    /// The prompt an RL stage generates from, truncated by `max_prompt_length` (keeping
    /// the configured end): a row's `prompt` (chat template applied to messages, with the
    /// generation prompt), or a conversation's turns before its last assistant turn.
    /// `None` for plain text, which has no prompt.
    pub fn generation_prompt(&mut self, ex: &Example) -> Result<Option<Vec<u32>>> {
        let ex = self.bounded(ex);
        let mut ids = match ex.as_ref() {
            Example::Text { .. } => return Ok(None),
            Example::PromptCompletion { prompt, .. }
            | Example::Preference { prompt, .. }
            | Example::UnpairedPreference { prompt, .. }
            | Example::PromptAnswer { prompt, .. }
            | Example::PromptOnly { prompt } => self.prompt_ids(prompt)?,
            Example::Conversation { messages } | Example::ScoredConversation { messages, .. } => {
                let last = messages.iter().rposition(|m| m.role == "assistant").unwrap_or(messages.len());
                if last == 0 {
                    return Err(DataError::Config("a conversation with no turn before its assistant reply".into()));
                }
                self.prompt_ids(&Content::Messages(messages[..last].to_vec()))?
            }
        };
        let d = self.truncate(&mut ids, &mut []);
        self.count(d);
        Ok(Some(ids))
    }

    /// Tokenise one example.
    pub fn tokenize(&mut self, ex: &Example) -> Result<Tokenized> {
        let sequence = |p: TokenizedPrompted| TokenizedSequence::completion(&p.prompt_ids, &p.completion_ids);
        let ex = self.bounded(ex);
        let out = match ex.as_ref() {
            Example::Text { text } => {
                let mut ids = self.tokenizer.encode(text, false)?;
                ids.extend(self.eos()?);
                let mut s = TokenizedSequence { loss_mask: vec![true; ids.len()], input_ids: ids };
                let d = self.truncate_sequence(&mut s);
                self.count(d);
                Tokenized::Sequence(s)
            }
            Example::PromptCompletion { prompt, completion } => {
                let mut p = self.split_content(prompt, completion)?;
                let d = self.truncate(&mut p.prompt_ids, &mut [&mut p.completion_ids]);
                self.count(d);
                Tokenized::Sequence(sequence(p))
            }
            Example::Conversation { messages } | Example::ScoredConversation { messages, .. } => {
                let mut s = self.conversation(messages)?;
                let d = self.truncate_sequence(&mut s);
                self.count(d);
                Tokenized::Sequence(s)
            }
            Example::Preference { prompt, chosen, rejected, margin } => {
                let c = self.split_content(prompt, chosen)?;
                let r = self.split_content(prompt, rejected)?;
                // One prompt for both: the shorter common prefix, the rest moves to each completion.
                let n = c.prompt_ids.len().min(r.prompt_ids.len());
                let mut prompt_ids = c.prompt_ids[..n].to_vec();
                let mut chosen_ids: Vec<u32> = c.prompt_ids[n..].iter().chain(&c.completion_ids).copied().collect();
                let mut rejected_ids: Vec<u32> = r.prompt_ids[n..].iter().chain(&r.completion_ids).copied().collect();
                let d = self.truncate(&mut prompt_ids, &mut [&mut chosen_ids, &mut rejected_ids]);
                self.count(d);
                Tokenized::Pair { prompt_ids, chosen_ids, rejected_ids, margin: *margin }
            }
            Example::UnpairedPreference { prompt, completion, label } => {
                let mut p = self.split_content(prompt, completion)?;
                let d = self.truncate(&mut p.prompt_ids, &mut [&mut p.completion_ids]);
                self.count(d);
                Tokenized::Labelled { prompted: p, label: *label }
            }
            Example::PromptAnswer { prompt, answer } => {
                let mut prompt_ids = self.prompt_ids(prompt)?;
                let d = self.truncate(&mut prompt_ids, &mut []);
                self.count(d);
                Tokenized::Prompt { prompt_ids, answer: Some(answer.clone()) }
            }
            Example::PromptOnly { prompt } => {
                let mut prompt_ids = self.prompt_ids(prompt)?;
                let d = self.truncate(&mut prompt_ids, &mut []);
                self.count(d);
                Tokenized::Prompt { prompt_ids, answer: None }
            }
        };
        Ok(out)
    }
}

/// Every text field of an example.
fn example_texts(ex: &Example) -> Box<dyn Iterator<Item = &str> + '_> {
    fn content(c: &Content) -> Vec<&str> {
        match c {
            Content::Text(t) => vec![t.as_str()],
            Content::Messages(m) => m.iter().map(|m| m.content.as_str()).collect(),
        }
    }
    match ex {
        Example::Text { text } => Box::new(std::iter::once(text.as_str())),
        Example::PromptCompletion { prompt, completion } | Example::UnpairedPreference { prompt, completion, .. } => {
            Box::new(content(prompt).into_iter().chain(content(completion)))
        }
        Example::Preference { prompt, chosen, rejected, .. } => {
            Box::new(content(prompt).into_iter().chain(content(chosen)).chain(content(rejected)))
        }
        Example::PromptAnswer { prompt, .. } | Example::PromptOnly { prompt } => Box::new(content(prompt).into_iter()),
        Example::Conversation { messages } | Example::ScoredConversation { messages, .. } => {
            Box::new(messages.iter().map(|m| m.content.as_str()))
        }
    }
}

/// Cut `text` to at most `cap` bytes (at a character boundary), keeping its end or start.
fn cut_text(text: &mut String, cap: usize, keep_end: bool) {
    if text.len() <= cap {
        return;
    }
    if keep_end {
        let from = text.ceil_char_boundary(text.len() - cap);
        text.drain(..from);
    } else {
        let to = text.floor_char_boundary(cap);
        text.truncate(to);
    }
}
