//! The Capsid example component (world `acme:toolkit/toolkit`): a greeting
//! that talks to the host, a text analyser, a small pricing engine and one
//! identity function per WIT value type for the round-trip tests.

mod echo;
mod pricing;
mod text;

// The generated canonical-ABI glue (lifting/lowering, `export_name`
// attributes, the import shims) is necessarily `unsafe`; our own code is not.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/toolkit",
        world: "toolkit",
    });
}

use bindings::{Guest, Level, get_config, log};

/// The single type implementing every export of the world.
struct Toolkit;

/// Greeting used when the host has no `greeting` config entry.
const DEFAULT_GREETING: &str = "Hello";

impl Guest for Toolkit {
    fn add(a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }

    fn greet(name: String) -> String {
        let template = get_config("greeting").unwrap_or_else(|| DEFAULT_GREETING.to_owned());
        log(Level::Info, &format!("greeted {name}"));
        format!("{template}, {name}!")
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Toolkit, bindings};
    bindings::export!(Toolkit with_types_in bindings);
}
