//! An incompatible greeter (wit/greeter_bad: `version` returns a string,
//! no `count`, no lifecycle). A fixture for the hot-swap tests: swapping it
//! in for greeter_v1/greeter_v2 must be rejected.

// The generated canonical-ABI glue (lifting/lowering, `export_name`
// attributes) is necessarily `unsafe`; our own code is not.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/greeter_bad",
        world: "acme:greeter/greeter",
    });
}

use bindings::exports::acme::greeter::greet;

/// The single type implementing every export of the world.
struct Greeter;

impl greet::Guest for Greeter {
    fn hello(name: String) -> String {
        format!("Yo {name}")
    }

    fn version() -> String {
        "three".to_owned()
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Greeter, bindings};
    bindings::export!(Greeter with_types_in bindings);
}
