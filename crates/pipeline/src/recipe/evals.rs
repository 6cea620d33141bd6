//! The evals a pipeline runs after a stage (`evals = [{ kind = …, … }]`), on the model the
//! stage produced. Each writes `eval/<name>.jsonl` (per sample) and `eval/<name>.json`
//! (its metrics and the fingerprint they were made for, so an unchanged eval of an
//! unchanged model is not run again).

use std::collections::BTreeMap;
use std::path::Path;

use align_data::scored::{CritiqueTask, DEFAULT_CRITIQUE_INSTRUCTION, DEFAULT_SCORE_FORMAT, ScoreCondition};
use align_data::{
    ChatFormat, Content, DatasetConfig, Example, ExampleTokenizer, GenerationPrompt, TokenizeConfig,
    generation_prompts, generation_prompts_conditioned,
};
use align_eval::write_jsonl;
use align_model::FusedOps;
use align_model::{ChatMessage, Heads, Tokenizer, load_pretrained};
use align_reward::{Reward, RewardOutput, RewardTerm, Sample};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use align_eval::evaluate_prompts;
use align_rollout::Generation;

/// One eval. `name` (default: the kind, or the task for `multiple_choice`) prefixes its
/// metrics in the report: `arith/accuracy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EvalSpec {
    /// One completion per prompt row, scored by reward functions: `reward` (their weighted
    /// sum), `rewards/<function>`, and with an `r1_zero` function its `accuracy` and
    /// `format_rate`.
    Rewards {
        #[serde(default)]
        name: Option<String>,
        /// Rows with a `prompt` (and what the rewards read, e.g. `answer`).
        data: DatasetConfig,
        rewards: Vec<RewardTerm>,
        /// Default 64.
        #[serde(default = "default_new_tokens")]
        max_new_tokens: usize,
        /// 0 = greedy. Default 0.
        #[serde(default)]
        temperature: f32,
        /// Default none.
        #[serde(default)]
        stop_strings: Vec<String>,
        /// Prompts per generation batch. Default 16.
        #[serde(default = "default_batch")]
        batch_size: usize,
        /// Default 0.
        #[serde(default)]
        seed: u64,
    },
    /// GSM8K with the r1_zero prompt and grader (as `align eval r1-zero`): `format_rate`,
    /// `accuracy`, `avg_reward`.
    R1Zero {
        #[serde(default)]
        name: Option<String>,
        /// GSM8K rows (`question`, `answer`).
        data: DatasetConfig,
        /// Default 1.0 (the reference's).
        #[serde(default = "one")]
        temperature: f32,
        /// Default 1.0.
        #[serde(default = "one")]
        top_p: f32,
        /// Default 1024.
        #[serde(default = "default_r1_tokens")]
        max_new_tokens: usize,
        /// Default 0.
        #[serde(default)]
        seed: u64,
        /// Default 8.
        #[serde(default = "default_small_batch")]
        batch_size: usize,
    },
    /// lm-eval multiple choice (`task = "piqa"` or a task TOML): `acc`, `acc_norm`,
    /// `acc_bytes` and their standard errors.
    MultipleChoice {
        #[serde(default)]
        name: Option<String>,
        task: String,
        data: DatasetConfig,
        /// Default 8.
        #[serde(default = "default_small_batch")]
        batch_size: usize,
    },
    /// A reward model's pairwise accuracy on preference rows: `accuracy` (chosen scored
    /// above rejected) and `margin` (mean chosen − rejected).
    RewardAccuracy {
        #[serde(default)]
        name: Option<String>,
        data: DatasetConfig,
        /// Default 8.
        #[serde(default = "default_small_batch")]
        batch_size: usize,
    },
    /// Self-critique: the model critiques each scored conversation's reply (the
    /// `[self_critique]` task) and its `Score: N` is read back: `score_accuracy` (equal to
    /// the row's `meta_eval_score`), `parse_rate` (a score given at all) and `score_mae`
    /// (mean absolute error over the parsed ones).
    Critique {
        #[serde(default)]
        name: Option<String>,
        /// Scored conversations with a reply to critique.
        data: DatasetConfig,
        /// The chat format the model was trained with. Default template.
        #[serde(default)]
        chat_format: ChatFormat,
        /// The critique instruction (`{max_score}` replaced); default as `[self_critique]`.
        #[serde(default = "critique_instruction")]
        instruction: String,
        /// Default 5.
        #[serde(default = "five")]
        max_score: f64,
        /// Default 64.
        #[serde(default = "default_new_tokens")]
        max_new_tokens: usize,
        /// Default none.
        #[serde(default)]
        stop_strings: Vec<String>,
        /// Default 16.
        #[serde(default = "default_batch")]
        batch_size: usize,
    },
    /// Score conditioning: each conversation's prompt conditioned on `high` and on `low` (the
    /// `[score_conditioning]` control string), one greedy reply each, scored by `rewards`:
    /// `reward_high`, `reward_low` and their `gap`, and per function `high/<f>`, `low/<f>`.
    /// Samples: `<name>.jsonl` (high) and `<name>.low.jsonl`.
    ScoreConditioning {
        #[serde(default)]
        name: Option<String>,
        /// Rows with a prompt (a conversation's turns before its last reply), each
        /// conditioned as the online stages' `[score_conditioning] target` conditions them.
        data: DatasetConfig,
        /// Default template.
        #[serde(default)]
        chat_format: ChatFormat,
        /// The control string (`{score}` replaced); default as `[score_conditioning]`.
        #[serde(default = "score_format")]
        format: String,
        /// Default 5.
        #[serde(default = "five")]
        high: f64,
        /// Default 1.
        #[serde(default = "one_f64")]
        low: f64,
        rewards: Vec<RewardTerm>,
        /// Default 64.
        #[serde(default = "default_new_tokens")]
        max_new_tokens: usize,
        /// Default none.
        #[serde(default)]
        stop_strings: Vec<String>,
        /// Default 16.
        #[serde(default = "default_batch")]
        batch_size: usize,
    },
}

fn critique_instruction() -> String {
    DEFAULT_CRITIQUE_INSTRUCTION.into()
}
fn score_format() -> String {
    DEFAULT_SCORE_FORMAT.into()
}
fn five() -> f64 {
    5.0
}
fn one_f64() -> f64 {
    1.0
}

fn default_new_tokens() -> usize {
    64
}
fn default_batch() -> usize {
    16
}
fn default_small_batch() -> usize {
    8
}
fn default_r1_tokens() -> usize {
    1024
}
fn one() -> f32 {
    1.0
}

impl EvalSpec {
    pub fn name(&self) -> String {
        match self {
            Self::Rewards { name, .. } => name.clone().unwrap_or_else(|| "rewards".into()),
            Self::R1Zero { name, .. } => name.clone().unwrap_or_else(|| "r1_zero".into()),
            Self::MultipleChoice { name, task, .. } => name.clone().unwrap_or_else(|| {
                Path::new(task).file_stem().map_or(task.clone(), |s| s.to_string_lossy().into_owned())
            }),
            Self::RewardAccuracy { name, .. } => name.clone().unwrap_or_else(|| "reward_accuracy".into()),
            Self::Critique { name, .. } => name.clone().unwrap_or_else(|| "critique".into()),
            Self::ScoreConditioning { name, .. } => name.clone().unwrap_or_else(|| "score_conditioning".into()),
        }
    }
}

/// Run one eval of `model`, writing `<dir>/<name>.jsonl`; returns its metrics.
pub fn run_eval<B: FusedOps>(
    spec: &EvalSpec,
    model: &Path,
    dir: &Path,
    device: &B::Device,
) -> Result<BTreeMap<String, f64>> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let name = spec.name();
    let samples_path = dir.join(format!("{name}.jsonl"));
    let mut m = BTreeMap::new();
    match spec {
        EvalSpec::Rewards { data, rewards, max_new_tokens, temperature, stop_strings, batch_size, seed, .. } => {
            let pre = load_pretrained::<B>(model, Heads::LM, device)?;
            let funcs = align_reward::build_terms::<B>(rewards, device)?;
            let prompts = generation_prompts(&pre.tokenizer, data, &TokenizeConfig::default(), &name)?;
            let sampling = Generation {
                temperature: *temperature,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: *max_new_tokens,
                min_new_tokens: 0,
                stop_strings: stop_strings.clone(),
                include_stop_str_in_output: true,
            };
            let all = evaluate_prompts(
                &pre.model,
                &pre.tokenizer,
                &funcs,
                &prompts,
                &sampling,
                *batch_size,
                *seed,
                &samples_path,
            )?;
            // With the r1_zero grader: its accuracy and format rate (the reward is the
            // accuracy when it is the only function); else the weighted reward. Either way one
            // number per other function; components stay in the samples file.
            let r1 = all.contains_key("rewards/r1_zero/answer_reward");
            for (k, v) in &all {
                let key = match k.as_str() {
                    "rewards/r1_zero/answer_reward" => "accuracy",
                    "rewards/r1_zero/format_reward" => "format_rate",
                    "reward" if !r1 || rewards.len() > 1 => "reward",
                    "rewards/r1_zero" | "reward" | "completions/mean_length" => continue,
                    _ if k.matches('/').count() == 1 => k.as_str(),
                    _ => continue,
                };
                m.insert(key.to_string(), *v);
            }
        }
        EvalSpec::R1Zero { data, temperature, top_p, max_new_tokens, seed, batch_size, .. } => {
            let pre = load_pretrained::<B>(model, Heads::LM, device)?;
            let items = align_eval::math::load_gsm8k(data)?;
            let cfg = align_eval::math::R1ZeroEvalConfig {
                temperature: *temperature,
                top_p: *top_p,
                max_new_tokens: *max_new_tokens,
                seed: *seed,
                batch_size: *batch_size,
            };
            let s = align_eval::run_r1_zero(&pre.model, &pre.tokenizer, &items, &cfg, &samples_path, false)?;
            m.insert("accuracy".into(), s.accuracy);
            m.insert("format_rate".into(), s.format_rate);
            m.insert("avg_reward".into(), s.avg_reward);
        }
        EvalSpec::MultipleChoice { task, data, batch_size, .. } => {
            let pre = load_pretrained::<B>(model, Heads::LM, device)?;
            let task = align_eval::McTask::resolve(task)?;
            let items = align_eval::load_items(&task, data)?;
            let (s, results) =
                align_eval::run_multiple_choice(&pre.model, &pre.tokenizer, &task, &items, *batch_size, false, device)?;
            write_jsonl(&samples_path, &results)?;
            for (k, v) in [("acc", s.acc), ("acc_norm", s.acc_norm), ("acc_bytes", s.acc_bytes)] {
                m.insert(k.into(), v.value);
                m.insert(format!("{k}_stderr"), v.stderr);
            }
        }
        EvalSpec::RewardAccuracy { data, batch_size, .. } => {
            let heads = Heads { lm: false, score: true, value: false };
            let pre = load_pretrained::<B>(model, heads, device)?;
            let tokenize = TokenizeConfig { max_length: None, max_prompt_length: None, ..Default::default() };
            let rows = crate::preference::score_dataset(
                &pre.model,
                &pre.tokenizer,
                data,
                &tokenize,
                *batch_size,
                false,
                device,
            )?;
            let mut right = 0usize;
            let mut margins = vec![];
            for r in &rows {
                let (c, j) = (r["chosen"].as_f64(), r["rejected"].as_f64());
                let (Some(c), Some(j)) = (c, j) else {
                    anyhow::bail!("{}: row {} is not a preference pair", data.path.display(), r["row"]);
                };
                right += usize::from(c > j);
                margins.push(c - j);
            }
            write_jsonl(&samples_path, &rows)?;
            let n = rows.len().max(1) as f64;
            m.insert("accuracy".into(), right as f64 / n);
            m.insert("margin".into(), margins.iter().sum::<f64>() / n);
        }
        EvalSpec::Critique {
            data,
            chat_format,
            instruction,
            max_score,
            max_new_tokens,
            stop_strings,
            batch_size,
            ..
        } => {
            let pre = load_pretrained::<B>(model, Heads::LM, device)?;
            let task = CritiqueTask::new(instruction, *max_score)?;
            let prompts = conversation_prompts(&pre.tokenizer, data, *chat_format, |messages| {
                Some(vec![task.prompt(messages)?])
            })?;
            let grader: Vec<(Box<dyn Reward>, f64)> = vec![(Box::new(CritiqueScore { task }), 1.0)];
            let all = evaluate_prompts(
                &pre.model,
                &pre.tokenizer,
                &grader,
                &prompts,
                &greedy(*max_new_tokens, stop_strings),
                *batch_size,
                0,
                &samples_path,
            )?;
            m.insert("score_accuracy".into(), all["reward"]);
            m.insert("parse_rate".into(), all["rewards/critique_score/parsed"]);
            // The mean error over parsed critiques: Σ error / parsed.
            let parsed = all["rewards/critique_score/parsed"];
            m.insert(
                "score_mae".into(),
                if parsed > 0.0 { all["rewards/critique_score/abs_error"] / parsed } else { f64::NAN },
            );
        }
        EvalSpec::ScoreConditioning {
            data,
            chat_format,
            format,
            high,
            low,
            rewards,
            max_new_tokens,
            stop_strings,
            batch_size,
            ..
        } => {
            let pre = load_pretrained::<B>(model, Heads::LM, device)?;
            let condition = ScoreCondition::new(format)?;
            let funcs = align_reward::build_terms::<B>(rewards, device)?;
            let untruncated = TokenizeConfig {
                chat_format: *chat_format,
                max_length: None,
                max_prompt_length: None,
                ..Default::default()
            };
            let mut reward = BTreeMap::new();
            for (side, target, path) in
                [("high", *high, samples_path.clone()), ("low", *low, dir.join(format!("{name}.low.jsonl")))]
            {
                let prompts = generation_prompts_conditioned(
                    &pre.tokenizer,
                    data,
                    &untruncated,
                    &name,
                    Some((&condition, target)),
                )?;
                let all = evaluate_prompts(
                    &pre.model,
                    &pre.tokenizer,
                    &funcs,
                    &prompts,
                    &greedy(*max_new_tokens, stop_strings),
                    *batch_size,
                    0,
                    &path,
                )?;
                for (f, _) in &funcs {
                    m.insert(format!("{side}/{}", f.name()), all[&format!("rewards/{}", f.name())]);
                }
                reward.insert(side, all["reward"]);
                m.insert(format!("reward_{side}"), all["reward"]);
            }
            m.insert("gap".into(), reward["high"] - reward["low"]);
        }
    }
    Ok(m)
}

/// Greedy decoding of up to `max_new_tokens`, ending at a stop string (kept).
fn greedy(max_new_tokens: usize, stop_strings: &[String]) -> Generation {
    Generation {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens,
        min_new_tokens: 0,
        stop_strings: stop_strings.to_vec(),
        include_stop_str_in_output: true,
    }
}

/// Generation prompts made from each conversation row of `data` by `prompt(messages)`,
/// rendered in `format`; the row itself is kept for the rewards. A row that is not a
/// conversation, or that `prompt` cannot use, is an error naming the file and the row.
fn conversation_prompts(
    tok: &Tokenizer,
    data: &DatasetConfig,
    format: ChatFormat,
    prompt: impl Fn(&[ChatMessage]) -> Option<Vec<ChatMessage>>,
) -> Result<Vec<GenerationPrompt>> {
    let (examples, _) = align_data::load_examples(data)?;
    let cfg = TokenizeConfig { chat_format: format, max_length: None, max_prompt_length: None, ..Default::default() };
    let mut t = ExampleTokenizer::new(tok, cfg);
    let at = |i: usize, what: &str| {
        format!("{}: example {} (counting from 1, after skip) {what}", data.path.display(), i + 1)
    };
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let (Example::Conversation { messages } | Example::ScoredConversation { messages, .. }) = ex else {
            anyhow::bail!(at(i, "is not a conversation"));
        };
        let turns = prompt(messages).with_context(|| at(i, "has no turn to build the prompt from"))?;
        let ids = t.generation_prompt(&Example::PromptOnly { prompt: Content::Messages(turns) })?.unwrap_or_default();
        let text = tok.decode(&ids, false)?;
        out.push(GenerationPrompt { ids, text, example: serde_json::to_value(ex)? });
    }
    if out.is_empty() {
        anyhow::bail!("{}: no conversations", data.path.display());
    }
    Ok(out)
}

/// 1 when a critique's `Score: N` equals the row's `score`; components `parsed` (a score
/// within the scale was given) and `abs_error` (|N − score|, 0 when unparsed).
struct CritiqueScore {
    task: CritiqueTask,
}

impl Reward for CritiqueScore {
    fn name(&self) -> &str {
        "critique_score"
    }
    fn score(&self, s: &Sample) -> align_reward::Result<RewardOutput> {
        let want = s.example.get("score").and_then(|v| v.as_f64()).ok_or_else(|| align_reward::RewardError::Input {
            reward: "critique_score".into(),
            message: "the row has no `score`: critiques are graded on scored conversations".into(),
        })?;
        let got = self.task.parse_score(s.completion);
        let mut out = RewardOutput::scalar(f64::from(got == Some(want)));
        out.components.insert("parsed".into(), f64::from(got.is_some()));
        out.components.insert("abs_error".into(), got.map_or(0.0, |g| (g - want).abs()));
        Ok(out)
    }
}
