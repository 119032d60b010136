//! chunkc's code generator: the tile IR, the chunk plans per recurrence class, and backends.

pub mod builder;
pub mod cpu;
pub mod interp;
pub mod ir;
