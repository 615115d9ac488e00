//! The one shared `wasmtime::Engine`, its configuration, and the epoch ticker
//! that drives time slicing and timeouts.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine};

/// Wasm stack a guest may use. Guest code always runs on a wasmtime fiber
/// (never on the BEAM scheduler's own ~320 KiB stack), so this only has to fit
/// in `ASYNC_STACK_SIZE` with room left for host functions.
pub const MAX_WASM_STACK: usize = 1024 * 1024;
/// Size of each fiber stack: `MAX_WASM_STACK` for the guest plus 1 MiB for
/// host code (WASI, conversions, Elixir import plumbing) running on it.
pub const ASYNC_STACK_SIZE: usize = 2 * 1024 * 1024;
/// Epoch tick period. A running guest yields back to the calling Erlang
/// process at every tick, so no scheduler is held much longer than this.
pub const TICK: Duration = Duration::from_micros(500);
/// Fuel between forced yields, whatever the ticker does: a backstop for when
/// the ticker thread is starved of CPU on a loaded machine. Measured here at
/// roughly 10–20 units per nanosecond of tight guest loop, so ≈ 0.1–1 ms.
pub const YIELD_FUEL: u64 = 2_000_000;

static ENGINE: OnceLock<Engine> = OnceLock::new();
/// Microseconds since the ticker started, refreshed at every tick: the call
/// path reads the time several times per call, and a relaxed atomic load is
/// far cheaper than `clock_gettime`. Deadlines are checked at tick
/// granularity anyway (the epoch callback), so nothing is lost.
static NOW_US: AtomicU64 = AtomicU64::new(0);

/// The coarse clock, in microseconds (advances every `TICK`).
pub fn now_us() -> u64 {
    NOW_US.load(Ordering::Relaxed)
}

pub fn config() -> Config {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK_SIZE);
    config
}

/// The shared engine; the first use starts the epoch ticker thread.
pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| {
        let engine = Engine::new(&config()).expect("static engine configuration is valid");
        let ticker = engine.clone();
        let base = Instant::now();
        std::thread::Builder::new()
            .name("capsid-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    let us = u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX);
                    NOW_US.store(us, Ordering::Relaxed);
                    ticker.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        engine
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_configuration_is_accepted() {
        let _ = engine();
    }
}
