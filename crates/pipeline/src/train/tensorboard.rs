//! TensorBoard event files (`[training] report_to = ["tensorboard"]`): every row of
//! `metrics.jsonl` as scalars, one tag per key (`loss`, `learning_rate`, `eval_loss`,
//! `rewards/chosen`, …) at the row's step, in one event per row.
//!
//! The files lie in the output directory itself, beside metrics.jsonl: TensorBoard names a
//! run by the directory holding its event files, so `tensorboard --logdir runs/` shows a
//! pipeline's stages as `<pipeline>/<stage>`. Like metrics.jsonl, they describe the run the
//! directory holds: a fresh start removes earlier ones, and a resume cuts them back to the
//! checkpoint's step (rewritten atomically), so the resumed run's events follow with each
//! step once per tag.
//!
//! No `file_version` event is written: TensorBoard then treats a step that goes backwards
//! as a restart and drops what followed it, which is what a TensorBoard left open across a
//! resume should do.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tfrecord::protobuf::event::What;
use tfrecord::{Event, EventIter, EventMeta, EventWriter, EventWriterConfig, RecordReaderConfig, Summary};

use super::StepMetrics;

/// TensorBoard reads the files whose name holds this.
const MARK: &str = "tfevents";

/// The event files of a run directory, oldest first (names carry their creation time).
/// Temporary files of an interrupted rewrite are not among them.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_event_file(p) && !is_temporary(p))
        .collect();
    files.sort();
    files
}

fn is_event_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().contains(MARK))
}

/// A file `write_atomic` had not yet renamed into place (`<name>.tmp<pid>`).
fn is_temporary(path: &Path) -> bool {
    path.extension().is_some_and(|x| x.to_string_lossy().starts_with("tmp"))
}

/// The events of a file up to the first unreadable record: a run killed mid-write leaves
/// a last record cut short (its checksum fails), which is dropped with a warning.
fn read_events(path: &Path) -> Result<Vec<Event>> {
    let iter = EventIter::open(path, RecordReaderConfig { check_integrity: true })
        .with_context(|| path.display().to_string())?;
    let mut events = vec![];
    for (i, event) in iter.enumerate() {
        match event {
            Ok(e) => events.push(e),
            Err(e) => {
                tracing::warn!(file = %path.display(), record = i + 1, error = %e, "dropping the unreadable rest of a TensorBoard file");
                break;
            }
        }
    }
    Ok(events)
}

/// Every scalar the event files of `dir` hold, tag → `[(step, value)]` in the order written:
/// what a run logged, without file names or wall times (the soak test compares runs so).
pub fn logged_scalars(dir: &Path) -> Result<std::collections::BTreeMap<String, Vec<(i64, f32)>>> {
    let mut out: std::collections::BTreeMap<String, Vec<(i64, f32)>> = Default::default();
    for path in event_files(dir) {
        for event in read_events(&path)? {
            let Some(What::Summary(summary)) = event.what else { continue };
            for v in summary.value {
                if let Some(tfrecord::protobuf::summary::value::Value::SimpleValue(x)) = v.value {
                    out.entry(v.tag).or_default().push((event.step, x));
                }
            }
        }
    }
    Ok(out)
}

/// The scalars of a row: every numeric field of its metrics.jsonl line but `step`, under
/// the same key (serialised, so a field added to [`StepMetrics`] is logged here too).
fn scalars(row: &StepMetrics) -> Result<Vec<(String, f32)>> {
    let serde_json::Value::Object(fields) = serde_json::to_value(row)? else {
        anyhow::bail!("a metrics row is not a JSON object");
    };
    // A non-finite value is serialised as null, so it is left out here as in metrics.jsonl.
    Ok(fields.into_iter().filter(|(k, _)| k != "step").filter_map(|(k, v)| Some((k, v.as_f64()? as f32))).collect())
}

/// The TensorBoard file of a run (rank 0 only), or none when `report_to` leaves it out.
pub(super) struct EventLog {
    writer: Option<EventWriter<BufWriter<File>>>,
}

impl EventLog {
    /// Bring the directory's event files in line with metrics.jsonl (fresh: none; resumed
    /// at step `at`: the events up to `at`), whether or not this run writes any, then open
    /// the file this run appends to when `enabled`.
    pub(super) fn open(output_dir: &Path, resumed_at: Option<usize>, enabled: bool) -> Result<Self> {
        remove_temporaries(output_dir);
        let kept = match resumed_at {
            Some(at) => cut_back(output_dir, at)?,
            None => {
                remove_all(output_dir)?;
                None
            }
        };
        if !enabled {
            return Ok(EventLog { writer: None });
        }
        let path = kept.unwrap_or_else(|| output_dir.join(new_file_name()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| path.display().to_string())?;
        let writer = EventWriter::from_writer(BufWriter::new(file), EventWriterConfig { auto_flush: false })
            .with_context(|| path.display().to_string())?;
        Ok(EventLog { writer: Some(writer) })
    }

    /// Write a row as one event (its scalars at its step), flushed.
    pub(super) fn push(&mut self, row: &StepMetrics) -> Result<()> {
        let Some(writer) = self.writer.as_mut() else { return Ok(()) };
        let mut summary = Summary { value: vec![] };
        for (tag, value) in scalars(row)? {
            summary.value.extend(Summary::from_scalar(tag, value)?.value);
        }
        writer.write_event(EventMeta::with_step(row.step as i64).build_with_summary(summary))?;
        writer.flush()?;
        Ok(())
    }
}

/// `events.out.tfevents.<unix seconds>.align`: TensorBoard's pattern (where writers put
/// the host last; one process writes a run directory, so no two names collide).
fn new_file_name() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("events.out.{MARK}.{secs}.align")
}

fn remove_temporaries(dir: &Path) {
    let leftovers = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
    for path in leftovers.filter(|p| is_event_file(p) && is_temporary(p)) {
        std::fs::remove_file(&path).ok();
    }
}

fn remove_all(dir: &Path) -> Result<()> {
    for path in event_files(dir) {
        std::fs::remove_file(&path).with_context(|| path.display().to_string())?;
    }
    Ok(())
}

/// Keep the events of steps up to `at`, each (tag, step) once, in the newest file
/// (rewritten atomically) and remove the others. Returns that file, none if there was none.
/// Reading every file, not just the newest, mends a rewrite interrupted before the older
/// files were removed.
fn cut_back(dir: &Path, at: usize) -> Result<Option<PathBuf>> {
    let files = event_files(dir);
    let Some(newest) = files.last().cloned() else { return Ok(None) };
    let mut seen: HashSet<(String, i64)> = HashSet::new();
    let mut bytes: Vec<u8> = vec![];
    {
        let mut writer = EventWriter::from_writer(&mut bytes, EventWriterConfig { auto_flush: false })?;
        for path in &files {
            for mut event in read_events(path)? {
                if event.step > at as i64 {
                    continue;
                }
                if let Some(What::Summary(summary)) = &mut event.what {
                    summary.value.retain(|v| seen.insert((v.tag.clone(), event.step)));
                    if summary.value.is_empty() {
                        continue;
                    }
                }
                writer.write_event(event)?;
            }
        }
        writer.flush()?;
    }
    align_model::weights::write_atomic(&newest, &bytes).with_context(|| newest.display().to_string())?;
    for older in &files[..files.len() - 1] {
        std::fs::remove_file(older).with_context(|| older.display().to_string())?;
    }
    Ok(Some(newest))
}
