//! Reports: one Markdown table of metrics per stage or checkpoint, PNG line plots of metric
//! curves, and the same numbers as JSON so a pipeline can gather them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of the table: a stage or checkpoint and its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    pub name: String,
    pub metrics: BTreeMap<String, f64>,
}

/// One line of a plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One plot: a metric against a step axis, one line per run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub metric: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub title: String,
    pub rows: Vec<ReportRow>,
    pub curves: Vec<Curve>,
}

/// A metric for a table: 4 decimals, scientific when tiny or huge, "—" for NaN.
pub fn fmt(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

impl Report {
    /// The Markdown table: one row per entry, one column per metric any row has.
    pub fn markdown(&self) -> String {
        let mut cols: Vec<&String> = self.rows.iter().flat_map(|r| r.metrics.keys()).collect();
        cols.sort();
        cols.dedup();
        let mut s = format!(
            "# {}\n\n| | {} |\n|---|{}\n",
            self.title,
            cols.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(" | "),
            "---|".repeat(cols.len())
        );
        for r in &self.rows {
            let cells: Vec<String> = cols.iter().map(|c| r.metrics.get(*c).map_or("—".into(), |v| fmt(*v))).collect();
            s.push_str(&format!("| {} | {} |\n", r.name, cells.join(" | ")));
        }
        for c in &self.curves {
            s.push_str(&format!("\n![{}]({}.png)\n", c.metric, file_stem(&c.metric)));
        }
        s
    }

    /// `report.md`, `report.json` and one `<metric>.png` per curve into `dir`.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let mut written = vec![];
        let md = dir.join("report.md");
        align_model::weights::write_atomic(&md, self.markdown().as_bytes())?;
        let js = dir.join("report.json");
        align_model::weights::write_atomic(&js, serde_json::to_string_pretty(self)?.as_bytes())?;
        written.extend([md, js]);
        for c in &self.curves {
            let p = dir.join(format!("{}.png", file_stem(&c.metric)));
            plot(c, &p)?;
            written.push(p);
        }
        Ok(written)
    }
}

/// A metric name as a file name (`eval_rewards/accuracies` → `eval_rewards_accuracies`).
pub fn file_stem(metric: &str) -> String {
    metric.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans, embedded: plots render the same on machines without system fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// A line plot of a curve as PNG (800 × 480).
pub fn plot(curve: &Curve, path: &Path) -> Result<()> {
    register_font();
    let pts = curve.series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(*x), x1.max(*x), y0.min(*y), y1.max(*y));
    }
    if !x0.is_finite() {
        return Err(anyhow!("curve {}: no finite points to plot", curve.metric));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&curve.metric, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc(&curve.x_label).y_desc(&curve.metric).draw().map_err(|e| err(&e))?;
    for (i, s) in curve.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if curve.series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The report of training runs: per run its last logged metrics (a table row) and curves
/// of `loss`, `eval_loss` and every other metric in their `metrics.jsonl`, against step.
pub fn from_runs(title: &str, runs: &[(String, PathBuf)]) -> Result<Report> {
    let mut rows = vec![];
    let mut curves: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for (name, dir) in runs {
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let mut last: BTreeMap<String, f64> = BTreeMap::new();
        let mut per: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            let obj = v.as_object().with_context(|| format!("{}:{}: not an object", path.display(), i + 1))?;
            let step = obj.get("step").and_then(|s| s.as_f64()).unwrap_or(i as f64);
            for (k, x) in obj {
                let skip = matches!(
                    k.as_str(),
                    "step" | "epoch" | "learning_rate" | "grad_norm" | "tokens_per_second" | "step_seconds"
                );
                if let (false, Some(x)) = (skip, x.as_f64()) {
                    last.insert(k.clone(), x);
                    per.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
        for (k, pts) in per {
            curves.entry(k).or_default().push(Series { label: name.clone(), points: pts });
        }
        rows.push(ReportRow { name: name.clone(), metrics: last });
    }
    Ok(Report {
        title: title.into(),
        rows,
        curves: curves.into_iter().map(|(metric, series)| Curve { metric, x_label: "step".into(), series }).collect(),
    })
}

/// Merge JSON summaries into a report: each `(name, file)` adds the file's numeric fields
/// (see [`flatten_numbers`]) to the row of that name, or a new row.
pub fn merge_summaries(report: &mut Report, summaries: &[(String, PathBuf)]) -> Result<()> {
    for (name, path) in summaries {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
        let mut m = BTreeMap::new();
        flatten_numbers(&v, "", &mut m);
        match report.rows.iter_mut().find(|r| &r.name == name) {
            Some(row) => row.metrics.extend(m),
            None => report.rows.push(ReportRow { name: name.clone(), metrics: m }),
        }
    }
    Ok(())
}

/// Numeric fields of a summary JSON (nested objects flattened with dots: `acc.value`).
pub fn flatten_numbers(v: &serde_json::Value, prefix: &str, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_numbers(x, &key, out);
            }
        }
        _ => {}
    }
}
