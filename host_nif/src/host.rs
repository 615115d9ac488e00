//! What a wasm store holds (`Host`), what an instance shares between its
//! store and the NIF side while a call is suspended (`Shared`), and how a
//! store is set up: limits, WASI, the epoch deadline, the call hook.
//!
//! This is the small shared module that the import bridge (`imports.rs`),
//! the call future (`run.rs`) and the instance (`instance.rs`) all build on,
//! so that none of them reaches into another.

use crate::error::lock;
use crate::error::{HostTrap, TrapKind};
use crate::limits::{Limiter, Limits};
use crate::stdio::Capture;
use crate::value::Value;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime::component::{ResourceAny, ResourceTable};
use wasmtime::{CallHook, CallHookHandler, Engine, Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// One pending call from the guest into Elixir.
pub struct ImportCall {
    /// Index into the link's bound imports.
    pub import: usize,
    pub args: Vec<Value>,
}

#[derive(Default)]
enum Exchange {
    #[default]
    Idle,
    /// The guest asked; the NIF has not yet handed the request to Elixir.
    Requested(ImportCall),
    /// Elixir is running the import.
    Running,
    /// Elixir answered: the result value, or why the import failed.
    Answered(Result<Option<Value>, String>),
}

/// Where a guest's import request meets Elixir's answer. One per instance.
#[derive(Default)]
pub struct ImportChannel(Mutex<Exchange>);

impl ImportChannel {
    /// The request the guest is parked on, if it has not been handed out yet.
    pub fn take_request(&self) -> Option<ImportCall> {
        let mut ex = lock(&self.0);
        match std::mem::take(&mut *ex) {
            Exchange::Requested(call) => {
                *ex = Exchange::Running;
                Some(call)
            }
            other => {
                *ex = other;
                None
            }
        }
    }

    pub fn answer(&self, answer: Result<Option<Value>, String>) {
        *lock(&self.0) = Exchange::Answered(answer);
    }

    pub fn reset(&self) {
        *lock(&self.0) = Exchange::Idle;
    }

    /// Posts a request and waits (parks the guest's fiber) for the answer;
    /// the NIF polls again once Elixir has answered.
    pub async fn ask(&self, call: ImportCall) -> Result<Option<Value>, String> {
        *lock(&self.0) = Exchange::Requested(call);
        poll_fn(|_| {
            let mut ex = lock(&self.0);
            match std::mem::take(&mut *ex) {
                Exchange::Answered(a) => Poll::Ready(a),
                other => {
                    *ex = other;
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// Per-instance state that both the store (inside a suspended call) and the
/// NIF side reach.
#[derive(Default)]
pub struct Shared {
    pub imports: ImportChannel,
    pub stdout: Capture,
    pub stderr: Capture,
    /// Set by the call hook: the guest is at a point where converting data
    /// of unbounded size comes next; the caller should poll from a dirty
    /// scheduler.
    pub wants_dirty: AtomicBool,
    /// The current poll runs on a dirty scheduler: no need to pause.
    pub on_dirty: AtomicBool,
    /// Counts the instance's stores: a resource handle names the store it
    /// came from, and is stale in any other.
    pub generation: AtomicU64,
    /// Guest resources whose handles were dropped in Elixir (explicitly or
    /// by garbage collection), with their store's generation. A collected
    /// handle's destructor runs on the instance's own time (`run::Drops`):
    /// never inside another caller's call.
    pub drops: Mutex<Vec<(u64, ResourceAny)>>,
    /// The instance's process was told that `drops` has work (one message
    /// until it takes the queue, however many handles are collected).
    pub drops_notified: AtomicBool,
    /// The WASI capabilities granted to the instance.
    pub wasi: crate::wasi::WasiConfig,
    /// OS descriptors the instance's stores hold (`descriptors`).
    pub descriptors_held: Arc<AtomicU64>,
    /// Node budgets the running call met (told to Elixir when it ends).
    pub refused: Arc<crate::budget::Refused>,
}

impl Shared {
    /// Drops whatever the guest wrote and nobody read (a cancelled call).
    pub fn drain_output(&self) -> Vec<u8> {
        self.stdout.take();
        self.stderr.take()
    }

    /// After a call: drops the output Elixir did not ask for.
    pub fn drop_unkept_output(&self) {
        if !self.wasi.keep_stdout {
            self.stdout.take();
        }
        if !self.wasi.keep_stderr {
            self.stderr.take();
        }
    }
}

/// Store data: WASI state (made on first use), limits, the call's deadline,
/// and what the call hook needs.
pub struct Host {
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    http: WasiHttpCtx,
    /// The instance's outbound `wasi:http` grant, asked before each request.
    http_hooks: crate::wasi::Hooks,
    /// OS descriptors held for the guest (`descriptors`).
    pub descriptors: crate::descriptors::Held,
    /// The state of the host resources (implemented in Elixir) the guest
    /// holds.
    pub host_resources: crate::host_resource::Table,
    pub limiter: Limiter,
    pub shared: Arc<Shared>,
    pub timeout_ms: u64,
    /// When the running call must stop; set at its first tick (so it is
    /// never earlier than `timeout_ms` after the call started).
    pub deadline: Option<Instant>,
    /// Guest frames entered from the host (the export, realloc, post-return).
    depth: u32,
    /// Pause before lifting the export's result (it may be large).
    pub pause_on_return: bool,
    /// Pause before every host call: an Elixir import may get large arguments.
    pub pause_on_host: bool,
    /// The store's engine meters fuel (`fuel_metering`, the default). Without
    /// it the store's fuel calls only build errors (and, with
    /// `RUST_BACKTRACE` set, capture a backtrace each: ~20 µs a call).
    pub fuel_metering: bool,
    /// When the guest was paused for a dirty scheduler: the wait (and the
    /// host's conversion after it) is not the guest's time, so the deadline
    /// moves by it at the next transition.
    paused_at: Option<Instant>,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let shared = &self.shared;
        let descriptors = &mut self.descriptors;
        // What the instance was granted (deny by default), stdout/stderr
        // captured.
        let ctx = self.wasi.get_or_insert_with(|| {
            shared.wasi.ctx(
                shared.stdout.clone(),
                shared.stderr.clone(),
                &descriptors.account,
                &mut descriptors.preopens,
            )
        });
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

impl crate::descriptors::Holder for Host {
    fn held(&mut self) -> &mut crate::descriptors::Held {
        &mut self.descriptors
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl Host {
    /// A store of `engine` (its component's) for `limits`; `transplant`
    /// gives the sizes its memories must start with when it is to take over
    /// an earlier store's memories.
    pub fn new_store(
        engine: &Engine,
        limits: Limits,
        shared: &Arc<Shared>,
        transplant: Option<Vec<usize>>,
    ) -> Store<Host> {
        let mut limiter = Limiter::new(limits);
        limiter.transplant = transplant;
        limiter.refused = shared.refused.clone();
        let account = crate::descriptors::Account::new(
            shared.descriptors_held.clone(),
            limits.max_descriptors,
            shared.refused.clone(),
        );
        let host = Host {
            wasi: None,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_hooks: crate::wasi::Hooks(shared.wasi.http.clone(), account.clone()),
            descriptors: crate::descriptors::Held::new(account),
            host_resources: crate::host_resource::Table::new(
                limits.max_handles,
                limits.max_host_bytes,
                shared.refused.clone(),
            ),
            limiter,
            shared: shared.clone(),
            timeout_ms: limits.timeout,
            deadline: None,
            depth: 0,
            pause_on_return: false,
            pause_on_host: false,
            paused_at: None,
            fuel_metering: crate::engine::meters_fuel(engine),
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limiter);
        if store.data().fuel_metering {
            // Only fails when fuel is disabled in the engine; it is not.
            let _ = store.fuel_async_yield_interval(Some(crate::engine::YIELD_FUEL));
        }
        store.set_max_component_handles(usize::try_from(limits.max_handles).unwrap_or(usize::MAX));
        // What a guest may hand the host in one transfer is bounded by its
        // memory; Capsid's own lifting also charges `abi`'s allowance.
        store.set_hostcall_fuel(
            usize::try_from(limits.max_memory)
                .unwrap_or(usize::MAX)
                .saturating_add(1 << 20),
        );
        store.epoch_deadline_callback(|mut ctx| {
            let host = ctx.data_mut();
            let now = Instant::now();
            let deadline = *host.deadline.get_or_insert_with(|| {
                now.checked_add(Duration::from_millis(host.timeout_ms))
                    .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400))
            });
            if now >= deadline {
                return Err(wasmtime::Error::new(HostTrap {
                    kind: TrapKind::Timeout,
                    message: format!("the call exceeded its timeout of {} ms", host.timeout_ms),
                }));
            }
            // Give the scheduler back at every tick; the caller polls again.
            Ok(UpdateDeadline::Yield(1))
        });
        store.call_hook_async(Hook);
        store
    }

    /// Prepares the store for a call.
    pub fn arm(
        store: &mut Store<Host>,
        limits: &Limits,
        pause_on_return: bool,
        pause_on_host: bool,
    ) {
        let data = store.data_mut();
        data.deadline = None;
        data.timeout_ms = limits.timeout;
        data.limiter.call_max_memory = limits.max_memory;
        data.depth = 0;
        data.pause_on_return = pause_on_return;
        data.pause_on_host = pause_on_host;
        data.paused_at = None;
        if data.fuel_metering {
            // Fuel can only fail to set when fuel is disabled in the engine; it is not.
            let _ = store.set_fuel(limits.fuel);
        }
        store.set_epoch_deadline(1);
    }
}

/// Pauses a guest (once) where data of unbounded size is about to be
/// converted, unless the poll already runs on a dirty scheduler.
struct Hook;

/// The hook's answer when nothing needs to wait. A zero-sized future: the
/// box wasmtime asks for allocates nothing, so a call pays no allocation per
/// transition (there are at least two per call).
struct Continue;

impl Future for Continue {
    type Output = wasmtime::Result<()>;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(()))
    }
}

/// Returns `Pending` once, then `Ready`: the fiber suspends, the NIF sees
/// `wants_dirty` and asks the caller to poll from a dirty scheduler.
struct PauseOnce(bool);

impl Future for PauseOnce {
    type Output = wasmtime::Result<()>;
    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

type HookFuture<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<()>> + Send + 'a>>;

// Written out rather than with `#[async_trait]`, whose boxed future would
// allocate at every transition.
impl CallHookHandler<Host> for Hook {
    fn handle_call_event<'a, 'b, 'c>(
        &'a self,
        mut store: StoreContextMut<'b, Host>,
        ch: CallHook,
    ) -> HookFuture<'c>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let host = store.data_mut();
        if let Some(at) = host.paused_at.take()
            && let Some(deadline) = host.deadline.as_mut()
            && let Some(later) = deadline.checked_add(at.elapsed())
        {
            *deadline = later;
        }
        let pause = match ch {
            CallHook::CallingWasm => {
                host.depth += 1;
                false
            }
            CallHook::ReturningFromWasm => {
                host.depth = host.depth.saturating_sub(1);
                // Back in the host at depth 0: the export (or a realloc before
                // it) returned, and its result is lifted next.
                host.depth == 0 && host.pause_on_return
            }
            CallHook::CallingHost => host.pause_on_host,
            CallHook::ReturningFromHost => false,
        };
        if pause && !host.shared.on_dirty.load(Ordering::Relaxed) {
            host.shared.wants_dirty.store(true, Ordering::Relaxed);
            host.paused_at = Some(Instant::now());
            Box::pin(PauseOnce(false))
        } else {
            Box::pin(Continue)
        }
    }
}
