//! The engine's error type: every failure names the place it happened.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}:{line}: {msg}")]
    Data { path: PathBuf, line: u64, msg: String },
    #[error("io: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("input: {0}")]
    Input(String),
    #[error("numeric: {0}")]
    Numeric(String),
    #[error("device: {0}")]
    Device(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("transport: {0}")]
    Transport(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl From<ember_transport::Error> for Error {
    fn from(e: ember_transport::Error) -> Self {
        Error::Transport(e.to_string())
    }
}
