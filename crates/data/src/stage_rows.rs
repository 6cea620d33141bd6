//! What each training stage reads from a dataset, tokenised: SFT sequences, preference
//! pairs, labelled completions (KTO) and generation prompts (online RL). A row of the wrong
//! kind, or one that truncation left empty, is an error naming the file and the example.

use align_model::Tokenizer;

use crate::scored::{CritiqueTask, ScoreCondition};
use crate::{
    DataError, DatasetConfig, Example, ExampleTokenizer, Result, SchemaKind, TokenizeConfig, Tokenized,
    TokenizedSequence,
};

/// The rows SFT trains on.
pub const SFT_ROWS: &[SchemaKind] =
    &[SchemaKind::Text, SchemaKind::PromptCompletion, SchemaKind::Conversation, SchemaKind::ScoredConversation];
const PAIR_ROWS: &[SchemaKind] = &[SchemaKind::Preference];
const LABELLED_ROWS: &[SchemaKind] = &[SchemaKind::UnpairedPreference, SchemaKind::Preference];
/// Every kind with a prompt (all but plain text).
const PROMPT_ROWS: &[SchemaKind] = &[
    SchemaKind::PromptOnly,
    SchemaKind::PromptAnswer,
    SchemaKind::PromptCompletion,
    SchemaKind::Conversation,
    SchemaKind::ScoredConversation,
    SchemaKind::Preference,
    SchemaKind::UnpairedPreference,
];

/// The rows of `data` a stage reading `accepts` takes; none is an error naming the file.
fn stage_examples(data: &DatasetConfig, accepts: &[SchemaKind]) -> Result<Vec<Example>> {
    let (examples, report) = crate::load_examples_as(data, accepts)?;
    if examples.is_empty() {
        let why = match report.skipped {
            0 => "the data has no rows".to_string(),
            n => format!("all {n} rows were invalid and skipped"),
        };
        return Err(DataError::file(&data.path, format!("no examples to train on: {why}")));
    }
    Ok(examples)
}

/// Every row of `data` tokenised (on all cores); `what` names the set in the log.
pub fn tokenized_rows(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
) -> Result<Vec<Tokenized>> {
    tokenize_rows(tok, data, cfg, what, &[])
}

fn tokenize_rows(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
    accepts: &[SchemaKind],
) -> Result<Vec<Tokenized>> {
    let examples = stage_examples(data, accepts)?;
    let mut t = ExampleTokenizer::new(tok, cfg.clone());
    let out = t.tokenize_all(&examples, std::thread::available_parallelism().map_or(1, |n| n.get()))?;
    t.log_stats(what);
    Ok(out)
}

fn refuse(data: &DatasetConfig, i: usize, message: &str) -> DataError {
    DataError::file(&data.path, format!("example {} (counting from 1, after skip) {message}", i + 1))
}

/// SFT: each row's sequence and loss mask (completion, assistant turns or all text).
pub fn sft_sequences(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
) -> Result<Vec<TokenizedSequence>> {
    Ok(sft_rows(tok, data, cfg, what, ScoredSft::default())?.into_iter().map(|r| r.seq).collect())
}

/// Extra SFT examples and conditioning drawn from scored conversations.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScoredSft<'a> {
    /// Prefix each row's first user turn with its score's control string.
    pub condition: Option<&'a ScoreCondition>,
    /// Add each row's critique example (rows with a `score_reason`).
    pub critique: Option<&'a CritiqueTask>,
}

/// A row SFT trains on, with what it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SftRow {
    pub seq: TokenizedSequence,
    /// The row's `meta_eval_score` (scored conversations).
    pub score: Option<f64>,
    /// The critique example of a scored conversation (not its reply).
    pub critique: bool,
    /// The example it came from (0-based, after skip).
    pub example: usize,
}

/// SFT rows: each example's sequence (conditioned on its score when `scored.condition`),
/// followed by its critique example when `scored.critique` and the row has a reason.
/// Conditioning a row without a score is an error naming the file and the example.
pub fn sft_rows(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
    scored: ScoredSft,
) -> Result<Vec<SftRow>> {
    let examples = stage_examples(data, SFT_ROWS)?;
    // (example index, score, critique) of each expanded example, for errors and the rows.
    let mut origin = Vec::with_capacity(examples.len());
    let mut expanded = Vec::with_capacity(examples.len());
    for (i, ex) in examples.into_iter().enumerate() {
        let Example::ScoredConversation { messages, score, reason } = ex else {
            if scored.condition.is_some() {
                return Err(refuse(
                    data,
                    i,
                    "has no meta_eval_score to condition on (score conditioning needs scored conversations)",
                ));
            }
            origin.push((i, None, false));
            expanded.push(ex);
            continue;
        };
        let critique = match (scored.critique, &reason) {
            (Some(t), Some(r)) => Some(
                t.example(&messages, score, r).ok_or_else(|| refuse(data, i, "has no assistant turn to critique"))?,
            ),
            _ => None,
        };
        let main = match scored.condition {
            Some(c) => c
                .conversation(&messages, score)
                .ok_or_else(|| refuse(data, i, "has no user turn to put the score's control string in"))?,
            None => messages,
        };
        origin.push((i, Some(score), false));
        expanded.push(Example::ScoredConversation { messages: main, score, reason });
        if let Some(messages) = critique {
            origin.push((i, Some(score), true));
            expanded.push(Example::Conversation { messages });
        }
    }
    if scored.critique.is_some() && !origin.iter().any(|o| o.2) {
        return Err(DataError::file(
            &data.path,
            "self-critique needs scored conversations with a score_reason; no row has one",
        ));
    }
    let mut t = ExampleTokenizer::new(tok, cfg.clone());
    let out = t.tokenize_all(&expanded, std::thread::available_parallelism().map_or(1, |n| n.get()))?;
    t.log_stats(what);
    out.into_iter()
        .zip(origin)
        .map(|(x, (i, score, critique))| match x {
            Tokenized::Sequence(seq) if seq.loss_tokens() > 0 => Ok(SftRow { seq, score, critique, example: i }),
            Tokenized::Sequence(_) if critique => {
                Err(refuse(data, i, "has no critique tokens to train on after truncation (raise max_length)"))
            }
            Tokenized::Sequence(_) => Err(refuse(data, i, "has no tokens to train on after truncation")),
            _ => Err(refuse(data, i, "is not SFT data (preference or prompt-only rows need another stage)")),
        })
        .collect()
}

/// A preference pair: both rows share the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: TokenizedSequence,
    pub rejected: TokenizedSequence,
    pub margin: Option<f64>,
}

/// Pairwise stages: each row's pair.
pub fn preference_pairs(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
) -> Result<Vec<PreferencePair>> {
    let rows = tokenize_rows(tok, data, cfg, what, PAIR_ROWS)?;
    rows.into_iter()
        .enumerate()
        .map(|(i, x)| match x {
            Tokenized::Pair { prompt_ids, chosen_ids, rejected_ids, margin } => {
                if chosen_ids.is_empty() || rejected_ids.is_empty() {
                    return Err(refuse(data, i, "has an empty completion after truncation"));
                }
                let chosen = TokenizedSequence::completion(&prompt_ids, &chosen_ids);
                Ok(PreferencePair {
                    chosen,
                    rejected: TokenizedSequence::completion(&prompt_ids, &rejected_ids),
                    margin,
                })
            }
            _ => Err(refuse(data, i, "is not a preference pair (needs chosen and rejected)")),
        })
        .collect()
}

/// A completion labelled desirable or undesirable.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledCompletion {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub desirable: bool,
}

/// KTO: `prompt`/`completion`/`label` rows; a preference pair gives one desirable and one
/// undesirable completion (TRL's `unpair_preference_dataset`).
pub fn labelled_completions(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
) -> Result<Vec<LabelledCompletion>> {
    let mut out = vec![];
    for (i, x) in tokenize_rows(tok, data, cfg, what, LABELLED_ROWS)?.into_iter().enumerate() {
        let labelled =
            |prompt: Vec<u32>, completion: Vec<u32>, desirable| LabelledCompletion { prompt, completion, desirable };
        match x {
            Tokenized::Labelled { prompted, label } => {
                out.push(labelled(prompted.prompt_ids, prompted.completion_ids, label))
            }
            Tokenized::Pair { prompt_ids, chosen_ids, rejected_ids, .. } => {
                out.push(labelled(prompt_ids.clone(), chosen_ids, true));
                out.push(labelled(prompt_ids, rejected_ids, false));
            }
            _ => return Err(refuse(data, i, "is not a labelled completion (needs prompt, completion and label)")),
        }
        if out.last().is_some_and(|r| r.completion.is_empty()) {
            return Err(refuse(data, i, "has an empty completion after truncation"));
        }
    }
    Ok(out)
}

/// A prompt to generate from, with the row it came from (rewards read ground truths and
/// external scores from it).
#[derive(Debug, Clone)]
pub struct GenerationPrompt {
    pub ids: Vec<u32>,
    /// The prompt as the policy sees it (decoded ids, special tokens kept).
    pub text: String,
    /// The row (`align_data::Example`) as JSON.
    pub example: serde_json::Value,
}

/// Online RL: every row's generation prompt (`prompt` column, or a conversation before its
/// last assistant turn).
pub fn generation_prompts(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
) -> Result<Vec<GenerationPrompt>> {
    generation_prompts_conditioned(tok, data, cfg, what, None)
}

/// [`generation_prompts`], each prompt conditioned on `condition`'s score when given (the
/// row itself is kept as it is, for the rewards).
pub fn generation_prompts_conditioned(
    tok: &Tokenizer,
    data: &DatasetConfig,
    cfg: &TokenizeConfig,
    what: &str,
    condition: Option<(&ScoreCondition, f64)>,
) -> Result<Vec<GenerationPrompt>> {
    let examples = stage_examples(data, PROMPT_ROWS)?;
    let mut t = ExampleTokenizer::new(tok, cfg.clone());
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let conditioned = match condition {
            Some((c, score)) => Some(
                c.example(ex, score)
                    .ok_or_else(|| refuse(data, i, "has no prompt to put the score's control string in"))?,
            ),
            None => None,
        };
        let ids = t
            .generation_prompt(conditioned.as_ref().unwrap_or(ex))?
            .ok_or_else(|| refuse(data, i, "is plain text: it has no prompt to generate from"))?;
        if ids.is_empty() {
            return Err(refuse(data, i, "has an empty prompt (after max_prompt_length)"));
        }
        let text = tok.decode(&ids, false)?;
        let example =
            serde_json::to_value(ex).map_err(|e| refuse(data, i, &format!("cannot be written as JSON: {e}")))?;
        out.push(GenerationPrompt { ids, text, example });
    }
    t.log_stats(what);
    if out.is_empty() {
        return Err(DataError::file(&data.path, "no prompts"));
    }
    Ok(out)
}
