//! f64 reference interpreter (in progress).
