//! The baseline NIF of the benchmarks (module `Capsid.Bench.Baseline`, loaded
//! by `bench/support.exs`): the same three operations as the wasm guest
//! `guest/bench`, as plain rustler NIFs, so every Capsid number has a native
//! floor measured in the same run.
//!
//! All three run on a normal scheduler, like `Capsid.call/4`'s first slice.
//! `sha256` of 1 MB takes a few milliseconds, well past the 1 ms a normal
//! NIF should take; that is accepted here on purpose: a `DirtyCpu` NIF
//! would add a scheduler hand-off to every call and make the comparison with
//! the guest unfair in the other direction. Do not copy this into real code.
//!
//! `cargo test` runs outside the BEAM, where the `enif_*` symbols do not
//! exist: test builds register no NIFs (as in host_nif).
#![cfg_attr(test, allow(dead_code, unused_imports))]

use rustler::{Binary, Env, NewBinary};

/// The trivial call: the floor of any NIF call.
#[cfg_attr(not(test), rustler::nif)]
fn add(a: i32, b: i32) -> i32 {
    a.wrapping_add(b)
}

/// Returns a fresh copy of `data` (the guest's echo copies too: into linear
/// memory and back out).
#[cfg_attr(not(test), rustler::nif)]
fn echo<'a>(env: Env<'a>, data: Binary<'a>) -> Binary<'a> {
    NewBinary::from_slice(env, data.as_slice()).into()
}

/// SHA-256 of `data` with the portable `kernels` crate, the code the wasm
/// guest runs.
#[cfg_attr(not(test), rustler::nif)]
fn sha256<'a>(env: Env<'a>, data: Binary<'a>) -> Binary<'a> {
    NewBinary::from_slice(env, &kernels::sha256(data.as_slice())).into()
}

#[cfg(not(test))]
rustler::init!("Elixir.Capsid.Bench.Baseline");
