//! The shared `wasmtime::Engine`s, their configuration, and the epoch
//! ticker that drives time slicing and timeouts.
//!
//! The default engine bounds-checks every memory access, so memories need
//! no address-space reservation and live in `arena.rs`'s shared mappings:
//! 100,000 instances per node. A component loaded with `guard_pages: true`
//! gets an engine that reserves 4 GiB plus a guard region per memory
//! (`guarded.rs`) and compiles no bounds checks: compute runs faster, at two
//! mappings and 4 GiB of address space per memory. `fuel_metering: false`
//! drops fuel counting (time limits only). Each combination is its own
//! engine (`Flavor`), made on first use; a component only runs on the one it
//! was compiled for.
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

/// Which engine a component is compiled for: one per combination of the
/// choices `Capsid.Component.load/2` offers. A component only runs on the
/// engine it was compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flavor {
    /// Guard regions instead of compiled bounds checks (`guarded.rs`).
    pub guard_pages: bool,
    /// Fuel metering: the `:fuel` limit, and a yield every `YIELD_FUEL`
    /// whatever the ticker does. Without it (about a fifth faster on
    /// compute) calls are bounded by time alone.
    pub fuel: bool,
}

impl Flavor {
    pub const DEFAULT: Flavor = Flavor {
        guard_pages: false,
        fuel: true,
    };

    fn index(self) -> usize {
        usize::from(self.guard_pages) * 2 + usize::from(self.fuel)
    }

    fn from_index(i: usize) -> Flavor {
        Flavor {
            guard_pages: i & 2 != 0,
            fuel: i & 1 != 0,
        }
    }
}

static ENGINES: [OnceLock<Engine>; 4] = [const { OnceLock::new() }; 4];

pub fn config(flavor: Flavor) -> Config {
    let mut config = Config::new();
    config
        .consume_fuel(flavor.fuel)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK_SIZE)
        .guard_before_linear_memory(false)
        .memory_reservation_for_growth(0)
        .memory_init_cow(false)
        .with_host_stack(Arc::new(crate::arena::Stacks));
    if flavor.guard_pages {
        config
            .memory_reservation(GUARDED_RESERVATION)
            .memory_guard_size(GUARDED_GUARD)
            .memory_may_move(false)
            .with_host_memory(Arc::new(crate::guarded::Memories));
    } else {
        // Memories come from Capsid's arenas (see arena.rs): no per-instance
        // mappings, so no reservation and no guard region; compiled code
        // bounds-checks memory accesses instead.
        config
            .memory_reservation(0)
            .memory_guard_size(0)
            .memory_may_move(true)
            .with_host_memory(Arc::new(crate::arena::Memories));
    }
    config
}

/// The shared engine of `flavor`.
pub fn engine_of(flavor: Flavor) -> &'static Engine {
    ENGINES[flavor.index()]
        .get_or_init(|| Engine::new(&config(flavor)).expect("static engine configuration is valid"))
}

/// Whether `engine` (one of ours) meters fuel.
pub fn meters_fuel(engine: &Engine) -> bool {
    ENGINES.iter().enumerate().any(|(i, cell)| {
        Flavor::from_index(i).fuel && cell.get().is_some_and(|e| Engine::same(e, engine))
    })
}

/// Advances the epoch of every engine made so far.
fn tick_all() {
    for cell in &ENGINES {
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
        for guard_pages in [false, true] {
            for fuel in [false, true] {
                let flavor = Flavor { guard_pages, fuel };
                assert_eq!(Flavor::from_index(flavor.index()), flavor);
                assert_eq!(meters_fuel(engine_of(flavor)), fuel);
            }
        }
    }

    #[test]
    fn thread_slots_are_stable_per_thread() {
        assert_eq!(thread_slot(), thread_slot());
    }
}
