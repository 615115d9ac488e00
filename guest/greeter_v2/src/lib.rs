//! Version 2 of the greeter: says "Hi {name}, welcome back!".
//! A fixture for the hot-swap tests (world `acme:greeter/greeter`): its
//! counter is carried across an upgrade through `capsid:host/lifecycle`.

use std::sync::atomic::{AtomicU64, Ordering};

// The generated canonical-ABI glue (lifting/lowering, `export_name`
// attributes) is necessarily `unsafe`; our own code is not.
#[allow(unsafe_code)]
mod bindings {
    // Both directories are passed so `capsid:host` resolves from wit/host,
    // the single source of truth, without a copy under wit/greeter/deps/.
    wit_bindgen::generate!({
        path: ["../../wit/host", "../../wit/greeter"],
        world: "acme:greeter/greeter",
    });
}

use bindings::exports::{acme::greeter::greet, capsid::host::lifecycle};

/// Number of `count` calls so far; the state that survives a hot swap.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The single type implementing every export of the world.
struct Greeter;

impl greet::Guest for Greeter {
    fn hello(name: String) -> String {
        format!("Hi {name}, welcome back!")
    }

    fn version() -> u32 {
        2
    }

    fn count() -> u64 {
        COUNTER.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl lifecycle::Guest for Greeter {
    fn snapshot() -> Vec<u8> {
        COUNTER.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }

    fn restore(state: Vec<u8>) {
        let Ok(bytes) = <[u8; 8]>::try_from(state.as_slice()) else {
            panic!("restore: expected 8 bytes of state, got {}", state.len());
        };
        COUNTER.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Greeter, bindings};
    bindings::export!(Greeter with_types_in bindings);
}
