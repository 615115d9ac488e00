//! One guest call as a future, polled in time slices by the calling Erlang
//! process. The guest runs on a wasmtime fiber (its own stack, sized by
//! `engine::ASYNC_STACK_SIZE`), never on the scheduler's stack; at every epoch
//! tick it yields, the NIF returns, and the Elixir side polls again. So a
//! short call costs one NIF call, and a long one never holds a scheduler for
//! more than about one tick.

use crate::component::{Blob, Fast};
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
use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, ComponentNamedList, Func, Lift, Lower, Val};

rustler::atoms! {
    capsid_wake,
}

/// A call's arguments: dynamic values, or the one binary argument of a
/// function on the typed path (`component::Fast`).
pub enum Args {
    Vals(Vec<Val>),
    Bytes(Vec<u8>),
    Str(String),
}

/// A call's result, in the same two shapes.
pub enum Value {
    Val(Option<Val>),
    Bytes(Vec<u8>),
    Str(String),
}

/// The export a call runs.
pub struct Target {
    /// Index into the component's export table.
    pub slot: usize,
    pub index: ComponentExportIndex,
    pub n_results: usize,
    pub fast: Option<Fast>,
}

/// What a finished call leaves: the live instance (unless it trapped, in
/// which case wasmtime will not enter it again), the outcome, fuel used.
pub struct Done {
    pub live: Option<Live>,
    pub outcome: Result<Value, Box<TrapInfo>>,
    pub fuel_used: u64,
    /// Whether this call had to instantiate the component first.
    pub instantiated: bool,
}

pub type CallFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Sets fuel and deadline (both start at 0 in a new store) before guest code runs.
fn arm(store: &mut Store<Host>, limits: &Limits, start_us: u64) {
    let data = store.data_mut();
    data.deadline_us = limits.deadline_us(start_us);
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

async fn typed<P, R>(func: Func, store: &mut Store<Host>, params: P) -> wasmtime::Result<R>
where
    P: ComponentNamedList + Lower + Send + Sync + 'static,
    R: ComponentNamedList + Lift + Send + Sync + 'static,
{
    func.typed::<P, R>(&*store)?
        .call_async(&mut *store, params)
        .await
}

/// Runs `func` with `args`, on the typed path when the signature allows.
async fn invoke(
    func: Func,
    store: &mut Store<Host>,
    args: Args,
    target: &Target,
) -> wasmtime::Result<Value> {
    let result = target.fast.and_then(|f| f.result);
    match args {
        Args::Vals(vals) => {
            let mut results = vec![Val::Bool(false); target.n_results];
            func.call_async(&mut *store, &vals, &mut results).await?;
            Ok(Value::Val(results.into_iter().next()))
        }
        Args::Bytes(b) => match result {
            None => typed::<(Vec<u8>,), ()>(func, store, (b,))
                .await
                .map(|()| Value::Val(None)),
            Some(Blob::Bytes) => typed::<(Vec<u8>,), (Vec<u8>,)>(func, store, (b,))
                .await
                .map(|(r,)| Value::Bytes(r)),
            Some(Blob::Str) => typed::<(Vec<u8>,), (String,)>(func, store, (b,))
                .await
                .map(|(r,)| Value::Str(r)),
        },
        Args::Str(s) => match result {
            None => typed::<(String,), ()>(func, store, (s,))
                .await
                .map(|()| Value::Val(None)),
            Some(Blob::Bytes) => typed::<(String,), (Vec<u8>,)>(func, store, (s,))
                .await
                .map(|(r,)| Value::Bytes(r)),
            Some(Blob::Str) => typed::<(String,), (String,)>(func, store, (s,))
                .await
                .map(|(r,)| Value::Str(r)),
        },
    }
}

/// Builds the future for one call of `target` (`None`: only make sure the
/// instance exists). A missing live instance is created first, inside the
/// same time-sliced future, so instantiation is sliced and limited too.
pub fn start(
    bridge: Arc<Bridge>,
    live: Option<Live>,
    target: Option<Target>,
    args: Args,
    limits: Limits,
    shared: Arc<Shared>,
) -> CallFuture {
    Box::pin(async move {
        let start = crate::engine::now_us();
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
        let Some(target) = target else {
            return Done {
                live: Some(live),
                outcome: Ok(Value::Val(None)),
                fuel_used: 0,
                instantiated,
            };
        };
        arm(&mut live.store, &limits, start);
        let func: Func = match live.func(target.slot, &target.index) {
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
        let result = invoke(func, &mut live.store, args, &target).await;
        let fuel_used = fuel_used(&live.store, limits.fuel);
        match result {
            Ok(value) => {
                // Output of a successful call is not kept: it would grow
                // without bound and nobody asked for it.
                live.store.data().stdout.take();
                live.store.data().stderr.take();
                Done {
                    live: Some(live),
                    outcome: Ok(value),
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
