//! One guest call as a future, polled in time slices by the calling Erlang
//! process. The guest runs on a wasmtime fiber (its own stack, sized by
//! `engine::ASYNC_STACK_SIZE`), never on the scheduler's stack; at every epoch
//! tick it yields, the NIF returns, and the Elixir side polls again. So a
//! short call costs one NIF call, and a long one never holds a scheduler for
//! more than about one tick.

use crate::error::{HostTrap, TrapInfo, TrapKind, classify};
use crate::imports::Bridge;
use crate::instance::{Host, Live, Shared};
use crate::limits::Limits;
use rustler::{Encoder, LocalPid, OwnedEnv};
use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;
use wasmtime::Store;
use wasmtime::component::{Func, Val};

rustler::atoms! {
    capsid_wake,
}

/// What a finished call leaves: the live instance (unless it trapped, in
/// which case wasmtime will not enter it again), the outcome, fuel used.
pub struct Done {
    pub live: Option<Live>,
    pub outcome: Result<Option<Val>, Box<TrapInfo>>,
    pub fuel_used: u64,
    /// Whether this call had to instantiate the component first.
    pub instantiated: bool,
}

pub type CallFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Sets fuel and deadline (both start at 0 in a new store) before guest code runs.
fn arm(store: &mut Store<Host>, limits: &Limits, start: Instant) {
    let data = store.data_mut();
    data.deadline = limits.deadline(start);
    data.timeout_ms = limits.timeout;
    data.limiter.call_max_memory = limits.max_memory;
    // Fuel can only fail to set when fuel is disabled in the engine; it is not.
    let _ = store.set_fuel(limits.fuel);
    store.set_epoch_deadline(1);
}

fn fuel_used(store: &Store<Host>, budget: u64) -> u64 {
    budget.saturating_sub(store.get_fuel().unwrap_or(0))
}

fn trap_from(err: &wasmtime::Error, store: Option<&Store<Host>>) -> Box<TrapInfo> {
    let stderr = store.map(|s| s.data().stderr.take()).unwrap_or_default();
    Box::new(classify(err, stderr))
}

/// Builds the future for one call of export `export` (`None`: only make sure
/// the instance exists). A missing live instance is created first, inside
/// the same time-sliced future, so instantiation is sliced and limited too.
pub fn start(
    bridge: Arc<Bridge>,
    live: Option<Live>,
    export: Option<(usize, wasmtime::component::ComponentExportIndex)>,
    args: Vec<Val>,
    n_results: usize,
    limits: Limits,
    shared: Shared,
) -> CallFuture {
    Box::pin(async move {
        let start = Instant::now();
        let instantiated = live.is_none();
        let mut live = match live {
            Some(live) => live,
            None => {
                let mut store = Host::new_store(limits, &shared);
                arm(&mut store, &limits, start);
                match bridge.pre.instantiate_async(&mut store).await {
                    Ok(instance) => Live::new(store, instance),
                    Err(e) => {
                        let fuel_used = fuel_used(&store, limits.fuel);
                        return Done {
                            live: None,
                            outcome: Err(trap_from(&e, Some(&store))),
                            fuel_used,
                            instantiated,
                        };
                    }
                }
            }
        };
        let Some((slot, index)) = export else {
            return Done {
                live: Some(live),
                outcome: Ok(None),
                fuel_used: 0,
                instantiated,
            };
        };
        arm(&mut live.store, &limits, start);
        let func: Func = match live.func(slot, &index) {
            Some(f) => f,
            None => {
                let e = wasmtime::Error::msg("export vanished from the instance");
                return Done {
                    live: None,
                    outcome: Err(trap_from(&e, Some(&live.store))),
                    fuel_used: 0,
                    instantiated,
                };
            }
        };
        let mut results = vec![Val::Bool(false); n_results];
        let result = func.call_async(&mut live.store, &args, &mut results).await;
        let fuel_used = fuel_used(&live.store, limits.fuel);
        match result {
            Ok(()) => {
                // Output of a successful call is not kept: it would grow
                // without bound and nobody asked for it.
                live.store.data().stdout.take();
                live.store.data().stderr.take();
                Done {
                    live: Some(live),
                    outcome: Ok(results.into_iter().next()),
                    fuel_used,
                    instantiated,
                }
            }
            Err(e) => {
                live.store.data().stdout.take();
                Done {
                    outcome: Err(trap_from(&e, Some(&live.store))),
                    live: None,
                    fuel_used,
                    instantiated,
                }
            }
        }
    })
}

thread_local! {
    /// True while this thread is inside `poll_slice`: a wake-up there is
    /// noticed through the flag, and sending a message would be wrong
    /// (`send_and_clear` panics on scheduler threads).
    static IN_POLL: Cell<bool> = const { Cell::new(false) };
}

/// Wakes a call parked on something outside the guest (a WASI timer): sets a
/// flag, and from a non-scheduler thread also messages the calling process.
pub struct CallWaker {
    woken: AtomicBool,
    pid: LocalPid,
    id: u64,
}

impl CallWaker {
    pub fn new(pid: LocalPid, id: u64) -> Arc<Self> {
        Arc::new(CallWaker {
            woken: AtomicBool::new(false),
            pid,
            id,
        })
    }

    pub fn take_woken(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }
}

impl Wake for CallWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !IN_POLL.with(Cell::get) && !rustler::thread::is_scheduler_thread() {
            let mut env = OwnedEnv::new();
            let id = self.id;
            let _ = env.send_and_clear(&self.pid, |env| (capsid_wake(), id).encode(env));
        }
    }
}

struct PollGuard;

impl Drop for PollGuard {
    fn drop(&mut self) {
        IN_POLL.with(|f| f.set(false));
    }
}

/// Polls the call once. A panic inside is caught and reported as a trap
/// (the future, and with it the store, is then dropped by the caller).
pub fn poll_slice(fut: &mut CallFuture, waker: &Arc<CallWaker>) -> Poll<Done> {
    let w = Waker::from(waker.clone());
    let mut cx = Context::from_waker(&w);
    IN_POLL.with(|f| f.set(true));
    let _guard = PollGuard;
    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // WASI timers are tokio timers: give them a runtime to register with.
        wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| fut.as_mut().poll(&mut cx))
    }));
    match polled {
        Ok(p) => p,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let err = wasmtime::Error::new(HostTrap {
                kind: TrapKind::Other,
                message: format!("host panicked while running the guest: {what}"),
            });
            Poll::Ready(Done {
                live: None,
                outcome: Err(Box::new(classify(&err, Vec::new()))),
                fuel_used: 0,
                instantiated: false,
            })
        }
    }
}
