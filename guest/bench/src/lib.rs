//! The benchmark component (world `capsid:bench/bench`): a trivial `add`,
//! two echoes and SHA-256. The digest comes from the portable `kernels`
//! crate, the very code the native baseline NIF (`bench/baseline_nif`) runs,
//! so `bench/compute.exs` compares wasmtime with native on the same source.

// The generated canonical-ABI glue (lifting/lowering, `export_name`
// attributes) is necessarily `unsafe`; our own code is not.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/bench",
        world: "bench",
    });
}

use bindings::Guest;

/// The single type implementing every export of the world.
struct Bench;

impl Guest for Bench {
    fn add(a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }

    fn echo_bytes(data: Vec<u8>) -> Vec<u8> {
        data
    }

    fn echo_string(s: String) -> String {
        s
    }

    fn sha256(data: Vec<u8>) -> Vec<u8> {
        kernels::sha256(&data).to_vec()
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Bench, bindings};
    bindings::export!(Bench with_types_in bindings);
}
