//! Errors of the model crate: each names the file and, where there is one, the field or
//! tensor at fault.

use std::path::{Path, PathBuf};

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}config: {message}", file_prefix(.path))]
    Config { path: Option<PathBuf>, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

fn file_prefix(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }

    pub fn config(message: impl Into<String>) -> Self {
        ModelError::Config { path: None, message: message.into() }
    }

    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        ModelError::Format { path: path.to_path_buf(), message: message.into() }
    }

    pub fn tensor(name: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Tensor { name: name.into(), message: message.into() }
    }

    /// Attach the file a config or tensor error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            ModelError::Config { path: None, message } => {
                ModelError::Config { path: Some(path.to_path_buf()), message }
            }
            ModelError::Tensor { name, message } => ModelError::format(path, format!("tensor `{name}`: {message}")),
            other => other,
        }
    }
}
