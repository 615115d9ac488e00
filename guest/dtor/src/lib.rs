//! Hostile guest for Capsid's tests (world `capsid:dtor/dtor`): a resource
//! whose destructor panics after writing a secret to stderr, or spins for a
//! while. Its handle is made by one caller and garbage-collected; the tests
//! check that another caller never pays for the destructor.

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/dtor",
        world: "capsid:dtor/dtor",
    });
}

use bindings::exports::capsid::dtor::hazards;

thread_local! {
    static FINISHED: Cell<u32> = const { Cell::new(0) };
}

struct Hazard {
    mode: String,
    secret: String,
    ms: u32,
}

impl Drop for Hazard {
    fn drop(&mut self) {
        match self.mode.as_str() {
            "panic" => {
                let _ = writeln!(std::io::stderr(), "{}", self.secret);
                panic!("destructor of {} failed on purpose", self.secret);
            }
            "spin" => {
                let _ = writeln!(std::io::stderr(), "{}", self.secret);
                let until = Instant::now() + Duration::from_millis(u64::from(self.ms));
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            _ => {}
        }
        FINISHED.with(|f| f.set(f.get() + 1));
    }
}

impl hazards::GuestHazard for Hazard {
    fn new(mode: String, secret: String, ms: u32) -> Hazard {
        Hazard { mode, secret, ms }
    }
}

struct Component;

impl hazards::Guest for Component {
    type Hazard = Hazard;

    fn ping() -> String {
        "pong".into()
    }

    fn fail() {
        panic!("ping failed on purpose");
    }

    fn finished() -> u32 {
        FINISHED.with(Cell::get)
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Component, bindings};
    bindings::export!(Component with_types_in bindings);
}
