//! The parts of xtask that need no backend, as a library: their unit tests then compile
//! without the binary's monomorphised stages (see Cargo.toml's `test = false`).

pub mod fuzz;
