//! Cranelift CPU backend (in progress).
