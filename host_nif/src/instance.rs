//! A live instance: one wasm store at a time, its limits, who is calling it
//! (one caller at a time, the others queued in arrival order), recycling
//! after traps, and counters. The calls themselves run in the *caller's*
//! process (see `call.rs`); the owning `Capsid.Instance` process only keeps
//! the resource alive and supervised.

use crate::call::{self, Args, CallFuture, CallWaker, Done, Target, Value, poll_slice};
use crate::component::Blob;
use crate::component::ComponentResource;
use crate::convert::{Path, term_to_val, val_to_term, wit_name};
use crate::engine::engine;
use crate::error::{Error, TrapInfo, TrapKind};
use crate::imports::{Bridge, ImportChannel, link};
use crate::limits::{Limiter, Limits};
use crate::stdio::Capture;
use rustler::types::tuple::make_tuple;
use rustler::{Encoder, Env, LocalPid, Monitor, Resource, ResourceArc, Term, TermType};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use wasmtime::component::{ComponentExportIndex, Func, Instance, ResourceTable, Val};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

rustler::atoms! {
    ok,
    error,
    trap,
    import,
    r#yield = "yield",
    wait,
    queued,
    taken,
    retired,
    capsid_turn,
    waiting,
    calls,
    traps,
    recycles,
    fuel_used,
    instantiations,
    limits,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is caught and turned into a
    // trap; the data is still consistent, so poisoning is not fatal.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Store data: WASI state, limits, output capture, and the call's deadline.
pub struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: Limiter,
    pub stdout: Capture,
    pub stderr: Capture,
    pub imports: Arc<ImportChannel>,
    /// When the running call must stop, on the coarse clock (`engine::now_us`).
    pub deadline_us: u64,
    pub timeout_ms: u64,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// What every store of one instance shares, so the NIF can reach it while
/// the store itself is inside a suspended call.
#[derive(Clone, Default)]
pub struct Shared {
    pub imports: Arc<ImportChannel>,
    pub stdout: Capture,
    pub stderr: Capture,
}

impl Host {
    pub fn new_store(limits: Limits, shared: &Shared) -> Store<Host> {
        // Deny by default: no args, no env, no preopened dirs, no network;
        // stdin closed, stdout/stderr captured.
        let wasi = WasiCtx::builder()
            .stdout(shared.stdout.clone())
            .stderr(shared.stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let host = Host {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter::new(limits),
            stdout: shared.stdout.clone(),
            stderr: shared.stderr.clone(),
            imports: shared.imports.clone(),
            deadline_us: 0,
            timeout_ms: limits.timeout,
        };
        let mut store = Store::new(engine(), host);
        store.limiter(|h| &mut h.limiter);
        // Only fails when fuel is disabled in the engine; it is not.
        let _ = store.fuel_async_yield_interval(Some(crate::engine::YIELD_FUEL));
        store.epoch_deadline_callback(|ctx| {
            let host = ctx.data();
            if crate::engine::now_us() >= host.deadline_us {
                return Err(wasmtime::Error::new(crate::error::HostTrap {
                    kind: TrapKind::Timeout,
                    message: format!("the call exceeded its timeout of {} ms", host.timeout_ms),
                }));
            }
            // Give the scheduler back at every tick; the caller polls again.
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }
}

/// An instantiated component in its store, with export handles cached.
pub struct Live {
    pub store: Store<Host>,
    instance: Instance,
    funcs: Vec<Option<Func>>,
}

impl Live {
    pub fn new(store: Store<Host>, instance: Instance) -> Self {
        Live {
            store,
            instance,
            funcs: Vec::new(),
        }
    }

    pub fn func(&mut self, slot: usize, index: &ComponentExportIndex) -> Option<Func> {
        if self.funcs.len() <= slot {
            self.funcs.resize(slot + 1, None);
        }
        if self.funcs[slot].is_none() {
            self.funcs[slot] = self.instance.get_func(&mut self.store, index);
        }
        self.funcs[slot]
    }
}

struct Running {
    fut: CallFuture,
    waker: Arc<CallWaker>,
    /// The export being called (for the result type), `None` when warming up.
    export: Option<usize>,
    /// The import Elixir is running right now, if any.
    import: Option<usize>,
}

enum Slot {
    /// No store: never instantiated, or recycled after a trap.
    Empty,
    Ready(Live),
    Running(Box<Running>),
}

struct Owner {
    pid: LocalPid,
    /// False between being granted the turn and starting the call.
    started: bool,
    monitor: Option<Monitor>,
}

struct Waiter {
    pid: LocalPid,
    monitor: Option<Monitor>,
}

#[derive(Default)]
struct Control {
    owner: Option<Owner>,
    queue: VecDeque<Waiter>,
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    traps: [AtomicU64; TrapKind::ALL.len()],
    recycles: AtomicU64,
    fuel_used: AtomicU64,
    instantiations: AtomicU64,
}

pub struct InstanceResource {
    id: u64,
    component: ResourceArc<ComponentResource>,
    bridge: Arc<Bridge>,
    limits: Limits,
    max_queue: usize,
    shared: Arc<Shared>,
    slot: Mutex<Slot>,
    control: Mutex<Control>,
    stats: Stats,
    /// Set by a hot swap: calls already running (and their imports) finish
    /// here, every call that starts afterwards is turned away.
    retired: std::sync::atomic::AtomicBool,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[cfg_attr(not(test), rustler::resource_impl)]
impl Resource for InstanceResource {
    const IMPLEMENTS_DOWN: bool = true;

    /// A caller died while owning or waiting for the instance: drop its
    /// call (the store goes with it) and pass the turn on.
    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        let mut ctl = lock(&self.control);
        if ctl.owner.as_ref().is_some_and(|o| o.pid == pid) {
            ctl.owner = None;
            let mut slot = lock(&self.slot);
            if matches!(*slot, Slot::Running(_)) {
                *slot = Slot::Empty;
                self.shared.imports.reset();
                self.stats.recycles.fetch_add(1, Ordering::Relaxed);
                self.stats.traps[TrapKind::Cancelled.index()].fetch_add(1, Ordering::Relaxed);
            }
            drop(slot);
            self.grant_next(env, &mut ctl);
        } else {
            ctl.queue.retain(|w| w.pid != pid);
        }
    }
}

enum Turn {
    Go,
    Queued,
    /// Busy, and the caller asked not to wait.
    Taken,
    /// Replaced by a newer version: new calls must go there.
    Retired,
}

impl InstanceResource {
    /// Hands the instance to the first live waiter, telling it so.
    fn grant_next(&self, env: Env, ctl: &mut Control) {
        while let Some(next) = ctl.queue.pop_front() {
            if env.send(&next.pid, (capsid_turn(), self.id)).is_ok() {
                ctl.owner = Some(Owner {
                    pid: next.pid,
                    started: false,
                    monitor: next.monitor,
                });
                return;
            }
        }
    }

    fn acquire(
        this: &ResourceArc<Self>,
        env: Env,
        pid: LocalPid,
        queue: bool,
    ) -> Result<Turn, Error> {
        let mut ctl = lock(&this.control);
        if this.retired.load(Ordering::Acquire) {
            // Pass a granted turn on, so the waiters behind learn it too.
            Self::leave(this, env, &mut ctl, pid);
            return Ok(Turn::Retired);
        }
        let idle = ctl.queue.is_empty();
        match ctl.owner.as_mut() {
            None if idle => {
                ctl.owner = Some(Owner {
                    pid,
                    started: true,
                    monitor: None,
                });
                Ok(Turn::Go)
            }
            Some(o) if o.pid == pid && !o.started => {
                o.started = true;
                Ok(Turn::Go)
            }
            Some(o) if o.pid == pid => Err(Error::Busy(
                "this process is already inside a call to this instance (a re-entrant call would deadlock)".into(),
            )),
            _ => {
                if ctl.queue.iter().any(|w| w.pid == pid) {
                    return Ok(Turn::Queued);
                }
                if !queue {
                    return Ok(Turn::Taken);
                }
                if ctl.queue.len() >= this.max_queue {
                    return Err(Error::Busy(format!(
                        "the instance is busy: {} callers are already waiting (max_queue: {})",
                        ctl.queue.len(),
                        this.max_queue
                    )));
                }
                let monitor = this.monitor(Some(env), &pid);
                ctl.queue.push_back(Waiter { pid, monitor });
                Ok(Turn::Queued)
            }
        }
    }

    /// Ends the caller's turn and passes it on.
    fn release(this: &ResourceArc<Self>, env: Env) {
        let mut ctl = lock(&this.control);
        if let Some(owner) = ctl.owner.take()
            && let Some(mon) = owner.monitor
        {
            this.demonitor(Some(env), &mon);
        }
        this.grant_next(env, &mut ctl);
    }

    /// Takes `pid` out of the line: out of the queue, or, if its turn was
    /// granted but not used, passes the turn on. Its monitors go with it.
    fn leave(this: &ResourceArc<Self>, env: Env, ctl: &mut Control, pid: LocalPid) {
        ctl.queue.retain(|w| {
            if w.pid != pid {
                return true;
            }
            if let Some(mon) = &w.monitor {
                this.demonitor(Some(env), mon);
            }
            false
        });
        if ctl
            .owner
            .as_ref()
            .is_some_and(|o| o.pid == pid && !o.started)
        {
            if let Some(mon) = ctl.owner.take().and_then(|o| o.monitor) {
                this.demonitor(Some(env), &mon);
            }
            this.grant_next(env, ctl);
        }
    }

    /// The owner is about to leave a call suspended between NIF calls: make
    /// sure its death would be noticed.
    fn watch_owner(this: &ResourceArc<Self>, env: Env) {
        let mut ctl = lock(&this.control);
        if let Some(owner) = ctl.owner.as_mut()
            && owner.monitor.is_none()
        {
            owner.monitor = this.monitor(Some(env), &owner.pid);
        }
    }

    fn is_owner(&self, pid: LocalPid) -> bool {
        lock(&self.control)
            .owner
            .as_ref()
            .is_some_and(|o| o.pid == pid && o.started)
    }

    fn record(&self, done: &Done, is_call: bool) {
        if done.instantiated {
            self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        }
        if is_call {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .fuel_used
            .fetch_add(done.fuel_used, Ordering::Relaxed);
        if let Err(t) = &done.outcome {
            self.stats.traps[t.kind.index()].fetch_add(1, Ordering::Relaxed);
            self.stats.recycles.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn encode_trap<'a>(env: Env<'a>, t: &TrapInfo, fuel: u64) -> Term<'a> {
    let stderr = String::from_utf8_lossy(&t.stderr).into_owned();
    let info = (t.kind.atom(), t.message.as_str(), &t.backtrace, stderr);
    (trap(), info, fuel).encode(env)
}

/// Polls the running call once and reports where it stands.
fn drive<'a>(
    env: Env<'a>,
    this: &ResourceArc<InstanceResource>,
    slot: &mut MutexGuard<Slot>,
) -> Term<'a> {
    let Slot::Running(running) = &mut **slot else {
        return Error::Internal("no call in progress".into()).encode(env);
    };
    let t0 = crate::engine::now_us();
    let polled = poll_slice(&mut running.fut, &running.waker);
    // Tell the BEAM how much of a timeslice the guest used (1 ms = 100%),
    // at tick granularity: a slice that saw a tick used a whole one.
    let pct = (crate::engine::now_us().saturating_sub(t0) / 10).clamp(1, 100) as i32;
    rustler::schedule::consume_timeslice(env, pct);
    match polled {
        Poll::Ready(done) => {
            let export = running.export;
            this.record(&done, export.is_some());
            **slot = match done.live {
                Some(live) => Slot::Ready(live),
                None => Slot::Empty,
            };
            InstanceResource::release(this, env);
            match done.outcome {
                Ok(value) => {
                    let term = match (value, export) {
                        (Value::Val(Some(v)), Some(i)) => match &this.component.exports[i].result {
                            Some(ty) => val_to_term(env, &v, ty),
                            None => rustler::types::atom::nil().encode(env),
                        },
                        (Value::Bytes(b), _) => {
                            let mut bin = rustler::NewBinary::new(env, b.len());
                            bin.as_mut_slice().copy_from_slice(&b);
                            bin.into()
                        }
                        (Value::Str(s), _) => s.as_str().encode(env),
                        _ => rustler::types::atom::nil().encode(env),
                    };
                    (ok(), term, done.fuel_used).encode(env)
                }
                Err(t) => encode_trap(env, &t, done.fuel_used),
            }
        }
        Poll::Pending => {
            if let Some(call) = this.shared.imports.take_request() {
                running.import = Some(call.import);
                let bound = &this.bridge.bound[call.import];
                let args: Vec<Term> = call
                    .args
                    .iter()
                    .zip(bound.ty.params())
                    .map(|(v, (_, t))| val_to_term(env, v, &t))
                    .collect();
                InstanceResource::watch_owner(this, env);
                return (import(), bound.key.as_str(), args).encode(env);
            }
            InstanceResource::watch_owner(this, env);
            if running.waker.take_woken() {
                r#yield().encode(env)
            } else {
                wait().encode(env)
            }
        }
    }
}

/// Creates an instance resource: links the component's imports (WASI plus
/// the Elixir functions named in `provided`) and pre-instantiates it.
#[cfg_attr(not(test), rustler::nif)]
fn instance_new<'a>(
    env: Env<'a>,
    component: ResourceArc<ComponentResource>,
    provided: Vec<String>,
    limits: Limits,
    max_queue: usize,
) -> Term<'a> {
    match link(&component, &provided) {
        Ok(bridge) => {
            let res = InstanceResource {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                component,
                bridge: Arc::new(bridge),
                limits,
                max_queue,
                shared: Arc::default(),
                slot: Mutex::new(Slot::Empty),
                control: Mutex::new(Control::default()),
                stats: Stats::default(),
                retired: Default::default(),
            };
            let id = res.id;
            (ok(), (ResourceArc::new(res), id)).encode(env)
        }
        Err(e) => e.encode(env),
    }
}

fn convert_args(this: &InstanceResource, index: usize, args: Term) -> Result<Args, Error> {
    let export = &this.component.exports[index];
    let signature = || {
        let ps: Vec<String> = export
            .info
            .ty
            .params()
            .map(|(n, t)| format!("{n}: {}", wit_name(&t)))
            .collect();
        format!("{}({})", export.info.name, ps.join(", "))
    };
    let mut items = match args.get_type() {
        TermType::List => args
            .into_list_iterator()
            .map_err(|_| Error::BadArgument("bad list".into()))?,
        _ => {
            return Err(Error::BadArgument(format!(
                "arguments must be a list; {} takes {}",
                export.info.name,
                signature()
            )));
        }
    };
    let arity = args.list_length().unwrap_or(0);
    if arity != export.params.len() {
        return Err(Error::BadArgument(format!(
            "wrong number of arguments: {} takes {} ({}), got {arity}",
            export.info.name,
            export.params.len(),
            signature(),
        )));
    }
    if let Some(fast) = export.fast
        && let Some(first) = items.next()
    {
        return fast_arg(first, fast.arg, &export.params[0]);
    }
    let mut vals = Vec::with_capacity(arity);
    for (i, (term, ty)) in items.zip(export.params.iter()).enumerate() {
        vals.push(term_to_val(term, ty, &mut Path::arg(i))?);
    }
    Ok(Args::Vals(vals))
}

/// The one argument of a typed-path function, copied straight out of its
/// binary; other shapes (a list of bytes) go through the general conversion.
fn fast_arg(term: Term, blob: Blob, ty: &wasmtime::component::types::Type) -> Result<Args, Error> {
    if let Ok(bin) = rustler::Binary::from_term(term) {
        return match blob {
            Blob::Bytes => Ok(Args::Bytes(bin.as_slice().to_vec())),
            Blob::Str => match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => Ok(Args::Str(s.to_string())),
                // Let the general path produce the precise error.
                Err(_) => term_to_val(term, ty, &mut Path::arg(0)).map(|v| Args::Vals(vec![v])),
            },
        };
    }
    match term_to_val(term, ty, &mut Path::arg(0))? {
        Val::List(items) => Ok(Args::Bytes(
            items
                .into_iter()
                .map(|v| if let Val::U8(b) = v { b } else { 0 })
                .collect(),
        )),
        Val::String(s) => Ok(Args::Str(s)),
        other => Ok(Args::Vals(vec![other])),
    }
}

/// Starts a call (or, with `name` nil, makes sure the instance is
/// instantiated). Returns the outcome, or how to continue: `:yield` (poll
/// again), `:wait` (a `{:capsid_wake, id}` message will come),
/// `{:import, key, args}` (run the Elixir import, then `call_resume`), or
/// `:queued` (a `{:capsid_turn, id}` message will come; then call again).
/// With `queue` false a busy instance answers `:taken` instead of queueing
/// the caller (a pool then tries another member).
#[cfg_attr(not(test), rustler::nif)]
fn call_start<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    name: Option<rustler::Binary<'a>>,
    arguments: Term<'a>,
    limits: (Option<u64>, Option<u64>, Option<u64>),
    queue: bool,
) -> Term<'a> {
    // Resolve and convert first: a bad request never queues and never
    // touches the store.
    let (export, args) = match &name {
        Some(name) => {
            let Ok(name) = std::str::from_utf8(name.as_slice()) else {
                return Error::UnknownFunction("function names are UTF-8 strings".into())
                    .encode(env);
            };
            let index = match this.component.resolve(name) {
                Ok(i) => i,
                Err(e) => return e.encode(env),
            };
            match convert_args(&this, index, arguments) {
                Ok(args) => (Some(index), args),
                Err(e) => return e.encode(env),
            }
        }
        None => (None, Args::Vals(Vec::new())),
    };
    let pid = env.pid();
    match InstanceResource::acquire(&this, env, pid, queue) {
        Err(e) => return e.encode(env),
        Ok(Turn::Queued) => return queued().encode(env),
        Ok(Turn::Taken) => return taken().encode(env),
        Ok(Turn::Retired) => return retired().encode(env),
        Ok(Turn::Go) => {}
    }
    let (fuel, timeout, max_memory) = limits;
    let limits = this.limits.narrow(fuel, timeout, max_memory);
    let mut slot = lock(&this.slot);
    let live = match std::mem::replace(&mut *slot, Slot::Empty) {
        Slot::Ready(live) => Some(live),
        Slot::Empty => None,
        Slot::Running(r) => {
            // Cannot happen while ownership is respected; never lose a call.
            *slot = Slot::Running(r);
            drop(slot);
            InstanceResource::release(&this, env);
            return Error::Internal("instance already running a call".into()).encode(env);
        }
    };
    let target = export.map(|slot| {
        let e = &this.component.exports[slot];
        Target {
            slot,
            index: e.index,
            n_results: usize::from(e.result.is_some()),
            fast: e.fast,
        }
    });
    let shared = this.shared.clone();
    let fut = call::start(this.bridge.clone(), live, target, args, limits, shared);
    *slot = Slot::Running(Box::new(Running {
        fut,
        waker: CallWaker::new(pid, this.id),
        export,
        import: None,
    }));
    drive(env, &this, &mut slot)
}

/// Continues a call: `reply` is `nil` (just poll), or the Elixir import's
/// answer, `{:ok, value}` or `{:error, message}`.
#[cfg_attr(not(test), rustler::nif)]
fn call_resume<'a>(env: Env<'a>, this: ResourceArc<InstanceResource>, reply: Term<'a>) -> Term<'a> {
    if !this.is_owner(env.pid()) {
        return Error::Internal("this process has no call in progress on this instance".into())
            .encode(env);
    }
    let mut slot = lock(&this.slot);
    if let Slot::Running(running) = &mut *slot
        && let Some(index) = running.import.take()
    {
        let bound = &this.bridge.bound[index];
        let answer = match rustler::types::tuple::get_tuple(reply).ok().as_deref() {
            Some([tag, value]) if tag.atom_to_string().ok().as_deref() == Some("ok") => {
                match bound.ty.results().next() {
                    None => Ok(None),
                    Some(ty) => term_to_val(*value, &ty, &mut Path::root("result"))
                        .map(Some)
                        .map_err(|e| format!("import {:?} returned a bad value: {e}", bound.key)),
                }
            }
            Some([_, message]) => Err(message
                .decode::<String>()
                .unwrap_or_else(|_| format!("import {:?} failed", bound.key))),
            _ => Err(format!("import {:?} failed", bound.key)),
        };
        this.shared.imports.answer(answer);
    }
    drive(env, &this, &mut slot)
}

/// Abandons the caller's call (its deadline passed while it waited on an
/// import or a timer). The store is dropped; the next call gets a fresh one.
#[cfg_attr(not(test), rustler::nif)]
fn call_cancel<'a>(env: Env<'a>, this: ResourceArc<InstanceResource>, waited_ms: u64) -> Term<'a> {
    if !this.is_owner(env.pid()) {
        return Error::Internal("this process has no call in progress on this instance".into())
            .encode(env);
    }
    let mut slot = lock(&this.slot);
    let running = match std::mem::replace(&mut *slot, Slot::Empty) {
        Slot::Running(r) => r,
        other => {
            *slot = other;
            drop(slot);
            InstanceResource::release(&this, env);
            return ok().encode(env);
        }
    };
    drop(running);
    drop(slot);
    this.shared.imports.reset();
    this.shared.stdout.take();
    let info = TrapInfo {
        kind: TrapKind::Timeout,
        message: format!(
            "the call exceeded its timeout of {waited_ms} ms while waiting on the host"
        ),
        backtrace: Vec::new(),
        stderr: this.shared.stderr.take(),
    };
    this.stats.calls.fetch_add(1, Ordering::Relaxed);
    this.stats.traps[TrapKind::Timeout.index()].fetch_add(1, Ordering::Relaxed);
    this.stats.recycles.fetch_add(1, Ordering::Relaxed);
    InstanceResource::release(&this, env);
    encode_trap(env, &info, 0)
}

/// Retires the instance (a hot swap replaced it): new calls answer
/// `:retired`; the running call and its imports finish normally. Waiters are
/// woken so they can go to the new version.
#[cfg_attr(not(test), rustler::nif)]
fn instance_retire(env: Env, this: ResourceArc<InstanceResource>) -> rustler::Atom {
    this.retired.store(true, Ordering::Release);
    let mut ctl = lock(&this.control);
    // Everyone queued gets a turn message: on it they call again, see
    // `:retired`, and go to the new version.
    let waiters: Vec<Waiter> = ctl.queue.drain(..).collect();
    drop(ctl);
    for w in waiters {
        if let Some(mon) = w.monitor {
            this.demonitor(Some(env), &mon);
        }
        let _ = env.send(&w.pid, (capsid_turn(), this.id));
    }
    ok()
}

/// True when no call is running or waiting: a retired instance can stop.
#[cfg_attr(not(test), rustler::nif)]
fn instance_idle(this: ResourceArc<InstanceResource>) -> bool {
    let ctl = lock(&this.control);
    ctl.owner.is_none() && ctl.queue.is_empty()
}

/// Leaves the wait queue (the caller gave up waiting for its turn).
#[cfg_attr(not(test), rustler::nif)]
fn call_dequeue(env: Env, this: ResourceArc<InstanceResource>) -> rustler::Atom {
    let pid = env.pid();
    let mut ctl = lock(&this.control);
    InstanceResource::leave(&this, env, &mut ctl, pid);
    ok()
}

/// Counters: `%{calls, traps: %{kind => n}, recycles, fuel_used,
/// instantiations, waiting}` (`waiting`: callers queued right now).
#[cfg_attr(not(test), rustler::nif)]
fn instance_info(env: Env, this: ResourceArc<InstanceResource>) -> Term {
    let s = &this.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let trap_keys: Vec<Term> = TrapKind::ALL.iter().map(|k| k.atom().encode(env)).collect();
    let trap_vals: Vec<Term> = s.traps.iter().map(|a| get(a).encode(env)).collect();
    let traps_map = Term::map_from_term_arrays(env, &trap_keys, &trap_vals)
        .unwrap_or_else(|_| Term::map_new(env));
    let queued_now = lock(&this.control).queue.len();
    let keys = [
        calls(),
        traps(),
        recycles(),
        fuel_used(),
        instantiations(),
        waiting(),
    ]
    .map(|a| a.encode(env));
    let vals = [
        get(&s.calls).encode(env),
        traps_map,
        get(&s.recycles).encode(env),
        get(&s.fuel_used).encode(env),
        get(&s.instantiations).encode(env),
        queued_now.encode(env),
    ];
    Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| make_tuple(env, &[]))
}
