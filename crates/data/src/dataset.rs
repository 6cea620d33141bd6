//! A dataset as a stage configures it: where the rows are, how to read them, and what to
//! do with bad ones.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::adapters::Adapter;
use crate::error::{DataError, Result};
use crate::schema::{ColumnMap, Example, SchemaKind, map_columns};
use crate::source::RecordReader;

/// `[data]` of a stage config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// A file, a directory of shards, or a glob (`data/*.parquet`).
    pub path: PathBuf,
    /// Schema of the rows. Default auto (decided per row from its columns).
    #[serde(default)]
    pub schema: SchemaKind,
    /// TRL column name -> column in the file, e.g. `prompt = "question"`. Default none.
    #[serde(default)]
    pub columns: ColumnMap,
    /// A built-in adapter (PIQA, GSM8K) instead of a schema. Default none.
    #[serde(default)]
    pub adapter: Option<Adapter>,
    /// Skip rows that fail validation (counted and reported) instead of stopping. Default false.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Skip this many (valid) rows first, e.g. `skip = 1000` with `limit = 500` for rows
    /// 1000..1500 (HF's `split="validation[1000:1500]"`). Default 0.
    #[serde(default)]
    pub skip: usize,
    /// Read at most this many rows. Default all.
    #[serde(default)]
    pub limit: Option<usize>,
}

impl DatasetConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DatasetConfig {
            path: path.into(),
            schema: SchemaKind::Auto,
            columns: ColumnMap::new(),
            adapter: None,
            skip_invalid: false,
            skip: 0,
            limit: None,
        }
    }
}

/// Rows skipped under `skip_invalid`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipReport {
    pub skipped: usize,
    /// The first few reasons, with their locations.
    pub first_reasons: Vec<String>,
}

/// Validated examples, streamed: one row in memory at a time. A bad row is an error naming
/// file, line and field, unless `skip_invalid`, when it is counted in `report` (with the
/// first five reasons) and skipped.
pub fn examples<'a>(
    cfg: &'a DatasetConfig,
    report: &'a mut SkipReport,
) -> Result<impl Iterator<Item = Result<Example>> + 'a> {
    examples_as(cfg, &[], report)
}

/// [`examples`] for a stage that reads only `accepts` kinds of rows (see
/// [`Example::from_record_as`]); empty accepts any.
pub fn examples_as<'a>(
    cfg: &'a DatasetConfig,
    accepts: &'a [SchemaKind],
    report: &'a mut SkipReport,
) -> Result<impl Iterator<Item = Result<Example>> + 'a> {
    rows_as(cfg, accepts, report, |_, e| Ok(e))
}

/// The number in `column` of each row [`examples_as`] keeps, in its order (a per-row
/// difficulty or score read from the file); a row without it, or with another type, is an
/// error naming file, line and field.
pub fn column_numbers(cfg: &DatasetConfig, accepts: &[SchemaKind], column: &str) -> Result<Vec<f64>> {
    let mut report = SkipReport::default();
    // The column's error is kept inside the row's value, so `skip_invalid` skips exactly
    // the rows the examples skip.
    let values = rows_as(cfg, accepts, &mut report, |r, _| {
        Ok(match r.fields.get(column) {
            Some(serde_json::Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => {
                Ok(n.as_f64().unwrap_or(0.0))
            }
            Some(other) => Err(DataError::at(&r.location, Some(column), format!("expected a number, found {other}"))),
            None => Err(DataError::at(&r.location, Some(column), "missing")),
        })
    })?;
    values.map(|v| v.and_then(|x| x)).collect()
}

/// The rows `accepts` keeps (after `skip_invalid`, `skip` and `limit`), each as `keep`
/// makes it from its record and its example.
fn rows_as<'a, T: 'a>(
    cfg: &'a DatasetConfig,
    accepts: &'a [SchemaKind],
    report: &'a mut SkipReport,
    keep: impl Fn(&crate::source::Record, Example) -> Result<T> + 'a,
) -> Result<impl Iterator<Item = Result<T>> + 'a> {
    let reader = RecordReader::open(&cfg.path)?;
    let parsed = reader.map(move |record| {
        record.and_then(|mut r| {
            map_columns(&mut r.fields, &cfg.columns);
            let ex = match cfg.adapter {
                Some(a) => a.apply(&r),
                None => Example::from_record_as(&r, cfg.schema, accepts),
            }?;
            keep(&r, ex)
        })
    });
    let kept = parsed.filter_map(move |p| match p {
        // File-level errors (unreadable file, bad Parquet) stop even with skip_invalid.
        Err(e @ DataError::Row { .. }) if cfg.skip_invalid => {
            report.skipped += 1;
            if report.first_reasons.len() < 5 {
                report.first_reasons.push(e.to_string());
            }
            None
        }
        other => Some(other),
    });
    Ok(kept.skip(cfg.skip).take(cfg.limit.unwrap_or(usize::MAX)))
}

/// Read and validate every row into memory (see [`examples`]).
pub fn load_examples(cfg: &DatasetConfig) -> Result<(Vec<Example>, SkipReport)> {
    load_examples_as(cfg, &[])
}

/// [`load_examples`] for a stage that reads only `accepts` kinds of rows.
pub fn load_examples_as(cfg: &DatasetConfig, accepts: &[SchemaKind]) -> Result<(Vec<Example>, SkipReport)> {
    let mut report = SkipReport::default();
    let out = examples_as(cfg, accepts, &mut report)?.collect::<Result<Vec<_>>>()?;
    if report.skipped > 0 {
        tracing::warn!(path = %cfg.path.display(), skipped = report.skipped, first = ?report.first_reasons, "skipped invalid rows");
    }
    Ok((out, report))
}
