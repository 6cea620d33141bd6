//! Reading rows: JSONL, JSON arrays, Parquet, and directories or globs of shards of any of
//! them. Every format streams — one row in memory at a time (one row group's batch for
//! Parquet) — so memory stays flat on a multi-GB file. Each row carries its [`Location`]
//! so any later error can name file and line (or row group and row).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};

/// One row of a dataset: a JSON object and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub location: Location,
    pub fields: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jsonl,
    Json,
    Parquet,
}

fn format_of(path: &Path) -> Result<Format> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Ok(Format::Jsonl)
    } else if name.ends_with(".json") {
        Ok(Format::Json)
    } else if name.ends_with(".parquet") {
        Ok(Format::Parquet)
    } else {
        Err(DataError::file(path, "unknown file type (expected .jsonl, .ndjson, .json or .parquet)"))
    }
}

/// The data files a path names: a file, every data file in a directory (sorted), or the
/// files matching a glob pattern (sorted).
pub fn expand_path(spec: &Path) -> Result<Vec<PathBuf>> {
    let text = spec.to_string_lossy();
    let mut files: Vec<PathBuf> = if text.contains(['*', '?', '[']) {
        glob::glob(&text)
            .map_err(|e| DataError::file(spec, format!("bad glob pattern: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| DataError::file(spec, format!("reading a glob match: {e}")))?
    } else if spec.is_dir() {
        std::fs::read_dir(spec)
            .map_err(|e| DataError::io(spec, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && format_of(p).is_ok())
            .collect()
    } else if spec.exists() {
        vec![spec.to_path_buf()]
    } else {
        return Err(DataError::file(spec, "no such file or directory"));
    };
    files.sort();
    if files.is_empty() {
        return Err(DataError::file(spec, "matches no .jsonl, .json or .parquet file"));
    }
    for f in &files {
        format_of(f)?;
    }
    Ok(files)
}

/// Streams the rows of one or more files, in order.
pub struct RecordReader {
    files: VecDeque<PathBuf>,
    current: Option<Box<dyn Iterator<Item = Result<Record>>>>,
}

impl RecordReader {
    /// Rows of every file `spec` names (file, directory or glob).
    pub fn open(spec: &Path) -> Result<Self> {
        Ok(Self::from_files(expand_path(spec)?))
    }

    pub fn from_files(files: Vec<PathBuf>) -> Self {
        RecordReader { files: files.into(), current: None }
    }

    fn open_next(&mut self) -> Option<Result<()>> {
        let path = self.files.pop_front()?;
        let it: Result<Box<dyn Iterator<Item = Result<Record>>>> = match format_of(&path) {
            Ok(Format::Jsonl) => File::open(&path)
                .map_err(|e| DataError::io(&path, e))
                .map(|f| Box::new(JsonlRows { path: path.clone(), lines: BufReader::new(f), line: 0 }) as _),
            Ok(Format::Json) => File::open(&path)
                .map_err(|e| DataError::io(&path, e))
                .map(|f| Box::new(JsonArrayRows::new(path.clone(), f)) as _),
            Ok(Format::Parquet) => ParquetRows::open(&path).map(|p| Box::new(p) as _),
            Err(e) => Err(e),
        };
        Some(it.map(|it| self.current = Some(it)))
    }
}

impl Iterator for RecordReader {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(it) = self.current.as_mut() {
                match it.next() {
                    Some(r) => return Some(r),
                    None => self.current = None,
                }
            }
            match self.open_next()? {
                Ok(()) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn into_object(v: Value, location: &Location) -> Result<Map<String, Value>> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(DataError::at(location, None, format!("expected a JSON object, found {}", kind(&other)))),
    }
}

/// The JSON type of a value, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct JsonlRows {
    path: PathBuf,
    lines: BufReader<File>,
    line: usize,
}

impl Iterator for JsonlRows {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut buf = String::new();
        loop {
            buf.clear();
            self.line += 1;
            let location = Location::Line { file: self.path.clone(), line: self.line };
            match self.lines.read_line(&mut buf) {
                Ok(0) => return None,
                Ok(_) if buf.trim().is_empty() => continue,
                Ok(_) => {
                    return Some(
                        serde_json::from_str::<Value>(&buf)
                            .map_err(|e| DataError::at(&location, None, format!("invalid JSON: {e}")))
                            .and_then(|v| into_object(v, &location))
                            .map(|fields| Record { location, fields }),
                    );
                }
                Err(e) => return Some(Err(DataError::at(&location, None, format!("reading: {e}")))),
            }
        }
    }
}

/// A top-level JSON array read one element at a time.
struct JsonArrayRows {
    path: PathBuf,
    reader: BufReader<File>,
    index: usize,
    state: ArrayState,
}

#[derive(PartialEq)]
enum ArrayState {
    Start,
    Items,
    Done,
}

impl JsonArrayRows {
    fn new(path: PathBuf, f: File) -> Self {
        JsonArrayRows { path, reader: BufReader::new(f), index: 0, state: ArrayState::Start }
    }

    /// Next non-whitespace byte, consumed.
    fn next_byte(&mut self) -> std::io::Result<Option<u8>> {
        let mut b = [0u8];
        loop {
            if self.reader.read(&mut b)? == 0 {
                return Ok(None);
            }
            if !b[0].is_ascii_whitespace() {
                return Ok(Some(b[0]));
            }
        }
    }

    fn peek_byte(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            let buf = self.reader.fill_buf()?;
            match buf.first() {
                None => return Ok(None),
                Some(b) if b.is_ascii_whitespace() => self.reader.consume(1),
                Some(&b) => return Ok(Some(b)),
            }
        }
    }

    fn step(&mut self) -> Result<Option<Record>> {
        let location = Location::Element { file: self.path.clone(), index: self.index };
        let err = |m: String| DataError::at(&location, None, m);
        let io = |e: std::io::Error| DataError::at(&location, None, format!("reading: {e}"));
        if self.state == ArrayState::Start {
            match self.next_byte().map_err(io)? {
                Some(b'[') => self.state = ArrayState::Items,
                _ => return Err(DataError::file(&self.path, "a .json dataset must be a JSON array of objects")),
            }
            if self.peek_byte().map_err(io)? == Some(b']') {
                self.reader.consume(1);
                self.state = ArrayState::Done;
                return Ok(None);
            }
        } else {
            match self.next_byte().map_err(io)? {
                Some(b',') => {}
                Some(b']') => {
                    self.state = ArrayState::Done;
                    return Ok(None);
                }
                Some(c) => return Err(err(format!("expected ',' or ']' after the element, found {:?}", c as char))),
                None => return Err(err("unexpected end of file inside the array".into())),
            }
        }
        if self.peek_byte().map_err(io)? != Some(b'{') {
            return Err(err("expected a JSON object".into()));
        }
        // Objects end at '}', so the deserializer reads no byte past the element.
        let mut de = serde_json::Deserializer::from_reader(&mut self.reader);
        let v = Value::deserialize(&mut de).map_err(|e| err(format!("invalid JSON: {e}")))?;
        self.index += 1;
        into_object(v, &location).map(|fields| Some(Record { location, fields }))
    }
}

impl Iterator for JsonArrayRows {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.state == ArrayState::Done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                self.state = ArrayState::Done;
                Some(Err(e))
            }
        }
    }
}

/// Parquet, one row group at a time, each row converted to a JSON object (nested lists and
/// structs become arrays and objects).
struct ParquetRows {
    path: PathBuf,
    row_groups: usize,
    next_group: usize,
    rows: VecDeque<Record>,
}

impl ParquetRows {
    fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        let b = unpanicked(path, || ParquetRecordBatchReaderBuilder::try_new(f))?
            .map_err(|e| DataError::file(path, format!("not a readable Parquet file: {e}")))?;
        Ok(ParquetRows {
            path: path.to_path_buf(),
            row_groups: b.metadata().num_row_groups(),
            next_group: 0,
            rows: VecDeque::new(),
        })
    }

    fn load_group(&mut self, g: usize) -> Result<()> {
        let path = self.path.clone();
        unpanicked(&path, || self.read_group(g))?
    }

    fn read_group(&mut self, g: usize) -> Result<()> {
        let err = |m: String| DataError::file(&self.path, format!("row group {g}: {m}"));
        let f = File::open(&self.path).map_err(|e| DataError::io(&self.path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.with_row_groups(vec![g]).build())
            .map_err(|e| err(e.to_string()))?;
        let mut row = 0;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                w.write(&batch).map_err(|e| err(e.to_string()))?;
                w.finish().map_err(|e| err(e.to_string()))?;
            }
            for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let location = Location::Row { file: self.path.clone(), row_group: g, row };
                let v: Value = serde_json::from_slice(line).map_err(|e| err(e.to_string()))?;
                self.rows.push_back(Record { fields: into_object(v, &location)?, location });
                row += 1;
            }
        }
        Ok(())
    }
}

impl Iterator for ParquetRows {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        while self.rows.is_empty() {
            if self.next_group >= self.row_groups {
                return None;
            }
            let g = self.next_group;
            self.next_group += 1;
            if let Err(e) = self.load_group(g) {
                self.next_group = self.row_groups;
                return Some(Err(e));
            }
        }
        self.rows.pop_front().map(Ok)
    }
}

/// Run the Parquet reader, turning a panic into an error naming `path`: the parquet crate
/// panics on some corrupt metadata (a negative column offset) instead of returning an
/// error. Its panic message is kept off stderr: the error says what happened.
fn unpanicked<T>(path: &Path, read: impl FnOnce() -> T) -> Result<T> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_PARQUET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    IN_PARQUET.with(|q| q.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    IN_PARQUET.with(|q| q.set(false));
    out.map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the reader failed");
        DataError::file(path, format!("corrupt Parquet file: {why}"))
    })
}

thread_local! {
    /// Set while the Parquet reader runs on this thread (see [`unpanicked`]).
    static IN_PARQUET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
