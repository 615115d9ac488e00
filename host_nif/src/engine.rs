//! The one shared `wasmtime::Engine`, its configuration, and the epoch
//! ticker that drives time slicing and timeouts.
//!
//! The ticker only runs while guest code may be running: every poll of a
//! call marks its scheduler thread busy, and the ticker parks itself after
//! `IDLE_PARK` without any busy thread, so an idle node sees no wake-ups from
//! Capsid at all. A poll that finds the ticker parked wakes it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine};

/// Wasm stack a guest may use. Guest code always runs on a wasmtime fiber
/// (never on the BEAM scheduler's own ~320 KiB stack), so this only has to fit
/// in `ASYNC_STACK_SIZE` with room left for host functions.
pub const MAX_WASM_STACK: usize = 1024 * 1024;
/// Size of each fiber stack (see `arena::STACK_SIZE`).
pub const ASYNC_STACK_SIZE: usize = crate::arena::STACK_SIZE;
/// Epoch tick period. A running guest yields back to the calling Erlang
/// process at every tick, so no scheduler is held much longer than this.
pub const TICK: Duration = Duration::from_micros(500);
/// Fuel between forced yields, whatever the ticker does: a backstop for when
/// the ticker thread is starved of CPU on a loaded machine. Measured here at
/// roughly 10–20 units per nanosecond of tight guest loop, so ≈ 0.1–1 ms.
pub const YIELD_FUEL: u64 = 2_000_000;
/// How long the ticker keeps ticking without any poll before it parks.
const IDLE_PARK: Duration = Duration::from_millis(100);

static ENGINE: OnceLock<Engine> = OnceLock::new();

pub fn config() -> Config {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK_SIZE)
        // Memories and stacks come from Capsid's arenas (see arena.rs): no
        // per-instance mappings, so no reservation and no guard region;
        // compiled code bounds-checks memory accesses instead.
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_reservation_for_growth(0)
        .guard_before_linear_memory(false)
        .memory_may_move(true)
        .memory_init_cow(false)
        .with_host_memory(Arc::new(crate::arena::Memories))
        .with_host_stack(Arc::new(crate::arena::Stacks));
    config
}

/// The shared engine.
pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| Engine::new(&config()).expect("static engine configuration is valid"))
}

// ------------------------------------------------------------ the ticker

/// One busy counter per scheduler thread, each on its own cache line, so
/// that marking a poll costs no shared write.
#[repr(align(128))]
#[derive(Default)]
struct Slot(AtomicU32);

const SLOTS: usize = 64;
static BUSY: [Slot; SLOTS] = [const { Slot(AtomicU32::new(0)) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static PARKED: AtomicBool = AtomicBool::new(false);
/// How many times a poll found the ticker parked and woke it.
static WAKES: AtomicU64 = AtomicU64::new(0);
static TICKER: OnceLock<Thread> = OnceLock::new();

thread_local! {
    static MY_SLOT: usize = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
}

/// A small per-thread index, stable for the thread's life: pools pick a
/// member with it, so callers on different schedulers use different members.
pub fn thread_slot() -> usize {
    MY_SLOT.with(|s| *s)
}

fn any_busy() -> bool {
    BUSY.iter().any(|s| s.0.load(Ordering::SeqCst) > 0)
}

fn ticker() -> &'static Thread {
    TICKER.get_or_init(|| {
        let engine = engine().clone();
        std::thread::Builder::new()
            .name("capsid-epoch".into())
            .spawn(move || {
                let mut last_busy = Instant::now();
                loop {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                    if any_busy() {
                        last_busy = Instant::now();
                        continue;
                    }
                    if last_busy.elapsed() < IDLE_PARK {
                        continue;
                    }
                    // Dekker-style handshake with `Busy::enter`: publish
                    // PARKED, then look at the slots once more; a poll that
                    // raced us either sees PARKED and unparks us, or is seen.
                    // `park` may return spuriously, and a poll that
                    // unparked us may be over already: tick again only
                    // once some thread is running guest code.
                    PARKED.store(true, Ordering::SeqCst);
                    while !any_busy() {
                        std::thread::park();
                    }
                    PARKED.store(false, Ordering::SeqCst);
                    last_busy = Instant::now();
                }
            })
            .expect("spawning the epoch ticker thread")
            .thread()
            .clone()
    })
}

/// Marks this thread as running guest code for as long as it lives.
pub struct Busy(usize);

impl Busy {
    pub fn enter() -> Busy {
        let slot = thread_slot();
        BUSY[slot].0.fetch_add(1, Ordering::SeqCst);
        if PARKED.load(Ordering::SeqCst) || TICKER.get().is_none() {
            WAKES.fetch_add(1, Ordering::Relaxed);
            ticker().unpark();
        }
        Busy(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY[self.0].0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether the ticker is parked right now (for tests and `info`).
pub fn ticker_parked() -> bool {
    PARKED.load(Ordering::SeqCst)
}

/// How many times a call woke the parked ticker (for tests and `info`).
pub fn ticker_wakes() -> u64 {
    WAKES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_configuration_is_accepted() {
        let _ = engine();
    }

    #[test]
    fn thread_slots_are_stable_per_thread() {
        assert_eq!(thread_slot(), thread_slot());
    }
}
