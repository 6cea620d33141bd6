//! From the pipeline file to a plan: `--set` edits, `--smoke` shortening, `@` references
//! replaced by paths (upward only), and one fingerprint per stage over its resolved config,
//! the fingerprints of what it references and the contents of the files it reads.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::evals::EvalSpec;
use super::{BaseModel, DataSource, PipelineFile, StageKind};

/// How to load a pipeline.
#[derive(Clone, Default)]
pub struct Options {
    /// `key=value` edits of the file before anything else (`stages.sft.training.max_steps=10`;
    /// the value is TOML, or a bare string when it does not parse as TOML).
    pub sets: Vec<String>,
    /// A few steps of every stage, short evals, into `runs/<name>-smoke/`.
    pub smoke: bool,
    /// Where `[base] fetch = "…"` models come from (the xtask's verified cache).
    pub fetch: Option<fn(&str) -> Result<PathBuf>>,
}

/// A resolved pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub target: Option<String>,
    /// `runs/<name>/` (`<name>-smoke` under `--smoke`).
    pub root: PathBuf,
    pub base: BaseModel,
    /// The model `@base` names (for `init`: `root/base`, written by the run).
    pub base_path: PathBuf,
    pub base_fingerprint: String,
    /// Each generated dataset with its fingerprint.
    pub data: BTreeMap<String, (DataSource, String)>,
    pub stages: Vec<StagePlan>,
}

/// A stage ready to run.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub name: String,
    pub kind: StageKind,
    /// `root/<name>/`
    pub dir: PathBuf,
    /// The stage's config with references resolved (`output_dir` set for training stages).
    pub config: toml::Table,
    pub evals: Vec<EvalSpec>,
    /// Names of the base, datasets and stages the stage references.
    pub inputs: Vec<String>,
    pub fingerprint: String,
    /// What `@<name>` means: the model the stage produces (merged under LoRA), or for
    /// best-of-N its selections file. None for eval stages.
    pub output: Option<PathBuf>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Result<&StagePlan> {
        self.stages.iter().find(|s| s.name == name).with_context(|| {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            format!("{}: no stage named {name:?} (stages: {})", self.file.display(), names.join(", "))
        })
    }
}

/// Read, edit, shorten and resolve a pipeline file.
pub fn load(path: &Path, opts: &Options) -> Result<Pipeline> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading pipeline {}", path.display()))?;
    let mut doc: toml::Table = toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    for s in &opts.sets {
        apply_set(&mut doc, s).with_context(|| format!("--set {s}"))?;
    }
    let file: PipelineFile = doc.try_into().with_context(|| format!("{}: invalid pipeline", path.display()))?;
    resolve(path, file, opts)
}

fn resolve(path: &Path, file: PipelineFile, opts: &Options) -> Result<Pipeline> {
    let at = |what: String| format!("{}: {what}", path.display());
    if file.name.is_empty() || file.name.contains(['/', '\\']) || file.name.starts_with('.') {
        bail!(at(format!("name {:?} cannot name a directory", file.name)));
    }
    let dir_name = if opts.smoke { format!("{}-smoke", file.name) } else { file.name.clone() };
    let root = file.runs_dir.join(dir_name);
    // What each reference name means.
    let mut known: BTreeMap<String, Ref> = BTreeMap::new();

    let base = &file.base;
    let (base_path, base_fingerprint) = match (&base.path, &base.fetch, &base.init) {
        (Some(p), None, None) => (p.clone(), hash_strs(&["path", &hash_path(p)?])),
        (None, Some(name), None) => {
            let fetch = opts.fetch.with_context(|| at(format!("[base] fetch = {name:?} needs the xtask's fetch")))?;
            let p = fetch(name).with_context(|| at(format!("[base] fetch = {name:?}")))?;
            let h = hash_path(&p)?;
            (p, hash_strs(&["fetch", name, &h]))
        }
        (None, None, Some(init)) => {
            let cfg =
                hash_path(&init.config).with_context(|| at(format!("[base.init] config {}", init.config.display())))?;
            let data = file
                .data
                .get(&init.vocabulary)
                .with_context(|| at(format!("[base.init] vocabulary = {:?}: no [data.{0}]", init.vocabulary)))?;
            let spec = toml::to_string(data)?;
            let h = hash_strs(&["init", &cfg, &spec, &init.seed.to_string(), &init.std.to_string()]);
            (root.join("base"), h)
        }
        _ => bail!(at("[base] needs exactly one of `path`, `fetch`, `init`".into())),
    };
    let base_dir = if base_path.is_dir() || base.init.is_some() {
        base_path.clone()
    } else {
        base_path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    known
        .insert("base".into(), Ref { dir: base_dir, output: base_path.clone(), fingerprint: base_fingerprint.clone() });

    let mut data = BTreeMap::new();
    for (name, src) in &file.data {
        check_name(name).with_context(|| at(format!("[data.{name}]")))?;
        let input = match src {
            DataSource::PiqaScoredConversations { path, .. } => {
                hash_path(path).with_context(|| at(format!("[data.{name}]")))?
            }
            DataSource::SyntheticArithmetic { .. } => String::new(),
        };
        let fp = hash_strs(&["data", super::tables::DATA_VERSION, &toml::to_string(src)?, &input]);
        let dir = root.join("data").join(name);
        known.insert(name.clone(), Ref { dir: dir.clone(), output: dir, fingerprint: fp.clone() });
        data.insert(name.clone(), (src.clone(), fp));
    }

    let mut stages: Vec<StagePlan> = Vec::new();
    for (i, raw) in expand_stages(&file.defaults, &file.stages).map_err(|e| anyhow::anyhow!(at(e)))?.iter().enumerate()
    {
        let mut table = raw.clone();
        let name = match table.remove("name") {
            Some(toml::Value::String(s)) => s,
            _ => bail!(at(format!("stages[{i}]: `name` missing or not a string"))),
        };
        let here = |what: String| at(format!("stage {name:?}: {what}"));
        check_name(&name).with_context(|| here("invalid name".into()))?;
        if known.contains_key(&name) {
            bail!(here("the name is already taken by the base, a dataset or an earlier stage".into()));
        }
        let kind: StageKind = match table.remove("kind") {
            Some(v) => v.try_into().map_err(|e| anyhow::anyhow!(here(format!("kind: {e}"))))?,
            None => bail!(here("`kind` missing".into())),
        };
        let evals_raw = match table.remove("evals") {
            Some(toml::Value::Array(a)) => a,
            None => vec![],
            Some(_) => bail!(here("`evals` must be an array of tables".into())),
        };
        let dir = root.join(&name);
        if opts.smoke {
            smoke_stage(&mut table, kind);
        }
        for key in ["model", "data", "eval_data"] {
            shorthand_path(&mut table, key);
        }
        let mut inputs = vec![];
        let mut config = toml::Value::Table(table);
        resolve_refs(&mut config, &known, &mut inputs).with_context(|| here("config".into()))?;
        let toml::Value::Table(mut config) = config else { unreachable!("a table stays a table") };
        if kind != StageKind::Eval && kind != StageKind::BestOfN {
            config.insert("output_dir".into(), toml::Value::String(dir.display().to_string()));
        }
        validate(kind, &config).map_err(|e| anyhow::anyhow!(here(format!("{e:#}"))))?;
        let mut evals = vec![];
        for (k, e) in evals_raw.into_iter().enumerate() {
            let mut e = e;
            if let toml::Value::Table(t) = &mut e {
                shorthand_path(t, "data");
                if opts.smoke {
                    smoke_eval(t);
                }
            }
            resolve_refs(&mut e, &known, &mut inputs).with_context(|| here(format!("evals[{k}]")))?;
            let spec: EvalSpec = e.try_into().map_err(|err| anyhow::anyhow!(here(format!("evals[{k}]: {err}"))))?;
            evals.push(spec);
        }
        let mut names: Vec<String> = evals.iter().map(|e| e.name()).collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            bail!(here("two evals share a name: give each a `name`".into()));
        }
        if kind == StageKind::BestOfN && !evals.is_empty() {
            bail!(here("a best_of_n stage has no model to evaluate".into()));
        }
        inputs.sort();
        inputs.dedup();
        let mut parts = vec![kind.name().to_string(), toml::to_string(&config)?];
        for i in &inputs {
            parts.push(format!("{i}={}", known[i].fingerprint));
        }
        parts.push(hash_external_files(&config, &root)?);
        let fingerprint = hash_strs(&parts.iter().map(String::as_str).collect::<Vec<_>>());
        tracing::debug!(stage = %name, ?parts, "fingerprint parts");
        let lora = config.contains_key("lora");
        let output = match kind {
            k if k.trains_policy() => Some(dir.join(if lora { "merged" } else { "final" })),
            StageKind::Reward => Some(dir.join("final")),
            StageKind::BestOfN => Some(dir.join("selections.jsonl")),
            _ => None,
        };
        if let Some(o) = &output {
            known.insert(name.clone(), Ref { dir: dir.clone(), output: o.clone(), fingerprint: fingerprint.clone() });
        }
        stages.push(StagePlan { name, kind, dir, config, evals, inputs, fingerprint, output });
    }
    if stages.is_empty() {
        bail!(at("no [[stages]]".into()));
    }
    Ok(Pipeline {
        file: path.to_path_buf(),
        name: file.name,
        description: file.description,
        target: file.target,
        root,
        base: file.base,
        base_path,
        base_fingerprint,
        data,
        stages,
    })
}

/// The stage's table parses as what its kind reads (caught before anything runs).
fn validate(kind: StageKind, config: &toml::Table) -> Result<()> {
    let value = toml::Value::Table(config.clone());
    match kind {
        StageKind::BestOfN => {
            let _: super::tables::BestOfNStage = value.try_into()?;
        }
        StageKind::Eval => {
            let _: super::tables::EvalStage = value.try_into()?;
        }
        _ => {
            let cfg: crate::config::StageConfig = value.try_into()?;
            let own = match kind {
                StageKind::Sft => None,
                k => Some(k.name()),
            };
            cfg.check_sections(kind.name(), own)?;
            // Every process would run the whole pipeline and write its run directory.
            if cfg.distributed.nodes > 1 {
                bail!(
                    "[distributed] nodes = {}: a pipeline runs in one process; use `devices` for replicas \
                     here, or run the stage across nodes with `align {} --config`",
                    cfg.distributed.nodes,
                    kind.name()
                );
            }
        }
    }
    Ok(())
}

/// The stages as written, each merged over `[defaults]` and, with `extends = "<stage>"`,
/// over that earlier stage (itself already expanded).
fn expand_stages(defaults: &toml::Table, stages: &[toml::Table]) -> std::result::Result<Vec<toml::Table>, String> {
    let mut out: Vec<toml::Table> = Vec::with_capacity(stages.len());
    for (i, raw) in stages.iter().enumerate() {
        let mut own = raw.clone();
        let mut table = match own.remove("extends") {
            None => defaults.clone(),
            Some(toml::Value::String(parent)) => out
                .iter()
                .find(|t| t.get("name").and_then(toml::Value::as_str) == Some(parent.as_str()))
                .cloned()
                .ok_or_else(|| format!("stages[{i}]: extends = {parent:?}, but no earlier stage has that name"))?,
            Some(_) => return Err(format!("stages[{i}]: `extends` must be the name of an earlier stage")),
        };
        merge_tables(&mut table, own);
        out.push(table);
    }
    Ok(out)
}

/// `over`'s keys onto `base`: tables merged key by key, anything else replaced.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("{name:?}: names are letters, digits, `_` and `-`");
    }
    Ok(())
}

/// `model = "@sft"` is `[model] path = "@sft"`; likewise `data` and `eval_data`.
fn shorthand_path(t: &mut toml::Table, key: &str) {
    if let Some(toml::Value::String(s)) = t.get(key) {
        let mut inner = toml::Table::new();
        inner.insert("path".into(), toml::Value::String(s.clone()));
        t.insert(key.into(), toml::Value::Table(inner));
    }
}

/// `--set a.b.c=value`; `stages.<name>.…` addresses a stage by its name.
pub fn apply_set(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment.split_once('=').context("expected key=value")?;
    let value: toml::Value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|l| !l.is_empty()).context("empty key")?;
    let mut cur: &mut toml::Table = doc;
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        if p == "stages" && i + 1 < parts.len() {
            let name = parts[i + 1];
            let stages = cur.get_mut("stages").and_then(|s| s.as_array_mut()).context("the file has no [[stages]]")?;
            cur = stages
                .iter_mut()
                .filter_map(|s| s.as_table_mut())
                .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
                .with_context(|| format!("no stage named {name:?}"))?;
            i += 2;
            continue;
        }
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("{p} is not a table"))?;
        i += 1;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    let v = t.entry(key.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !v.is_table() {
        *v = toml::Value::Table(toml::Table::new());
    }
    v.as_table_mut().expect("made a table above")
}

/// Lower an integer setting to at most `cap` (setting it when absent).
fn cap(t: &mut toml::Table, key: &str, cap: i64) {
    let v = t.get(key).and_then(|v| v.as_integer()).map_or(cap, |v| v.min(cap));
    t.insert(key.into(), toml::Value::Integer(v));
}

/// `--smoke`: two optimizer steps (checkpointing each) on small batches, few rows, short
/// generations.
fn smoke_stage(t: &mut toml::Table, kind: StageKind) {
    match kind {
        StageKind::Eval => {}
        StageKind::BestOfN => {
            if let Some(toml::Value::Table(d)) = t.get_mut("data") {
                cap(d, "limit", 2);
            }
            cap(t, "n", 4);
            cap(t, "max_new_tokens", 16);
        }
        _ => {
            // Small batches too: a smoke run checks the wiring, not the learning.
            // Group-sampling stages keep whole groups (at most 4 completions each).
            let mut group = 0;
            for (section, default) in [("grpo", 8), ("rloo", 2)] {
                if let Some(toml::Value::Table(g)) = t.get_mut(section) {
                    group = g.get("num_generations").and_then(|v| v.as_integer()).unwrap_or(default).min(4);
                    g.insert("num_generations".into(), toml::Value::Integer(group));
                }
            }
            let tr = table(t, "training");
            tr.insert("max_steps".into(), toml::Value::Integer(2));
            tr.insert("save_steps".into(), toml::Value::Integer(1));
            tr.insert("logging_steps".into(), toml::Value::Integer(1));
            tr.insert("gradient_accumulation_steps".into(), toml::Value::Integer(1));
            let batch = if group > 0 { group } else { 2 };
            tr.insert("per_device_train_batch_size".into(), toml::Value::Integer(batch));
            if tr.contains_key("eval_steps") {
                tr.insert("eval_steps".into(), toml::Value::Integer(2));
            }
            for key in ["data", "eval_data"] {
                if let Some(toml::Value::Table(d)) = t.get_mut(key) {
                    cap(d, "limit", if key == "data" { 32 } else { 4 });
                }
            }
            for section in ["grpo", "rloo", "ppo"] {
                if let Some(toml::Value::Table(s)) = t.get_mut(section) {
                    cap(s, "max_completion_length", 16);
                }
            }
        }
    }
}

fn smoke_eval(t: &mut toml::Table) {
    if let Some(toml::Value::Table(d)) = t.get_mut("data") {
        cap(d, "limit", 4);
    }
    if matches!(t.get("kind").and_then(|k| k.as_str()), Some("rewards" | "r1_zero" | "critique" | "score_conditioning"))
    {
        cap(t, "max_new_tokens", 16);
    }
}

/// What a reference name means.
struct Ref {
    /// `@name/rest` is `dir/rest`.
    dir: PathBuf,
    /// `@name`: a stage's model (or selections), a dataset's directory, the base model.
    output: PathBuf,
    fingerprint: String,
}

/// Replace `@name` / `@name/rest` strings by paths, collecting the names used.
fn resolve_refs(v: &mut toml::Value, known: &BTreeMap<String, Ref>, used: &mut Vec<String>) -> Result<()> {
    match v {
        toml::Value::String(s) if s.starts_with('@') => {
            let body = &s[1..];
            let (name, rest) = body.split_once('/').unwrap_or((body, ""));
            let r = known
                .get(name)
                .with_context(|| format!("{s}: no base, dataset or earlier stage with an output named {name:?}"))?;
            used.push(name.to_string());
            let p = if rest.is_empty() { r.output.clone() } else { r.dir.join(rest) };
            *s = p.display().to_string();
        }
        toml::Value::Array(a) => {
            for x in a {
                resolve_refs(x, known, used)?;
            }
        }
        toml::Value::Table(t) => {
            for (_, x) in t.iter_mut() {
                resolve_refs(x, known, used)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn hash_strs(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

/// Files larger than this are fingerprinted by size and modification time, not content.
const HASH_CONTENT_LIMIT: u64 = 64 << 20;

/// A file's (or a directory's files') fingerprint.
pub(crate) fn hash_path(p: &Path) -> Result<String> {
    let meta = std::fs::metadata(p).with_context(|| format!("{}: not found", p.display()))?;
    let mut h = Sha256::new();
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| p.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            h.update(e.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
            h.update(hash_path(&e)?.as_bytes());
        }
    } else if meta.len() > HASH_CONTENT_LIMIT {
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        h.update(format!("{}:{:?}", meta.len(), mtime).as_bytes());
    } else {
        let mut f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex(&h.finalize()))
}

/// The contents of every existing file or directory a config names outside the run
/// directory (data files, models given by path): editing one re-runs the stage.
fn hash_external_files(config: &toml::Table, root: &Path) -> Result<String> {
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            toml::Value::Table(t) => t.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut strings = vec![];
    config.values().for_each(|v| walk(v, &mut strings));
    strings.sort();
    strings.dedup();
    let mut parts = vec![];
    for s in strings {
        let p = Path::new(&s);
        if s.is_empty() || p.starts_with(root) || !p.exists() {
            continue;
        }
        parts.push(format!("{s}={}", hash_path(p)?));
    }
    Ok(hash_strs(&parts.iter().map(String::as_str).collect::<Vec<_>>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_edits_nested_keys_and_stages_by_name() {
        let mut doc: toml::Table = toml::from_str(
            "name = \"p\"\n[[stages]]\nname = \"sft\"\n[stages.training]\nmax_steps = 5\n[[stages]]\nname = \"dpo\"\n",
        )
        .unwrap();
        apply_set(&mut doc, "stages.sft.training.max_steps=7").unwrap();
        apply_set(&mut doc, "stages.dpo.dpo.beta=0.2").unwrap();
        apply_set(&mut doc, "name=other").unwrap();
        let s = &doc["stages"].as_array().unwrap();
        assert_eq!(s[0]["training"]["max_steps"].as_integer(), Some(7));
        assert_eq!(s[1]["dpo"]["beta"].as_float(), Some(0.2));
        assert_eq!(doc["name"].as_str(), Some("other"));
        assert!(apply_set(&mut doc, "stages.nope.training.max_steps=1").is_err());
        assert!(apply_set(&mut doc, "no_equals_sign").is_err());
    }

    #[test]
    fn stages_extend_defaults_and_earlier_stages() {
        let doc: toml::Table = toml::from_str(
            r#"
[defaults]
evals = [{ name = "e" }]
[defaults.training]
seed = 3
[[stages]]
name = "a"
kind = "grpo"
[stages.training]
learning_rate = 0.1
max_steps = 5
[stages.grpo]
beta = 0.0
[[stages]]
name = "b"
extends = "a"
evals = []
[stages.training]
max_steps = 7
[stages.grpo]
loss_type = "dr_grpo"
"#,
        )
        .unwrap();
        let stages: Vec<toml::Table> =
            doc["stages"].as_array().unwrap().iter().map(|t| t.as_table().unwrap().clone()).collect();
        let out = expand_stages(doc["defaults"].as_table().unwrap(), &stages).unwrap();
        let (a, b) = (&out[0], &out[1]);
        assert_eq!(a["training"]["seed"].as_integer(), Some(3), "defaults under a stage");
        assert_eq!(a["evals"].as_array().unwrap().len(), 1);
        assert_eq!(b["name"].as_str(), Some("b"));
        assert_eq!(b["kind"].as_str(), Some("grpo"), "inherited");
        assert_eq!(b["training"]["learning_rate"].as_float(), Some(0.1), "inherited key of a merged table");
        assert_eq!(b["training"]["max_steps"].as_integer(), Some(7), "own key wins");
        assert_eq!(b["training"]["seed"].as_integer(), Some(3));
        assert_eq!(b["grpo"]["beta"].as_float(), Some(0.0));
        assert_eq!(b["grpo"]["loss_type"].as_str(), Some("dr_grpo"));
        assert!(b["evals"].as_array().unwrap().is_empty(), "arrays are replaced, not merged");
        assert!(!b.contains_key("extends"));
        let bad: Vec<toml::Table> = vec![toml::from_str("name = \"x\"\nextends = \"later\"").unwrap()];
        let e = expand_stages(&toml::Table::new(), &bad).unwrap_err();
        assert!(e.contains("no earlier stage") && e.contains("later"), "{e}");
    }
}
