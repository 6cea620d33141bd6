//! Helpers shared by the stage tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use align_pipeline::train::StepMetrics;

/// The repository; `ALIGN_REPO_ROOT` relocates it for the test binaries `cargo xtask
/// gpu-check` carries to another machine.
pub fn root() -> PathBuf {
    std::env::var_os("ALIGN_REPO_ROOT")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."), PathBuf::from)
}

/// A fresh temporary directory for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("align-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The rows of a run's metrics.jsonl.
pub fn metrics(dir: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The head of a stage config on the tiny `llama-tied` checkpoint: `output_dir`, `[model]`
/// and `[data]` with its repository-relative `data` file, `adapter` and `limit`.
pub fn stage_head(out: &Path, data: &str, adapter: &str, limit: usize) -> String {
    format!(
        "output_dir = \"{out}\"\n[model]\npath = \"{model}\"\n[data]\npath = \"{data}\"\nadapter = \"{adapter}\"\nlimit = {limit}\n",
        out = out.display(),
        model = root().join("fixtures/models/llama-tied").display(),
        data = root().join(data).display(),
    )
}

/// An RL stage config on the tiny `llama-tied` checkpoint: `data` for training and its first
/// 4 rows held out, `training` lines, the stage's `[section]` body, then `extra` sections.
pub fn rl_config(
    out: &Path,
    data: &Path,
    training: &str,
    section: &str,
    body: &str,
    extra: &str,
) -> align_pipeline::config::StageConfig {
    let text = format!(
        r#"output_dir = "{out}"
[model]
path = "{model}"
[data]
path = "{data}"
[eval_data]
path = "{data}"
limit = 4
[training]
logging_steps = 1
lr_scheduler_type = "constant"
{training}
[{section}]
{body}
{extra}"#,
        out = out.display(),
        model = root().join("fixtures/models/llama-tied").display(),
        data = data.display(),
    );
    toml::from_str(&text).unwrap()
}
