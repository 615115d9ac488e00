//! A guest with state worth keeping (world `capsid:stateful/stateful`): a
//! counter and a payload of any size, carried across hot swaps through
//! `capsid:host/lifecycle`, and a switch that makes `snapshot` fail.

use std::cell::RefCell;

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: ["../../wit/host", "../../wit/stateful"],
        world: "capsid:stateful/stateful",
    });
}

use bindings::exports::{capsid::host::lifecycle, capsid::stateful::state};

#[derive(Default)]
struct State {
    counter: u64,
    payload: Vec<u8>,
    broken: bool,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

struct Stateful;

impl state::Guest for Stateful {
    fn bump() -> u64 {
        STATE.with_borrow_mut(|s| {
            s.counter += 1;
            s.counter
        })
    }

    fn fill(size: u32, seed: u8) {
        STATE.with_borrow_mut(|s| {
            s.payload = (0..size)
                .map(|i| (i.wrapping_mul(31).wrapping_add(u32::from(seed)) % 256) as u8)
                .collect();
        })
    }

    fn digest() -> (u64, u64, u64) {
        STATE.with_borrow(|s| {
            let sum = s.payload.iter().map(|b| u64::from(*b)).sum();
            (s.counter, s.payload.len() as u64, sum)
        })
    }

    fn break_snapshot() {
        STATE.with_borrow_mut(|s| s.broken = true)
    }
}

impl lifecycle::Guest for Stateful {
    /// The counter (8 bytes, little endian) followed by the payload.
    fn snapshot() -> Vec<u8> {
        STATE.with_borrow(|s| {
            if s.broken {
                panic!("snapshot refused: the state is marked broken");
            }
            let mut out = s.counter.to_le_bytes().to_vec();
            out.extend_from_slice(&s.payload);
            out
        })
    }

    fn restore(state: Vec<u8>) {
        let Some((counter, payload)) = state.split_first_chunk::<8>() else {
            panic!("restore: expected at least 8 bytes, got {}", state.len());
        };
        STATE.with_borrow_mut(|s| {
            s.counter = u64::from_le_bytes(*counter);
            s.payload = payload.to_vec();
        })
    }
}

#[allow(unsafe_code)]
mod export {
    use super::{Stateful, bindings};
    bindings::export!(Stateful with_types_in bindings);
}
