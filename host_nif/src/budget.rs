//! Node budgets: what all instances of the node share, bounded node-wide.
//!
//! A per-instance limit bounds one guest; many guests together could still
//! take every descriptor of the OS process (and the VM dies: it cannot open
//! a file or a socket, nor load code), all of the machine's memory (the OOM
//! killer), or make the host keep terms without end. Each budget here is a
//! counter with a ceiling that every instance draws from and gives back to:
//!
//! * `MEMORY`: bytes of linear memory and tables of all live stores
//!   (`limits::Limiter`), default the machine's physical memory;
//! * `DESCRIPTORS`: OS descriptors held for guests (files and directories
//!   opened through WASI, preopens, outbound HTTP connections:
//!   `descriptors.rs`), default half of `RLIMIT_NOFILE`; whatever is
//!   configured, a reserve stays for the VM itself;
//! * `HOST_BYTES`: bytes of Elixir terms the host keeps for guests' host
//!   resources (`host_resource::Table`), default a quarter of physical
//!   memory.
//!
//! A refusal reaches the guest as a trap or a WASI error (each user says
//! which) and Elixir as a `[:capsid, :resource_limit]` event
//! (`Capsid.Budget`), sent when the call that met it ends.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Descriptors never granted to guests, whatever the configuration: the
/// VM's own files, sockets and code loading.
pub const DESCRIPTOR_RESERVE: u64 = 64;

/// "Not configured": the budget's default applies.
const UNSET: u64 = u64::MAX;

/// One node-wide budget.
pub struct Budget {
    /// What Elixir calls it (`Capsid.info/0`, the event's `:resource`).
    pub name: &'static str,
    /// Its application environment key.
    pub key: &'static str,
    /// Bit in `Shared::refused` for an instance that met it.
    pub bit: u32,
    in_use: AtomicU64,
    limit: AtomicU64,
    refused: AtomicU64,
    default: fn() -> u64,
    /// Clamps a configured limit (the descriptor reserve).
    clamp: fn(u64) -> u64,
}

fn keep(n: u64) -> u64 {
    n
}

impl Budget {
    const fn new(
        name: &'static str,
        key: &'static str,
        bit: u32,
        default: fn() -> u64,
        clamp: fn(u64) -> u64,
    ) -> Self {
        Budget {
            name,
            key,
            bit,
            in_use: AtomicU64::new(0),
            limit: AtomicU64::new(UNSET),
            refused: AtomicU64::new(0),
            default,
            clamp,
        }
    }

    pub fn limit(&self) -> u64 {
        match self.limit.load(Ordering::Relaxed) {
            UNSET => (self.clamp)((self.default)()),
            n => n,
        }
    }

    /// Sets the ceiling (`None`: the default). Lowering it below what is in
    /// use takes nothing back; it refuses until enough is given back.
    pub fn set_limit(&self, limit: Option<u64>) {
        let n = limit.map_or(UNSET, |n| (self.clamp)(n.min(UNSET - 1)));
        self.limit.store(n, Ordering::Relaxed);
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes `n` if the budget has them; else counts the refusal and says
    /// how much is in use and the ceiling.
    pub fn take(&self, n: u64) -> Result<(), (u64, u64)> {
        let limit = self.limit();
        let taken = self
            .in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            });
        match taken {
            Ok(_) => Ok(()),
            Err(used) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err((used, limit))
            }
        }
    }

    /// Its name as Elixir sees it (`:memory`, ...): a static atom.
    pub fn atom<'a>(&self, env: rustler::Env<'a>) -> rustler::Term<'a> {
        use rustler::Encoder;
        rustler::Atom::from_str(env, self.name)
            .map_or_else(|_| self.name.encode(env), |a| a.encode(env))
    }

    /// Counts a refusal made on the budget's behalf (the descriptor reserve,
    /// which the kernel's numbering shows before the count does).
    pub fn count_refusal(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives back `n` taken earlier.
    pub fn give(&self, n: u64) {
        // Saturating: a bug elsewhere must not wrap the count to "all used".
        let _ = self
            .in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(n))
            });
    }

    /// Takes `n` for an instance whose refusals are noted in `refused`; a
    /// refusal is its message (`refusal`).
    pub fn take_for(&self, n: u64, refused: &Refused, unit: &str) -> Result<(), String> {
        self.take(n).map_err(|state| {
            refused.note(self);
            self.refusal(n, state, unit)
        })
    }

    /// The message of a refusal: what was asked, what is in use, the
    /// ceiling and how to raise it.
    pub fn refusal(&self, asked: u64, (used, limit): (u64, u64), unit: &str) -> String {
        format!(
            "the node's {} budget is used up: {asked} more {unit} asked for, {used} in use \
             by all instances, the limit is {limit} (config :capsid, {})",
            self.name, self.key
        )
    }
}

/// Physical memory of the machine, in bytes.
fn physical_memory() -> u64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s),
        // Unknown: 8 GiB, a small server.
        _ => 8 << 30,
    }
}

/// The soft `RLIMIT_NOFILE` of the OS process (what `open` is held to).
pub fn descriptor_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    if ok && rl.rlim_cur != libc::RLIM_INFINITY {
        rl.rlim_cur
    } else {
        // Unknown or unlimited: the kernel's usual per-process maximum.
        1 << 20
    }
}

fn half_of_descriptors() -> u64 {
    descriptor_limit() / 2
}

/// Whatever is configured, `DESCRIPTOR_RESERVE` descriptors stay the VM's.
fn below_reserve(n: u64) -> u64 {
    n.min(descriptor_limit().saturating_sub(DESCRIPTOR_RESERVE))
}

fn quarter_of_memory() -> u64 {
    physical_memory() / 4
}

pub static MEMORY: Budget = Budget::new("memory", "max_memory_total", 1, physical_memory, keep);
pub static DESCRIPTORS: Budget = Budget::new(
    "descriptors",
    "max_descriptors_total",
    2,
    half_of_descriptors,
    below_reserve,
);
pub static HOST_BYTES: Budget = Budget::new(
    "host_bytes",
    "max_host_bytes_total",
    4,
    quarter_of_memory,
    keep,
);

pub static ALL: [&Budget; 3] = [&MEMORY, &DESCRIPTORS, &HOST_BYTES];

fn one() -> u64 {
    1
}

/// Capsid's conversions running on dirty CPU schedulers at once: one less
/// than the VM has (`Capsid.Application` sets it; 1 until then). The VM
/// collects large heaps on those schedulers too, and on a small machine a
/// dirty thread that converts competes with the normal schedulers for the
/// cores: two callers receiving 2.7M-element results delayed a heartbeat
/// process by 140–155 ms with both dirty schedulers converting, 3–4 ms
/// with one (bench/result_heartbeat.exs). Not a limit users meet: a dirty
/// NIF that finds it full answers at once and the caller tries again.
pub static DIRTY: Budget = Budget::new("dirty", "dirty_conversions", 0, one, keep);

/// A dirty conversion running; dropping it lets the next one in. Held by
/// the NIF call itself, so a caller killed meanwhile still gives it back.
pub struct DirtySlot(());

impl Drop for DirtySlot {
    fn drop(&mut self) {
        DIRTY.give(1);
    }
}

/// A slot for a dirty conversion, if one is free.
pub fn dirty_slot() -> Option<DirtySlot> {
    DIRTY.take(1).ok().map(|()| DirtySlot(()))
}

/// Which budgets one instance met during its current call (bits of
/// `Budget::bit`): read and cleared when the call ends, to tell Elixir.
#[derive(Default)]
pub struct Refused(AtomicU32);

impl Refused {
    pub fn note(&self, budget: &Budget) {
        self.0.fetch_or(budget.bit, Ordering::Relaxed);
    }

    /// The budgets met since the last call to `take`.
    pub fn take(&self) -> impl Iterator<Item = &'static Budget> {
        // A plain load first: the common case (nothing refused) writes nothing.
        let bits = match self.0.load(Ordering::Relaxed) {
            0 => 0,
            _ => self.0.swap(0, Ordering::Relaxed),
        };
        ALL.into_iter().filter(move |b| bits & b.bit != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ten() -> u64 {
        10
    }

    #[test]
    fn takes_within_the_limit_and_counts_refusals() {
        let b = Budget::new("test", "max_test", 8, ten, keep);
        assert!(b.take(6).is_ok());
        assert_eq!(b.take(5), Err((6, 10)));
        assert_eq!(b.refused(), 1);
        assert!(b.take(4).is_ok());
        b.give(7);
        assert_eq!(b.in_use(), 3);
        b.give(100);
        assert_eq!(b.in_use(), 0, "giving back more than taken saturates");
        b.set_limit(Some(2));
        assert!(b.take(3).is_err());
        b.set_limit(None);
        assert!(b.take(10).is_ok());
        let msg = b.refusal(1, (10, 10), "units");
        assert!(
            msg.contains("max_test") && msg.contains("10 in use"),
            "{msg}"
        );
    }

    #[test]
    fn descriptors_keep_a_reserve_for_the_vm() {
        let limit = descriptor_limit();
        assert!(DESCRIPTORS.limit() <= limit.saturating_sub(DESCRIPTOR_RESERVE));
        assert!(below_reserve(u64::MAX) <= limit.saturating_sub(DESCRIPTOR_RESERVE));
    }

    #[test]
    fn dirty_slots_are_given_back_when_dropped() {
        let a = dirty_slot();
        let limit = DIRTY.limit();
        let rest: Vec<_> = (1..limit).filter_map(|_| dirty_slot()).collect();
        assert!(a.is_some());
        assert!(dirty_slot().is_none(), "all {limit} slots are taken");
        drop(a);
        assert!(dirty_slot().is_some());
        drop(rest);
    }

    #[test]
    fn refusals_are_reported_once() {
        let r = Refused::default();
        assert_eq!(r.take().count(), 0);
        r.note(&DESCRIPTORS);
        r.note(&MEMORY);
        let names: Vec<_> = r.take().map(|b| b.name).collect();
        assert_eq!(names, ["memory", "descriptors"]);
        assert_eq!(r.take().count(), 0);
    }
}
