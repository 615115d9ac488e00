//! One guest call as a future, polled in time slices by the calling Erlang
//! process. The guest runs on a wasmtime fiber (its own stack, sized by
//! `engine::ASYNC_STACK_SIZE`), never on the scheduler's stack; at every epoch
//! tick it yields, the NIF returns, and the Elixir side polls again. So a
//! short call costs one NIF call, and a long one never holds a scheduler for
//! more than about one tick.

use crate::abi::{Lifted, Lowered};
use crate::error::{Failure, HostTrap, TrapInfo, TrapKind, classify, refusal};
use crate::host::{Host, Shared};
use crate::limits::Limits;
use crate::value::Value;
use rustler::{Encoder, LocalPid, OwnedEnv};
use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use wasmtime::component::{
    ComponentExportIndex, Func, Instance, InstancePre, ResourceAny, TypedFunc,
};
use wasmtime::{AsContextMut, Store};

rustler::atoms! {
    capsid_wake,
}

/// An instantiated component in its store, with export handles cached.
pub struct Live {
    pub store: Store<Host>,
    instance: Instance,
    funcs: Vec<Option<Func>>,
}

impl Live {
    /// Copies of the instance's linear memories (it must be idle).
    pub fn checkpoint(&self) -> Vec<Vec<u8>> {
        crate::arena::copy_out(&self.store.data().limiter.memories)
    }

    fn func(&mut self, slot: usize, index: &ComponentExportIndex) -> Option<Func> {
        if self.funcs.len() <= slot {
            self.funcs.resize(slot + 1, None);
        }
        if self.funcs[slot].is_none() {
            self.funcs[slot] = self.instance.get_func(&mut self.store, index);
        }
        self.funcs[slot]
    }
}

/// The export a call runs.
pub struct Target {
    /// Index into the component's export table.
    pub slot: usize,
    pub index: ComponentExportIndex,
    /// Core values the parameters flatten to (`abi::Lowered<N>`).
    pub flat_params: usize,
    pub has_result: bool,
    /// Pause before lifting the result: its size is not bounded by its type.
    pub heavy_result: bool,
    /// Its arguments or result can hold host resources.
    pub host: bool,
    /// It is `wasi:http/incoming-handler#handle`, serving a request.
    pub http: bool,
}

/// What a finished call leaves: the live instance (unless it trapped, in
/// which case wasmtime will not enter it again), the outcome, fuel used.
pub struct Done {
    pub live: Option<Live>,
    pub outcome: Result<Option<Value>, Failure>,
    pub fuel_used: u64,
    /// Whether this call had to instantiate the component first.
    pub instantiated: bool,
}

pub type CallFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The destructors of resources dropped in Elixir that a call runs before
/// its export (if any). An ordinary call runs none: another caller's
/// destructor would spend this caller's deadline and fuel, and a failing
/// one would hand it its trap and stderr.
#[derive(Clone, Copy)]
pub enum Drops {
    None,
    /// The one `Capsid.Resource.drop/1` dropped (its generation and
    /// resource), if it is still queued.
    One(u64, ResourceAny),
    /// Every queued one: the instance's own call for them
    /// (`instance_drain`).
    Queued,
}

fn fuel_used(store: &Store<Host>, budget: u64) -> u64 {
    // An engine without fuel metering (`fuel_metering: false`) counts none.
    if !store.data().fuel_metering {
        return 0;
    }
    store
        .get_fuel()
        .map_or(0, |left| budget.saturating_sub(left))
}

fn failure(err: &wasmtime::Error, store: &Store<Host>) -> Failure {
    if let Some(e) = refusal(err) {
        return Failure::Refused(e);
    }
    Failure::Trap(classify(err, store.data().shared.stderr.take()))
}

async fn typed<const N: usize, const M: usize>(
    func: Func,
    store: &mut Store<Host>,
    args: Vec<Value>,
) -> wasmtime::Result<Vec<Value>> {
    // SAFETY: `N` and `M` are the function's flat parameter and result
    // counts, computed from its type when the component was loaded
    // (`FuncInfo::flat_params`); `Lowered`/`Lifted` check them again against
    // the real type before touching any core value and bail on a mismatch.
    #[allow(unsafe_code)]
    let f = unsafe { TypedFunc::<Lowered<N>, Lifted<M>>::new_unchecked(func) };
    Ok(f.call_async(&mut *store, Lowered(args)).await?.0)
}

/// Calls `func` through the canonical ABI of `abi`, dispatching on its flat
/// parameter count (0..=16) and result count (0 or 1).
async fn invoke(
    func: Func,
    store: &mut Store<Host>,
    target: &Target,
    args: Vec<Value>,
) -> wasmtime::Result<Option<Value>> {
    macro_rules! arms {
        ($($n:literal)*) => {
            match (target.flat_params, target.has_result) {
                $(
                    ($n, false) => typed::<$n, 0>(func, store, args).await,
                    ($n, true) => typed::<$n, 1>(func, store, args).await,
                )*
                _ => Err(wasmtime::Error::msg("internal: unsupported function signature")),
            }
        };
    }
    let results = arms!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)?;
    Ok(results.into_iter().next())
}

/// `invoke` for a function whose values can hold host resources: their
/// terms get reps on the way in, and come back as terms on the way out;
/// borrows lent to the call end with it.
async fn invoke_with_host_resources(
    func: Func,
    store: &mut Store<Host>,
    target: &Target,
    mut args: Vec<Value>,
) -> wasmtime::Result<Option<Value>> {
    crate::host_resource::enter(&mut args, &mut store.data_mut().host_resources)?;
    let result = invoke(func, store, target, args).await;
    store.data_mut().host_resources.end_loans();
    let mut result = result?;
    if let Some(v) = result.as_mut() {
        crate::host_resource::leave(std::slice::from_mut(v), &mut store.as_context_mut())?;
    }
    Ok(result)
}

/// Builds the future for one call of `target` (`None`: only make sure the
/// instance exists). A missing live instance is created first from `pre`,
/// inside the same time-sliced future, so instantiation is sliced and
/// limited too.
#[allow(clippy::too_many_arguments)]
pub fn start(
    pre: Option<InstancePre<Host>>,
    live: Option<Live>,
    transplant: Option<Arc<Vec<Vec<u8>>>>,
    target: Option<Target>,
    drops: Drops,
    args: Vec<Value>,
    limits: Limits,
    shared: Arc<Shared>,
    pause_on_host: bool,
) -> CallFuture {
    // Two futures: the common one (the instance exists) stays small, as it
    // is allocated for every call; instantiation's larger state only when
    // needed.
    match live {
        Some(live) => Box::pin(call(
            live,
            target,
            drops,
            args,
            limits,
            shared,
            pause_on_host,
            false,
        )),
        None => Box::pin(async move {
            let Some(pre) = pre else {
                return Done {
                    live: None,
                    outcome: Err(Failure::Refused(crate::error::Error::Internal(
                        "no instance and nothing to instantiate".into(),
                    ))),
                    fuel_used: 0,
                    instantiated: true,
                };
            };
            match instantiate(pre, transplant, limits, &shared).await {
                Ok(live) => {
                    call(
                        live,
                        target,
                        drops,
                        args,
                        limits,
                        shared,
                        pause_on_host,
                        true,
                    )
                    .await
                }
                Err(done) => *done,
            }
        }),
    }
}

/// A new live instance, with the memories of the store it replaces when
/// `transplant` holds them (see `InstanceResource::begin`).
async fn instantiate(
    pre: InstancePre<Host>,
    transplant: Option<Arc<Vec<Vec<u8>>>>,
    limits: Limits,
    shared: &Arc<Shared>,
) -> Result<Live, Box<Done>> {
    let sizes = transplant
        .as_ref()
        .map(|t| t.iter().map(Vec::len).collect());
    let mut store = Host::new_store(pre.engine(), limits, shared, sizes);
    // Handles of the store this one replaces are stale from now on, and
    // their queued destructors went with it.
    shared.generation.fetch_add(1, Ordering::SeqCst);
    crate::error::lock(&shared.drops).clear();
    Host::arm(&mut store, &limits, false, false);
    match pre.instantiate_async(&mut store).await {
        Ok(instance) => {
            if let Some(data) = &transplant {
                let host = store.data_mut();
                host.limiter.transplant = None;
                if !crate::arena::copy_in(&host.limiter.memories, data) {
                    let e = wasmtime::Error::msg(
                        "the instance's state could not be restored: its memories changed",
                    );
                    return Err(Box::new(Done {
                        outcome: Err(failure(&e, &store)),
                        fuel_used: 0,
                        live: None,
                        instantiated: true,
                    }));
                }
            }
            Ok(Live {
                store,
                instance,
                funcs: Vec::new(),
            })
        }
        Err(e) => Err(Box::new(Done {
            outcome: Err(failure(&e, &store)),
            fuel_used: fuel_used(&store, limits.fuel),
            live: None,
            instantiated: true,
        })),
    }
}

/// Runs the destructors `drops` names of the resources dropped in Elixir
/// that belong to this store (those of a store since replaced are gone
/// with it).
async fn run_drops(live: &mut Live, shared: &Shared, drops: Drops) -> wasmtime::Result<()> {
    let pending = {
        let mut queue = crate::error::lock(&shared.drops);
        match drops {
            Drops::None => return Ok(()),
            Drops::One(g, r) => match queue.iter().position(|q| *q == (g, r)) {
                Some(i) => vec![queue.remove(i)],
                // The instance's own call for them ran it already.
                None => return Ok(()),
            },
            Drops::Queued => {
                // Cleared with the queue locked: a handle collected from
                // now on is told about again.
                shared.drops_notified.store(false, Ordering::SeqCst);
                std::mem::take(&mut *queue)
            }
        }
    };
    let generation = shared.generation.load(Ordering::SeqCst);
    for (g, resource) in pending {
        if g == generation {
            resource.resource_drop_async(&mut live.store).await?;
        }
    }
    Ok(())
}

/// Runs `target` on `live` (or just hands `live` back when there is none),
/// after the destructors `drops` names.
#[allow(clippy::too_many_arguments)]
async fn call(
    mut live: Live,
    target: Option<Target>,
    drops: Drops,
    args: Vec<Value>,
    limits: Limits,
    shared: Arc<Shared>,
    pause_on_host: bool,
    instantiated: bool,
) -> Done {
    Host::arm(
        &mut live.store,
        &limits,
        target.as_ref().is_some_and(|t| t.heavy_result),
        pause_on_host,
    );
    // Only the destructors this call is for, under its limits.
    if let Err(e) = run_drops(&mut live, &shared, drops).await {
        return Done {
            outcome: Err(failure(&e, &live.store)),
            fuel_used: fuel_used(&live.store, limits.fuel),
            live: None,
            instantiated,
        };
    }
    let Some(target) = target else {
        // What destructors wrote and nobody asked for goes now: left in the
        // buffers, it would be the next caller's (its trap's stderr).
        shared.drop_unkept_output();
        return Done {
            fuel_used: fuel_used(&live.store, limits.fuel),
            live: Some(live),
            outcome: Ok(None),
            instantiated,
        };
    };
    let Some(func) = live.func(target.slot, &target.index) else {
        let e = wasmtime::Error::msg("export vanished from the instance");
        return Done {
            outcome: Err(failure(&e, &live.store)),
            live: None,
            fuel_used: 0,
            instantiated,
        };
    };
    if target.http {
        return serve(live, func, args, limits, &shared, instantiated).await;
    }
    let result = if target.host {
        invoke_with_host_resources(func, &mut live.store, &target, args).await
    } else {
        invoke(func, &mut live.store, &target, args).await
    };
    let fuel_used = fuel_used(&live.store, limits.fuel);
    match result {
        Ok(value) => {
            // Output nobody asked for is not kept: it would grow without
            // bound. What Elixir asked for it takes in `finish`.
            shared.drop_unkept_output();
            Done {
                live: Some(live),
                outcome: Ok(value),
                fuel_used,
                instantiated,
            }
        }
        Err(e) => failed(&e, live, &shared, fuel_used, instantiated),
    }
}

/// A call that failed: its store goes, and the stdout it wrote with it
/// unless the instance keeps it (stderr travels with the trap).
fn failed(
    e: &wasmtime::Error,
    live: Live,
    shared: &Shared,
    fuel_used: u64,
    instantiated: bool,
) -> Done {
    if !shared.wasi.keep_stdout {
        shared.stdout.take();
    }
    Done {
        outcome: Err(failure(e, &live.store)),
        live: None,
        fuel_used,
        instantiated,
    }
}

/// Serves an HTTP request (`http::serve`). A fresh-instance request drops
/// its store once the guest has answered: it serves nothing else, and a
/// body the guest left open ends with it.
async fn serve(
    mut live: Live,
    func: Func,
    args: Vec<Value>,
    limits: Limits,
    shared: &Shared,
    instantiated: bool,
) -> Done {
    let answered = crate::http::serve(&mut live.store, func, args).await;
    let fuel_used = fuel_used(&live.store, limits.fuel);
    let answered = match answered {
        Ok(a) => a,
        Err(e) => return failed(&e, live, shared, fuel_used, instantiated),
    };
    shared.drop_unkept_output();
    let live = if answered.fresh {
        drop(live);
        None
    } else {
        Some(live)
    };
    let outcome = match answered.response().await {
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(Failure::Trap(classify(&e, Vec::new()))),
    };
    let live = if outcome.is_ok() { live } else { None };
    Done {
        live,
        outcome,
        fuel_used,
        instantiated,
    }
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

thread_local! {
    /// Set on a thread's first poll: that thread stays inside wasmtime-wasi's
    /// tokio runtime for good (its guard is never dropped).
    static IN_TOKIO: () = {
        let handle =
            wasmtime_wasi::runtime::with_ambient_tokio_runtime(tokio::runtime::Handle::current);
        std::mem::forget(handle.enter());
    };
}

/// WASI timers and streams are tokio's: a poll must run inside a tokio
/// runtime. Entering it per poll (`with_ambient_tokio_runtime`) clones the
/// runtime's handle, an `Arc` shared by every caller on every scheduler:
/// two callers bounced its count between their cores on each call (2
/// callers scaled 1.36-1.58x instead of 1.55-1.85x, and a call cost ~10 %
/// more; interleaved runs of a two-caller `add` throughput loop). Each
/// scheduler thread enters it once instead.
fn in_tokio() {
    IN_TOKIO.with(|_| ());
}

struct PollGuard;

impl Drop for PollGuard {
    fn drop(&mut self) {
        IN_POLL.with(|f| f.set(false));
    }
}

/// Polls the call once, allowing its lifts `allowance` units (see
/// `abi::set_lift_allowance`). A panic inside is caught and reported as a
/// trap (the future, and with it the store, is then dropped by the caller).
pub fn poll_slice(fut: &mut CallFuture, waker: &Arc<CallWaker>, allowance: u64) -> Poll<Done> {
    let w = Waker::from(waker.clone());
    let mut cx = Context::from_waker(&w);
    IN_POLL.with(|f| f.set(true));
    let _guard = PollGuard;
    let _busy = crate::engine::Busy::enter();
    crate::abi::set_lift_allowance(allowance);
    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        in_tokio();
        fut.as_mut().poll(&mut cx)
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
                outcome: Err(Failure::Trap(classify(&err, Vec::new()))),
                fuel_used: 0,
                instantiated: false,
            })
        }
    }
}

/// A trap for a call that never got to run the guest.
pub fn trap(kind: TrapKind, message: String, stderr: Vec<u8>) -> TrapInfo {
    TrapInfo {
        kind,
        message,
        backtrace: Vec::new(),
        stderr,
        status: None,
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use wasmtime::component::{Component, Linker};

    /// `cargo test --release -p capsid_nif run::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn trivial_call_path() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../priv/guests/bench.wasm"
        ))
        .unwrap();
        let engine = crate::engine::engine_of(crate::engine::Flavor::DEFAULT);
        let component = Component::new(engine, &bytes).unwrap();
        let mut linker: Linker<Host> = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        let pre = linker.instantiate_pre(&component).unwrap();
        let index = component.get_export_index(None, "add").unwrap();
        let limits = Limits {
            fuel: 1 << 40,
            timeout: 5000,
            max_memory: 64 << 20,
            max_table_elements: 10_000,
            max_instances: 64,
            max_tables: 32,
            max_memories: 8,
            max_handles: 10_000,
            max_descriptors: 256,
            max_host_bytes: 64 << 20,
        };
        let shared = Arc::new(Shared::default());
        let poll = |fut: &mut CallFuture| {
            let mut cx = Context::from_waker(Waker::noop());
            let _busy = crate::engine::Busy::enter();
            crate::abi::set_lift_allowance(1 << 20);
            // As `poll_slice` does: the thread enters tokio once.
            in_tokio();
            loop {
                if let Poll::Ready(d) = fut.as_mut().poll(&mut cx) {
                    return d;
                }
            }
        };
        let target = || Target {
            slot: 0,
            index,
            flat_params: 2,
            has_result: true,
            heavy_result: false,
            host: false,
            http: false,
        };
        let mut fut = start(
            Some(pre),
            None,
            None,
            None,
            Drops::None,
            vec![],
            limits,
            shared.clone(),
            false,
        );
        let done = poll(&mut fut);
        let mut live = done.live.unwrap();
        for round in 0..5 {
            let n: i32 = std::env::var("N")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            let t0 = std::time::Instant::now();
            for i in 0..n {
                let mut fut = start(
                    None,
                    Some(live),
                    None,
                    Some(target()),
                    Drops::None,
                    vec![Value::S32(i), Value::S32(1)],
                    limits,
                    shared.clone(),
                    false,
                );
                if i == 0 && round == 0 {
                    println!("future: {} bytes", std::mem::size_of_val(&*fut));
                }
                let done = poll(&mut fut);
                live = done.live.unwrap();
            }
            println!(
                "round {round}: {:.1} ns/call",
                t0.elapsed().as_nanos() as f64 / n as f64
            );
        }
    }
}
