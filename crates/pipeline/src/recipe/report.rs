//! `runs/<pipeline>/report.md`: one row per stage with its eval numbers, one with its
//! last training metrics, and PNG curves of loss, reward, KL and eval accuracy over steps.
//! Only deterministic numbers go in the tables (no timings), so an interrupted and resumed
//! run reports what an uninterrupted one does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use align_eval::report::{Curve, Series, file_stem, fmt, plot};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::StageKind;
use super::resolve::{Pipeline, StagePlan};

/// Training metrics shown per stage (the last logged value) and plotted against step.
const TRAINING_METRICS: [&str; 12] = [
    "loss",
    "eval_loss",
    "rewards/accuracies",
    "eval_rewards/accuracies",
    "reward",
    "eval_reward",
    "kl",
    "objective/kl",
    "objective/scores",
    "contrastive/accuracy",
    "critique/loss",
    "critique/reply_loss",
];

/// Curves drawn when any stage logs them (eval accuracy under r1_zero rewards included;
/// a curriculum's difficulty drawn, the order its loader produced).
const CURVES: [&str; 13] = [
    "loss",
    "eval_loss",
    "reward",
    "eval_reward",
    "kl",
    "objective/kl",
    "kl_coef",
    "rewards/accuracies",
    "eval_rewards/accuracies",
    "eval_rewards/r1_zero/answer_reward",
    "curriculum/difficulty",
    "contrastive/accuracy",
    "contrastive/loss",
];

/// One stage's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    pub name: String,
    pub kind: String,
    /// `<eval>/<metric>` after the stage.
    pub evals: BTreeMap<String, f64>,
    /// The last logged value of each training metric, and `steps`.
    pub training: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineReport {
    pub title: String,
    pub description: Option<String>,
    pub target: Option<String>,
    pub rows: Vec<StageRow>,
    /// Not serialised into the tables: curves over steps.
    #[serde(skip)]
    pub curves: Vec<Curve>,
}

impl PipelineReport {
    pub fn row(&self, stage: &str) -> Option<&StageRow> {
        self.rows.iter().find(|r| r.name == stage)
    }

    /// The Markdown: the eval table, the training table, the curves.
    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        if let Some(d) = &self.description {
            s.push_str(&format!("{}\n\n", d.trim()));
        }
        if let Some(t) = &self.target {
            s.push_str(&format!("Written for: {t}\n\n"));
        }
        s.push_str("## Evaluations after each stage\n\n");
        s.push_str(&table(&self.rows, |r| &r.evals));
        s.push_str("\n## Training (last logged values)\n\n");
        s.push_str(&table(&self.rows, |r| &r.training));
        for c in &self.curves {
            s.push_str(&format!("\n![{}]({}.png)\n", c.metric, file_stem(&c.metric)));
        }
        s
    }

    /// `report.md`, `report.json` and the PNGs into the pipeline's run directory; returns
    /// the Markdown's path.
    pub fn write(&self, p: &Pipeline) -> Result<PathBuf> {
        let md = p.root.join("report.md");
        align_model::weights::write_atomic(&md, self.markdown().as_bytes())?;
        align_model::weights::write_atomic(
            &p.root.join("report.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        // Curves of an earlier report that this one has not (a stage removed) go.
        let keep: Vec<String> = self.curves.iter().map(|c| format!("{}.png", file_stem(&c.metric))).collect();
        for entry in std::fs::read_dir(&p.root).with_context(|| p.root.display().to_string())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".png") && !keep.contains(&name) {
                std::fs::remove_file(entry.path()).ok();
            }
        }
        for (c, name) in self.curves.iter().zip(&keep) {
            plot(c, &p.root.join(name))?;
        }
        Ok(md)
    }
}

fn table(rows: &[StageRow], col: impl Fn(&StageRow) -> &BTreeMap<String, f64>) -> String {
    let mut cols: Vec<&String> = rows.iter().flat_map(|r| col(r).keys()).collect();
    cols.sort();
    cols.dedup();
    if cols.is_empty() {
        return "(none)\n".into();
    }
    let mut s = format!(
        "| stage | kind | {} |\n|---|---|{}\n",
        cols.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(cols.len())
    );
    for r in rows {
        let cells: Vec<String> = cols.iter().map(|c| col(r).get(*c).map_or("—".into(), |v| fmt(*v))).collect();
        s.push_str(&format!("| {} | {} | {} |\n", r.name, r.kind, cells.join(" | ")));
    }
    s
}

/// Gather every stage's evals and training logs.
pub fn build(p: &Pipeline) -> Result<PipelineReport> {
    let mut rows = vec![];
    let mut curves: BTreeMap<&str, Vec<Series>> = BTreeMap::new();
    for stage in &p.stages {
        let mut training = BTreeMap::new();
        let path = stage.dir.join("metrics.jsonl");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut per: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
            for (i, line) in text.lines().enumerate() {
                let v: serde_json::Value =
                    serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
                let step = v["step"].as_f64().unwrap_or(i as f64);
                training.insert("steps".to_string(), step);
                for k in TRAINING_METRICS {
                    if let Some(x) = v[k].as_f64() {
                        training.insert(k.to_string(), x);
                    }
                }
                for k in CURVES {
                    if let Some(x) = v[k].as_f64() {
                        per.entry(k).or_default().push((step, x));
                    }
                }
            }
            for (k, points) in per {
                curves.entry(k).or_default().push(Series { label: stage.name.clone(), points });
            }
        }
        rows.push(StageRow {
            name: stage.name.clone(),
            kind: stage.kind.name().into(),
            evals: stage_evals(stage)?,
            training,
        });
    }
    let curves = curves
        .into_iter()
        .filter(|(_, s)| s.iter().any(|x| x.points.len() > 1))
        .map(|(metric, series)| Curve { metric: metric.to_string(), x_label: "step".into(), series })
        .collect();
    Ok(PipelineReport {
        title: format!("Pipeline {}", p.name),
        description: p.description.clone(),
        target: p.target.clone(),
        rows,
        curves,
    })
}

/// An eval's saved result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    pub fingerprint: String,
    pub metrics: BTreeMap<String, f64>,
}

/// The eval results of a stage, as `<eval>/<metric>`.
pub fn stage_evals(stage: &StagePlan) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for spec in &stage.evals {
        let name = spec.name();
        let path = stage.dir.join("eval").join(format!("{name}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let r: EvalRecord = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
        for (k, v) in r.metrics {
            out.insert(format!("{name}/{k}"), v);
        }
    }
    if stage.kind == StageKind::BestOfN {
        let path = stage.dir.join("best_of_n.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
            for k in ["best_reward", "mean_reward", "pairs"] {
                if let Some(x) = v[k].as_f64() {
                    out.insert(format!("best_of_n/{k}"), x);
                }
            }
        }
    }
    Ok(out)
}
