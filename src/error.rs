//! The facade's error: everything a `chunkc` command or a library call can report, each as
//! one clear message, typed so that a program can match on what went wrong.

use chunkc_dsl::diag::Diagnostic;
use chunkc_runtime::error::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem in a rule file (rendered with file:line:col and a caret).
    #[error("{}", .0.to_string().trim_end())]
    Rule(Box<Diagnostic>),
    /// Bad input tensors or options (one line).
    #[error("{0}")]
    Input(String),
    /// The rule is valid but this backend cannot run it (one line).
    #[error("{0}")]
    Unsupported(String),
    /// The PTX simulator or the CUDA device failed to run a kernel (one line, naming it).
    #[error("{0}")]
    Device(String),
    /// Reading or writing tensors failed, or a tensor has the wrong shape (its name, the
    /// expected and the actual shape).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A bug in chunkc: the message says what broke.
    #[error("internal error (a bug in chunkc): {0}")]
    Internal(String),
}

impl From<Diagnostic> for Error {
    fn from(d: Diagnostic) -> Error {
        Error::Rule(Box::new(d))
    }
}
