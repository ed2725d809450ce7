//! One error type for the whole crate. Every variant carries enough context to tell the user
//! what was expected and what was found, and where (file, tensor, option, adapter limit).

use std::fmt;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched (none at all, or none for the requested backend / selector).
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),

    /// The adapter offers less than a model or kernel needs.
    #[error(
        "adapter '{adapter}' is too small: limit `{limit}` offered {offered}, needed {needed} ({why})"
    )]
    Limit {
        adapter: String,
        limit: &'static str,
        needed: u64,
        offered: u64,
        why: String,
    },

    /// A command-line option or environment variable has a value we do not understand.
    #[error("invalid value for {name}: {msg}")]
    InvalidOption { name: String, msg: String },

    /// A tensor's shape, dtype or size is not what an operation or file expects.
    #[error("tensor `{name}`: expected {expected}, found {found}")]
    Tensor {
        name: String,
        expected: String,
        found: String,
    },

    /// The device refused something (device creation, out of memory, device lost, ...).
    #[error("GPU error: {0}")]
    Gpu(String),

    /// The device was lost: nothing more can run on it; open a new one and reload.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),

    /// A file's contents are malformed or not what we support (truncated, bad magic, unknown
    /// type, out-of-range offsets, ...). `detail` says what was expected and what was found.
    #[error("{path}: {detail}")]
    Format { path: String, detail: String },

    /// A download failed (HTTP status, interrupted transfer, checksum mismatch, ...).
    #[error("{url}: {msg}")]
    Network { url: String, msg: String },

    /// A file could not be read or written. The I/O error is part of the message and not a
    /// `source`: printed as a chain (`{:#}`), it would otherwise appear twice.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
}

impl Error {
    /// Shorthand for a [`Error::Format`] error.
    pub fn format(path: impl fmt::Display, detail: impl fmt::Display) -> Self {
        Error::Format {
            path: path.to_string(),
            detail: detail.to_string(),
        }
    }

    /// Shorthand for an [`Error::Io`] error.
    pub fn io(path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            err: source,
        }
    }

    /// Shorthand for a [`Error::Tensor`] error.
    pub fn tensor(
        name: impl fmt::Display,
        expected: impl fmt::Display,
        found: impl fmt::Display,
    ) -> Self {
        Error::Tensor {
            name: name.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}
