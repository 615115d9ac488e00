//! The two shared `wasmtime::Engine`s, their configuration, and the epoch
//! ticker that drives time slicing and timeouts.
//!
//! The dense engine (the default) bounds-checks every memory access, so
//! memories need no address-space reservation and live in `arena.rs`'s
//! shared mappings: 100,000 instances per node. The guarded engine, for
//! components loaded with `guard_pages: true`, reserves 4 GiB plus a guard
//! region per memory (`guarded.rs`) and compiles no bounds checks: compute
//! runs faster, at two mappings and 4 GiB of address space per memory.
//! A component is compiled for one engine and only runs on it.
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

/// Reserved address space of a guarded memory: all a wasm32 memory can
/// address, so compiled code needs no bounds check.
pub const GUARDED_RESERVATION: u64 = 4 << 30;
/// Unmapped bytes after a guarded memory: a load or store at a static
/// offset below this past the reservation faults instead of being checked.
pub const GUARDED_GUARD: u64 = 32 << 20;

/// Which engine a component is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Dense,
    Guarded,
}

static DENSE: OnceLock<Engine> = OnceLock::new();
static GUARDED: OnceLock<Engine> = OnceLock::new();

pub fn config(kind: Kind) -> Config {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK_SIZE)
        .guard_before_linear_memory(false)
        .memory_reservation_for_growth(0)
        .memory_init_cow(false)
        .with_host_stack(Arc::new(crate::arena::Stacks));
    match kind {
        // Memories come from Capsid's arenas (see arena.rs): no per-instance
        // mappings, so no reservation and no guard region; compiled code
        // bounds-checks memory accesses instead.
        Kind::Dense => config
            .memory_reservation(0)
            .memory_guard_size(0)
            .memory_may_move(true)
            .with_host_memory(Arc::new(crate::arena::Memories)),
        Kind::Guarded => config
            .memory_reservation(GUARDED_RESERVATION)
            .memory_guard_size(GUARDED_GUARD)
            .memory_may_move(false)
            .with_host_memory(Arc::new(crate::guarded::Memories)),
    };
    config
}

/// The shared engine of `kind`.
pub fn engine_of(kind: Kind) -> &'static Engine {
    let cell = match kind {
        Kind::Dense => &DENSE,
        Kind::Guarded => &GUARDED,
    };
    cell.get_or_init(|| Engine::new(&config(kind)).expect("static engine configuration is valid"))
}

/// Advances the epoch of every engine made so far.
fn tick_all() {
    for cell in [&DENSE, &GUARDED] {
        if let Some(engine) = cell.get() {
            engine.increment_epoch();
        }
    }
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
        std::thread::Builder::new()
            .name("capsid-epoch".into())
            .spawn(move || {
                let mut last_busy = Instant::now();
                loop {
                    std::thread::sleep(TICK);
                    tick_all();
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
    fn engine_configurations_are_accepted() {
        let _ = engine_of(Kind::Dense);
        let _ = engine_of(Kind::Guarded);
    }

    #[test]
    fn thread_slots_are_stable_per_thread() {
        assert_eq!(thread_slot(), thread_slot());
    }
}
