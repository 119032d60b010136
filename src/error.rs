//! The facade's error: everything a `chunkc` command can report, each as one clear message.

use chunkc_dsl::diag::Diagnostic;
use chunkc_runtime::error::RuntimeError;
use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// A problem in a rule file (rendered with file:line:col and a caret).
    Rule(Box<Diagnostic>),
    /// Bad input tensors or options (one line).
    Input(String),
    /// The rule is valid but this backend cannot run it (one line).
    Unsupported(String),
    /// The PTX simulator or the CUDA device failed to run a kernel (one line, naming it).
    Device(String),
    /// Reading or writing tensors failed.
    Runtime(RuntimeError),
    /// A bug in chunkc: the message says what broke.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Rule(d) => write!(f, "{}", d.to_string().trim_end()),
            Error::Input(s) | Error::Unsupported(s) | Error::Device(s) => f.write_str(s),
            Error::Runtime(e) => write!(f, "{e}"),
            Error::Internal(s) => write!(f, "internal error (a bug in chunkc): {s}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<Diagnostic> for Error {
    fn from(d: Diagnostic) -> Error {
        Error::Rule(Box::new(d))
    }
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Error {
        Error::Runtime(e)
    }
}
