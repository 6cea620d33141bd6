//! Data errors name the file, the line (or JSON array element, or Parquet row group and
//! row) and the field at fault.

use std::fmt;
use std::path::{Path, PathBuf};

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Where a row came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// JSONL: 1-based line.
    Line { file: PathBuf, line: usize },
    /// JSON array: 0-based element.
    Element { file: PathBuf, index: usize },
    /// Parquet: row group and row within it, both 0-based.
    Row { file: PathBuf, row_group: usize, row: usize },
    /// A row built in memory (tests, synthetic tasks).
    Memory { index: usize },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line { file, line } => write!(f, "{}:{line}", file.display()),
            Location::Element { file, index } => write!(f, "{}: element {index}", file.display()),
            Location::Row { file, row_group, row } => write!(f, "{}: row group {row_group}, row {row}", file.display()),
            Location::Memory { index } => write!(f, "row {index}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A problem with one row.
    #[error("{location}: {}{message}", field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
    Row { location: Location, field: Option<String>, message: String },
    /// A problem with a whole file.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] align_model::ModelError),
}

impl DataError {
    pub fn at(location: &Location, field: Option<&str>, message: impl Into<String>) -> Self {
        DataError::Row { location: location.clone(), field: field.map(str::to_string), message: message.into() }
    }

    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        DataError::File { path: path.to_path_buf(), message: message.into() }
    }

    pub fn io(path: &Path, e: std::io::Error) -> Self {
        DataError::file(path, e.to_string())
    }
}
