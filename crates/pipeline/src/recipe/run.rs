//! Running a resolved pipeline: the base model and generated datasets first, then each
//! stage in order. A stage keeps `stage.json` (its fingerprint and status): done with the
//! same fingerprint → skipped; interrupted with the same fingerprint → resumed from its
//! last checkpoint; anything else → its directory is cleared and it runs again.

use std::path::{Path, PathBuf};
use std::time::Instant;

use align_model::FusedOps;
use align_model::burn::tensor::backend::Backend;
use align_model::{Heads, HfHead, ModelConfig, Tokenizer, init_random, load_pretrained, save_pretrained};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::evals::run_eval;
use super::report::{EvalRecord, PipelineReport};
use super::resolve::{Pipeline, StagePlan, hash_path};
use super::tables::{BestOfNStage, EvalStage};
use super::{DataSource, StageKind};
use crate::config::StageConfig;
use crate::preference::{PairwiseStage, run_preference};

/// `runs/<pipeline>/<stage>/stage.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub fingerprint: String,
    pub status: Status,
    /// Seconds the stage ran (this attempt, or in total once done).
    #[serde(default)]
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Done,
}

/// Where a stage stands (`cargo xtask list`).
#[derive(Debug, Clone, PartialEq)]
pub enum StageState {
    /// Never run.
    Pending,
    /// Interrupted; resumes from this checkpoint step (none: from the start).
    Interrupted(Option<usize>),
    /// Done for this config and these inputs.
    Done,
    /// Done or started for another config or other inputs: runs again.
    Changed,
}

impl std::fmt::Display for StageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pending => write!(f, "pending"),
            Self::Interrupted(Some(s)) => write!(f, "interrupted (resumes at step {s})"),
            Self::Interrupted(None) => write!(f, "interrupted (restarts)"),
            Self::Done => write!(f, "done"),
            Self::Changed => write!(f, "changed (runs again)"),
        }
    }
}

fn read_record(dir: &Path) -> Result<Option<StageRecord>> {
    let p = dir.join("stage.json");
    match std::fs::read_to_string(&p) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: invalid", p.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| p.display().to_string()),
    }
}

fn write_record(dir: &Path, r: &StageRecord) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    align_model::weights::write_atomic(&dir.join("stage.json"), serde_json::to_string_pretty(r)?.as_bytes())?;
    Ok(())
}

/// The state of one stage on disk.
pub fn state(stage: &StagePlan) -> Result<StageState> {
    Ok(match read_record(&stage.dir)? {
        None => StageState::Pending,
        Some(r) if r.fingerprint != stage.fingerprint => StageState::Changed,
        Some(r) if r.status == Status::Done => StageState::Done,
        Some(_) => StageState::Interrupted(crate::train::checkpoints(&stage.dir).last().map(|(s, _)| *s)),
    })
}

/// Every stage with its kind and state.
pub fn list(p: &Pipeline) -> Result<Vec<(String, StageKind, StageState)>> {
    p.stages.iter().map(|s| Ok((s.name.clone(), s.kind, state(s)?))).collect()
}

fn parse<T: serde::de::DeserializeOwned>(p: &Pipeline, stage: &StagePlan) -> Result<T> {
    toml::Value::Table(stage.config.clone())
        .try_into()
        .with_context(|| format!("{}: stage {:?} ({})", p.file.display(), stage.name, stage.kind.name()))
}

/// Run the pipeline (or only `only`, whose inputs must be done; `force` re-runs it even
/// when done) and write `report.md`. Returns the report's rows.
pub fn run_pipeline<B: FusedOps>(
    p: &Pipeline,
    only: Option<&str>,
    force: bool,
    device: &B::Device,
) -> Result<PipelineReport> {
    std::fs::create_dir_all(&p.root).with_context(|| p.root.display().to_string())?;
    if let Some(init) = &p.base.init {
        prepare_base::<B>(p, init, device)?;
    }
    for (name, (src, fp)) in &p.data {
        prepare_data(&p.root.join("data").join(name), src, fp)?;
    }
    if let Some(name) = only {
        let stage = p.stage(name)?;
        for input in &stage.inputs {
            if let Some(up) = p.stages.iter().find(|s| &s.name == input)
                && state(up)? != StageState::Done
            {
                bail!("stage {name:?} reads stage {input:?}, which is not done: run the pipeline first");
            }
        }
    }
    let total = p.stages.len();
    for (i, stage) in p.stages.iter().enumerate() {
        if only.is_some_and(|o| o != stage.name) {
            continue;
        }
        let st = state(stage)?;
        let forced = force && only == Some(stage.name.as_str());
        tracing::info!(stage = %stage.name, kind = stage.kind.name(), state = %st, "stage {}/{total}", i + 1);
        if st != StageState::Done || forced {
            let resume = matches!(st, StageState::Interrupted(_)) && !forced;
            if !resume && stage.dir.exists() {
                std::fs::remove_dir_all(&stage.dir).with_context(|| format!("clearing {}", stage.dir.display()))?;
            }
            let start = Instant::now();
            let running = StageRecord { fingerprint: stage.fingerprint.clone(), status: Status::Running, seconds: 0.0 };
            write_record(&stage.dir, &running)?;
            align_model::weights::write_atomic(
                &stage.dir.join("pipeline-stage.toml"),
                toml::to_string(&stage.config)?.as_bytes(),
            )?;
            run_stage::<B>(p, stage, resume, device)
                .with_context(|| format!("stage {:?} ({})", stage.name, stage.kind.name()))?;
            let done = StageRecord { status: Status::Done, seconds: start.elapsed().as_secs_f64(), ..running };
            write_record(&stage.dir, &done)?;
        }
        run_evals::<B>(p, stage, device)?;
    }
    let report = super::report::build(p)?;
    let written = report.write(p)?;
    tracing::info!(report = %written.display(), "pipeline done");
    Ok(report)
}

fn run_stage<B: FusedOps>(p: &Pipeline, stage: &StagePlan, resume: bool, device: &B::Device) -> Result<()> {
    let pairwise = |kind| -> Result<()> {
        run_preference::<B>(&parse::<StageConfig>(p, stage)?, kind, resume, device)?;
        Ok(())
    };
    match stage.kind {
        StageKind::Sft => {
            crate::sft::run_sft::<B>(&parse(p, stage)?, resume, device)?;
        }
        StageKind::Reward => pairwise(PairwiseStage::Reward)?,
        StageKind::Dpo => pairwise(PairwiseStage::Dpo)?,
        StageKind::Orpo => pairwise(PairwiseStage::Orpo)?,
        StageKind::Simpo => pairwise(PairwiseStage::Simpo)?,
        StageKind::Kto => {
            crate::kto::run_kto::<B>(&parse(p, stage)?, resume, device)?;
        }
        StageKind::Grpo => {
            crate::grpo::run_grpo::<B>(&parse(p, stage)?, resume, device)?;
        }
        StageKind::Rloo => {
            crate::rloo::run_rloo::<B>(&parse(p, stage)?, resume, device)?;
        }
        StageKind::Ppo => {
            crate::ppo::run_ppo::<B>(&parse(p, stage)?, resume, device)?;
        }
        StageKind::BestOfN => best_of_n::<B>(&parse(p, stage)?, &stage.dir, device)?,
        StageKind::Eval => {
            let e: EvalStage = parse(p, stage)?;
            if !e.model.path.exists() {
                bail!("{}: model not found", e.model.path.display());
            }
        }
    }
    if stage.kind.trains_policy() {
        let cfg: StageConfig = parse(p, stage)?;
        if cfg.lora.is_some() {
            merge_adapter::<B>(&cfg.model.path, &stage.dir.join("final"), &stage.dir.join("merged"), device)?;
        }
    }
    Ok(())
}

/// The base with the trained adapter merged in: the model later stages start from.
fn merge_adapter<B: Backend>(base: &Path, adapter: &Path, out: &Path, device: &B::Device) -> Result<()> {
    let pre = load_pretrained::<B>(base, Heads::LM, device)?;
    let (adapted, _) = align_lora::load_peft(pre.model, adapter)?;
    let merged = align_lora::merge_and_unload(adapted);
    write_dir_atomic(out, |tmp| Ok(save_pretrained(&merged, Some(&pre.tokenizer), HfHead::CausalLm, tmp)?))?;
    tracing::info!(out = %out.display(), "adapter merged for the stages downstream");
    Ok(())
}

/// Write a directory under a temporary name, then rename it into place.
fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    for d in [&tmp, &dir.to_path_buf()] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| d.display().to_string())?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    write(&tmp)?;
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    Ok(())
}

fn best_of_n<B: FusedOps>(s: &BestOfNStage, dir: &Path, device: &B::Device) -> Result<()> {
    let pre = load_pretrained::<B>(&s.model.path, Heads::LM, device)?;
    let mut terms = align_reward::build_terms::<B>(&s.rewards, device)?;
    let reward: Box<dyn align_reward::Reward> = if terms.len() == 1 {
        terms.remove(0).0
    } else {
        Box::new(align_reward::WeightedSum { name: "reward".into(), terms })
    };
    let prompts = align_data::generation_prompts(&pre.tokenizer, &s.data, &Default::default(), "prompts")?;
    let sampling = align_rollout::Generation {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        max_new_tokens: s.max_new_tokens,
        min_new_tokens: 0,
        stop_strings: s.stop_strings.clone(),
        include_stop_str_in_output: true,
    };
    let sel = align_eval::best_of_n(&pre.model, &pre.tokenizer, reward.as_ref(), &prompts, s.n, &sampling, s.seed)?;
    // Printed as the seed recipe shows it: every candidate with its reward, the best marked.
    let text = align_eval::best_of_n_listing(&prompts, &sel);
    if s.print {
        print!("{text}");
    }
    align_model::weights::write_atomic(&dir.join("best_of_n.txt"), text.as_bytes())?;
    let mut lines = String::new();
    for x in &sel {
        lines.push_str(&serde_json::to_string(x)?);
        lines.push('\n');
    }
    align_model::weights::write_atomic(&dir.join("selections.jsonl"), lines.as_bytes())?;
    let n = sel.len().max(1) as f64;
    let best = sel.iter().map(|x| x.reward).sum::<f64>() / n;
    let all: Vec<f64> = sel.iter().flat_map(|x| x.candidates.iter().map(|c| c.reward)).collect();
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let mut metrics = serde_json::json!({"best_reward": best, "mean_reward": mean, "prompts": sel.len(), "n": s.n});
    if s.pairs {
        let pairs: Vec<serde_json::Value> = sel.iter().filter_map(|x| x.pair()).collect();
        if pairs.is_empty() {
            bail!("pairs = true: no prompt's candidates differ in reward, so there is no pair to write");
        }
        let text: String = pairs.iter().map(|p| format!("{p}\n")).collect();
        align_model::weights::write_atomic(&dir.join("pairs.jsonl"), text.as_bytes())?;
        tracing::info!(pairs = pairs.len(), prompts = sel.len(), "on-policy pairs written");
        metrics["pairs"] = pairs.len().into();
    }
    align_model::weights::write_atomic(
        &dir.join("best_of_n.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    Ok(())
}

/// The model a stage's evals look at.
pub fn eval_model(p: &Pipeline, stage: &StagePlan) -> Result<PathBuf> {
    match stage.kind {
        StageKind::Eval => Ok(parse::<EvalStage>(p, stage)?.model.path),
        _ => stage.output.clone().context("the stage has no model"),
    }
}

/// Run the stage's evals whose saved results are missing or were made for another model
/// or another eval config.
fn run_evals<B: FusedOps>(p: &Pipeline, stage: &StagePlan, device: &B::Device) -> Result<()> {
    if stage.evals.is_empty() {
        return Ok(());
    }
    let model = eval_model(p, stage)?;
    let model_fp = match stage.kind {
        StageKind::Eval => hash_path(&model)?,
        _ => stage.fingerprint.clone(),
    };
    let dir = stage.dir.join("eval");
    for spec in &stage.evals {
        let name = spec.name();
        let fp = super::resolve::hash_strs(&[&model_fp, &toml::to_string(spec)?]);
        let path = dir.join(format!("{name}.json"));
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(r) = serde_json::from_str::<EvalRecord>(&text)
            && r.fingerprint == fp
        {
            continue;
        }
        let start = Instant::now();
        let metrics = run_eval::<B>(spec, &model, &dir, device)
            .with_context(|| format!("stage {:?}: eval {name:?}", stage.name))?;
        let summary: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
        tracing::info!(stage = %stage.name, eval = %name, seconds = format!("{:.1}", start.elapsed().as_secs_f64()), "{}", summary.join(" "));
        // JSON has no NaN: an undefined metric (a mean over nothing) is left out.
        let metrics = metrics.into_iter().filter(|(_, v)| v.is_finite()).collect();
        let r = EvalRecord { fingerprint: fp, metrics };
        align_model::weights::write_atomic(&path, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}

/// `root/base/`: the random model of `[base.init]` with its word-level tokenizer.
fn prepare_base<B: Backend>(p: &Pipeline, init: &super::RandomBase, device: &B::Device) -> Result<()> {
    let dir = &p.base_path;
    let marker = dir.join("base.json");
    if std::fs::read_to_string(&marker).is_ok_and(|t| t.trim() == p.base_fingerprint) {
        return Ok(());
    }
    let (src, _) = &p.data[&init.vocabulary];
    let tok = Tokenizer::word_level(
        &src.vocabulary().with_context(|| format!("[base.init] vocabulary = {:?}", init.vocabulary))?,
    )?;
    let text = std::fs::read_to_string(&init.config).with_context(|| init.config.display().to_string())?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", init.config.display()))?;
    let obj = json.as_object_mut().with_context(|| format!("{}: not a JSON object", init.config.display()))?;
    // The vocabulary decides these, not the file.
    obj.insert("vocab_size".into(), tok.vocab_size().into());
    obj.insert("eos_token_id".into(), tok.eos_token_id.into());
    obj.insert("pad_token_id".into(), tok.pad_token_id.into());
    obj.insert("bos_token_id".into(), tok.eos_token_id.into());
    let config = ModelConfig::from_json_str(&json.to_string()).with_context(|| init.config.display().to_string())?;
    let model = init_random::<B>(&config, Heads::LM, init.std, init.seed, device)?;
    write_dir_atomic(dir, |tmp| {
        save_pretrained(&model, Some(&tok), HfHead::CausalLm, tmp)?;
        std::fs::write(tmp.join("base.json"), &p.base_fingerprint)?;
        Ok(())
    })?;
    tracing::info!(dir = %dir.display(), vocab = tok.vocab_size(), "random base model written");
    Ok(())
}

impl DataSource {
    /// Refuse settings the generator cannot honour: operands and spreads of at least 1 and
    /// small enough for their words to form a vocabulary, row counts that fit in memory.
    pub fn validate(&self) -> Result<()> {
        if let DataSource::SyntheticArithmetic { train, eval, max_operand, wrong_spread, .. } = self {
            for (field, v) in [("max_operand", *max_operand), ("wrong_spread", *wrong_spread)] {
                if !(1..=MAX_OPERAND).contains(&v) {
                    bail!("{field} = {v}: must be in 1..={MAX_OPERAND}");
                }
            }
            if train.saturating_add(*eval) > MAX_GENERATED_ROWS {
                bail!("train + eval = {}: at most {MAX_GENERATED_ROWS} problems", train.saturating_add(*eval));
            }
        }
        Ok(())
    }

    /// The words of every row (the demo tokenizer's vocabulary).
    pub fn vocabulary(&self) -> Result<Vec<String>> {
        self.validate()?;
        match self {
            DataSource::SyntheticArithmetic { max_operand, wrong_spread, .. } => {
                Ok(align_data::synthetic::arithmetic_vocabulary((*max_operand).max(*wrong_spread)))
            }
            DataSource::PiqaScoredConversations { .. } => bail!("PIQA text has no closed word-level vocabulary"),
        }
    }
}

/// The largest operand (and answer spread) of generated problems: every number up to a few
/// times it is a word of the vocabulary.
const MAX_OPERAND: i64 = 100_000;
/// Generated problems at most (they are held in memory).
const MAX_GENERATED_ROWS: usize = 10_000_000;

/// `root/data/<name>/`: the generated files, rewritten when the settings change.
fn prepare_data(dir: &Path, src: &DataSource, fingerprint: &str) -> Result<()> {
    src.validate().with_context(|| format!("data {}", dir.display()))?;
    if std::fs::read_to_string(dir.join("data.json")).is_ok_and(|t| t.trim() == fingerprint) {
        return Ok(());
    }
    match src {
        DataSource::SyntheticArithmetic { seed, train, eval, max_operand, wrong_spread } => {
            use align_data::synthetic as syn;
            let tr = syn::arithmetic_problems(*seed, *train, *max_operand);
            // Held-out problems from another stream of the seed.
            let ev = syn::arithmetic_problems(seed.wrapping_add(0x9e37_79b9_7f4a_7c15), *eval, *max_operand);
            let files = [
                ("sft.jsonl", syn::sft_rows(&tr)),
                ("preference.jsonl", syn::preference_rows(&tr, seed.wrapping_add(1), *wrong_spread)),
                ("rl.jsonl", syn::prompt_answer_rows(&tr)),
                ("eval.jsonl", syn::prompt_answer_rows(&ev)),
                ("preference_eval.jsonl", syn::preference_rows(&ev, seed.wrapping_add(2), *wrong_spread)),
                ("scored.jsonl", syn::scored_conversation_rows(&tr, seed.wrapping_add(3), *wrong_spread)),
                ("scored_eval.jsonl", syn::scored_conversation_rows(&ev, seed.wrapping_add(4), *wrong_spread)),
            ];
            write_dir_atomic(dir, |tmp| {
                for (name, rows) in &files {
                    let mut text = String::new();
                    for r in rows {
                        text.push_str(&serde_json::to_string(r)?);
                        text.push('\n');
                    }
                    std::fs::write(tmp.join(name), text)?;
                }
                std::fs::write(tmp.join("data.json"), fingerprint)?;
                Ok(())
            })?;
        }
        DataSource::PiqaScoredConversations { path, skip, limit } => {
            let (mut text, mut best) = (String::new(), String::new());
            for rec in align_data::RecordReader::open(path)?.skip(*skip).take(limit.unwrap_or(usize::MAX)) {
                let r = rec?;
                let field = |f: &str| -> Result<&serde_json::Value> {
                    r.fields.get(f).with_context(|| format!("{}: field `{f}` missing", r.location))
                };
                let goal =
                    field("goal")?.as_str().with_context(|| format!("{}: field `goal` not a string", r.location))?;
                let label = field("label")?
                    .as_u64()
                    .filter(|l| *l < 2)
                    .with_context(|| format!("{}: field `label` must be 0 or 1", r.location))?;
                let sols = ["sol1", "sol2"]
                    .map(|f| field(f)?.as_str().with_context(|| format!("{}: field `{f}` not a string", r.location)));
                let [sol1, sol2] = sols;
                let sols = [sol1?, sol2?];
                for (k, sol) in sols.iter().enumerate() {
                    // The critique a grader writes: a wrong solution's names the right one.
                    let reason = if k as u64 == label {
                        "The solution achieves the goal.".to_string()
                    } else {
                        format!("The solution does not achieve the goal. This one does: {}", sols[1 - k])
                    };
                    let row = serde_json::json!({
                        "conversation": [{"role": "human", "content": goal}, {"role": "assistant", "content": sol}],
                        "meta_eval_score": if k as u64 == label { 9.0 } else { 2.0 },
                        "score_reason": reason,
                    });
                    text.push_str(&row.to_string());
                    text.push('\n');
                    if k as u64 == label {
                        best.push_str(&row.to_string());
                        best.push('\n');
                    }
                }
            }
            write_dir_atomic(dir, |tmp| {
                std::fs::write(tmp.join("scored.jsonl"), &text)?;
                std::fs::write(tmp.join("best.jsonl"), &best)?;
                std::fs::write(tmp.join("data.json"), fingerprint)?;
                Ok(())
            })?;
        }
    }
    tracing::info!(dir = %dir.display(), "dataset generated");
    Ok(())
}
