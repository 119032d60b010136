//! One point of the search: which kernel, its chunk size, the CPU executor's time block and
//! the V-tile of the grid.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kernel a configuration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    /// The fused token-by-token kernel (any rule).
    Recurrent,
    /// The chunked kernel (rules linear in the state).
    Chunked,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Recurrent => "recurrent",
            KernelKind::Chunked => "chunked",
        }
    }
}

/// A schedule of one rule's kernel on one problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    pub kernel: KernelKind,
    /// Tokens per chunk of the chunked kernel; 0 for the recurrent kernel, which has none
    /// (so that two recurrent configurations compare equal whatever chunk a caller had).
    pub chunk: usize,
    /// Tokens per time block of the CPU executor (0: head by head).
    pub time_block: usize,
    /// Columns of V per grid point; None: the whole V.
    pub bv: Option<usize>,
}

impl Config {
    pub fn chunked(chunk: usize, time_block: usize, bv: Option<usize>) -> Config {
        Config { kernel: KernelKind::Chunked, chunk, time_block, bv }
    }

    pub fn recurrent(time_block: usize, bv: Option<usize>) -> Config {
        Config { kernel: KernelKind::Recurrent, chunk: 0, time_block, bv }
    }

    /// Tokens one step of the kernel's loop covers: the executor's time blocks are whole steps.
    pub fn tokens_per_step(&self) -> usize {
        match self.kernel {
            KernelKind::Recurrent => 1,
            KernelKind::Chunked => self.chunk.max(1),
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kernel {
            KernelKind::Recurrent => write!(f, "recurrent")?,
            KernelKind::Chunked => write!(f, "chunked C={}", self.chunk)?,
        }
        write!(f, " time-block={}", self.time_block)?;
        match self.bv {
            Some(bv) => write!(f, " bv={bv}"),
            None => write!(f, " bv=V"),
        }
    }
}
