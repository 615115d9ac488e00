//! Capsid's NIF: hosts wasmtime inside the BEAM. One file per concept,
//! mirrored by one Elixir module per concept in `lib/capsid/`.
//!
//! Layers, lowest first (a file only uses files above it in this list):
//! `budget`, `error`, `arena`, `engine`, `limits`, `shape`, `value`, `abi`, `stdio`,
//! `cache`, `descriptors`, `wasi`, `host`, `symlinks`, `http`, `host_resource`, `resource`, `convert`,
//! `component`, `types`, `imports`, `run`, `instance`, `pool`, `registry`,
//! `call`, `node`, `wit`.
//!
//! `cargo test` runs outside the BEAM, where the `enif_*` symbols do not
//! exist: test builds therefore register no NIFs and no resource types, so
//! the pure code under test links on its own.
#![cfg_attr(test, allow(dead_code))]

/// Large buffers (call arguments and results) come and go on every call;
/// glibc hands freed multi-MiB blocks back to the OS, so each call paid for
/// fresh page faults. mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod abi;
mod arena;
mod budget;
mod cache;
mod call;
mod component;
mod convert;
mod descriptors;
mod engine;
mod error;
mod guarded;
mod host;
mod host_resource;
mod http;
mod imports;
mod instance;
mod limits;
mod node;
mod pool;
mod registry;
mod resource;
mod run;
mod shape;
mod stdio;
mod symlinks;
mod types;
mod value;
mod wasi;
mod wit;

#[cfg(not(test))]
rustler::init!("Elixir.Capsid.Native");
