//! A greeter version 3 whose `restore` always traps: a fixture for the
//! hot-swap test that a failing state handoff aborts the upgrade and leaves
//! the running version serving (world `acme:greeter/greeter`).

// The generated canonical-ABI glue (lifting/lowering, `export_name`
// attributes) is necessarily `unsafe`; our own code is not.
#[allow(unsafe_code)]
mod bindings {
    // Both directories are passed so `capsid:host` resolves from wit/host.
    wit_bindgen::generate!({
        path: ["../../wit/host", "../../wit/greeter"],
        world: "acme:greeter/greeter",
    });
}

use bindings::exports::{acme::greeter::greet, capsid::host::lifecycle};

/// The single type implementing every export of the world.
struct Greeter;

impl greet::Guest for Greeter {
    fn hello(name: String) -> String {
        format!("Hey {name}")
    }

    fn version() -> u32 {
        3
    }

    fn count() -> u64 {
        0
    }
}

impl lifecycle::Guest for Greeter {
    fn snapshot() -> Vec<u8> {
        Vec::new()
    }

    fn restore(state: Vec<u8>) {
        panic!("restore refused {} bytes of state", state.len());
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Greeter, bindings};
    bindings::export!(Greeter with_types_in bindings);
}
