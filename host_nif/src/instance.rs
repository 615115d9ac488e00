//! A live instance: one wasm store at a time, its limits, who is calling it
//! (one caller at a time, the others queued in arrival order), recycling
//! after traps, and counters. The calls themselves run in the *caller's*
//! process (`call.rs` resolves the target and converts; `run.rs` is the
//! guest call itself); the owning `Capsid.Instance` process only keeps the
//! resource alive and supervised.

use crate::component::{ComponentResource, Link};
use crate::convert::{Conv, Path, Work, binary, term_to_value, value_to_term};
use crate::error::lock;
use crate::error::{Error, Failure, MAX_MESSAGE, TrapInfo, TrapKind, bounded, bounded_output};
use crate::host::{ImportCall, Shared};
use crate::imports;
use crate::limits::Limits;
use crate::resource::HandleResource;
use crate::run::{self, CallFuture, CallWaker, Done, Drops, Live, Target, poll_slice};
use crate::value::Value;
use rustler::env::SavedTerm;
use rustler::types::tuple::{get_tuple, make_tuple};
use rustler::{
    Atom, Encoder, Env, LocalPid, Monitor, OwnedEnv, Resource, ResourceArc, Term, TermType,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

rustler::atoms! {
    ok,
    error,
    trap,
    import,
    inline_import,
    r#yield = "yield",
    wait,
    queued,
    taken,
    retired,
    go_dirty = "dirty",
    capsid_turn,
    waiting,
    calls,
    traps,
    recycles,
    fuel_used,
    instantiations,
    infinity,
    stale,
    budget_process = "Elixir.Capsid.Budget",
    dirty_busy,
    capsid_resource_limit,
}

enum Slot {
    /// No store: never instantiated, or recycled after a trap.
    Empty,
    Ready(Live),
    Running(Box<Running>),
}

struct Running {
    fut: CallFuture,
    waker: Arc<CallWaker>,
    /// The export being called (for the result type), `None` when warming up.
    export: Option<usize>,
    /// The import Elixir is running right now: its request (until the
    /// import's runner took the arguments) and its token.
    import: Option<Import>,
    /// A finished call whose result is too large to convert on a normal
    /// scheduler: converted by the next (dirty) resume.
    finished: Option<Done>,
    limits: Limits,
    /// When waits on Elixir (imports, timers) must end; set at the first
    /// wait, so never earlier than the timeout after the call started.
    deadline: Option<Instant>,
    /// The instance's memories as they were before this call, kept when the
    /// call must not lose the instance's state even if it traps.
    checkpoint: Option<Arc<Vec<Vec<u8>>>>,
    /// An import answered with more data than a normal scheduler converts:
    /// lowering it into the guest happens on a dirty one too.
    heavy_answer: bool,
}

impl Running {
    /// Milliseconds left for a wait, rounded up; `:infinity` past 2^32-1.
    fn remaining<'a>(&mut self, env: Env<'a>) -> Term<'a> {
        let timeout = self.limits.timeout;
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert_with(|| {
            now.checked_add(Duration::from_millis(timeout))
                .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400))
        });
        let left = deadline.saturating_duration_since(now);
        let ms = left.as_micros().div_ceil(1000);
        if ms >= u128::from(u32::MAX) {
            infinity().encode(env)
        } else {
            (ms as u64).encode(env)
        }
    }
}

/// An import handed to Elixir. Its runner process takes the arguments and
/// gives the answer itself (`import_take`, `import_answer`), so that large
/// data never travels through the calling process.
struct Import {
    call: ImportCall,
    /// Names this request: an answer with another token is stale.
    token: u64,
    taken: bool,
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
    /// The monitor of the last owner whose call needed one, kept after its
    /// turn: creating a monitor on the caller costs more than an import's
    /// whole round trip otherwise would (~1.4 µs of ~5), and the same
    /// process usually calls again.
    kept: Option<(LocalPid, Monitor)>,
    /// The process holding the instance between its calls (a hot swap's
    /// handoff, `hold`): its turn is not passed on when one of them ends.
    held: Option<LocalPid>,
}

impl Control {
    /// The kept monitor, if it is `pid`'s (it leaves `kept`).
    fn reuse(&mut self, pid: LocalPid) -> Option<Monitor> {
        self.kept.take_if(|(p, _)| *p == pid).map(|(_, mon)| mon)
    }
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    traps: [AtomicU64; TrapKind::ALL.len()],
    recycles: AtomicU64,
    fuel_used: AtomicU64,
    instantiations: AtomicU64,
}

/// The Elixir functions implementing the link's bound imports, in order.
struct Funs {
    env: OwnedEnv,
    funs: Vec<SavedTerm>,
    /// How Elixir routes the guest's output (`Capsid.WASI.deliver/1`).
    output: SavedTerm,
}

impl Funs {
    /// Import `i`'s function, copied into `env`.
    fn get<'a>(&self, i: usize, env: Env<'a>) -> Term<'a> {
        self.env.run(|own| self.funs[i].load(own).in_env(env))
    }

    fn output<'a>(&self, env: Env<'a>) -> Term<'a> {
        self.env.run(|own| self.output.load(own).in_env(env))
    }
}

pub struct InstanceResource {
    pub id: u64,
    /// The process registered as its owner (its `Capsid.Instance`):
    /// resource handles name it, so that calls with them find it.
    owner: Mutex<Option<LocalPid>>,
    pub component: ResourceArc<ComponentResource>,
    link: Arc<Link>,
    funs: Mutex<Funs>,
    /// Per bound import: run in the calling process itself (`inline: true`)
    /// rather than in its runner.
    inline: Vec<bool>,
    /// Per bound import: its function captures a large environment (see
    /// `Capsid.Imports`), so copying it into the caller, at every import,
    /// is done on a dirty scheduler.
    heavy: Vec<bool>,
    pub limits: Limits,
    max_queue: usize,
    queue_timeout: u64,
    pub shared: Arc<Shared>,
    slot: Mutex<Slot>,
    control: Mutex<Control>,
    stats: Stats,
    /// Set by a hot swap or when the owning process stops: calls already
    /// running (and their imports) finish here, every call that starts
    /// afterwards is turned away.
    retired: AtomicBool,
    /// Memories to put back into the next store (a preserving call trapped).
    transplant: Mutex<Option<Arc<Vec<Vec<u8>>>>>,
    /// Tokens for the imports handed to Elixir.
    tokens: AtomicU64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl InstanceResource {
    /// Where handles made by converting this instance's values belong.
    fn origin(&self) -> crate::resource::Origin {
        crate::resource::Origin {
            instance: self.id,
            owner: *lock(&self.owner),
            shared: self.shared.clone(),
        }
    }

    /// Records the process that owns it (see `registry_register`).
    pub fn set_owner(&self, pid: LocalPid) {
        *lock(&self.owner) = Some(pid);
    }
}

#[cfg_attr(not(test), rustler::resource_impl)]
impl Resource for InstanceResource {
    const IMPLEMENTS_DOWN: bool = true;

    /// A caller died while owning or waiting for the instance: drop its
    /// call (the store goes with it), drain what it wrote, pass the turn on.
    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        let mut ctl = lock(&self.control);
        // A kept monitor of `pid` (if that is what fired) is spent.
        ctl.reuse(pid);
        ctl.held.take_if(|h| *h == pid);
        if ctl.owner.as_ref().is_some_and(|o| o.pid == pid) {
            ctl.owner = None;
            let mut slot = lock(&self.slot);
            if matches!(*slot, Slot::Running(_)) {
                *slot = Slot::Empty;
                self.shared.imports.reset();
                self.shared.drain_output();
                self.stats.calls.fetch_add(1, Ordering::Relaxed);
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

/// Whether the caller may go ahead.
pub enum Turn {
    Go,
    Queued,
    /// Busy, and the caller asked not to wait.
    Taken,
    /// Replaced by a newer version, or stopped: new calls must go elsewhere.
    Retired,
}

impl InstanceResource {
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

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

    pub fn acquire(this: &ResourceArc<Self>, env: Env, queue: bool) -> Result<Turn, Error> {
        let pid = env.pid();
        let mut ctl = lock(&this.control);
        if this.is_retired() {
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
                let monitor = ctl.reuse(pid).or_else(|| this.monitor(Some(env), &pid));
                ctl.queue.push_back(Waiter { pid, monitor });
                Ok(Turn::Queued)
            }
        }
    }

    /// Ends the caller's turn and passes it on.
    fn release(this: &ResourceArc<Self>, env: Env) {
        let mut ctl = lock(&this.control);
        let held = ctl.held;
        if let Some(owner) = ctl.owner.as_mut()
            && Some(owner.pid) == held
        {
            // Still held: its next call needs no turn, nobody else gets one.
            owner.started = false;
            return;
        }
        if let Some(owner) = ctl.owner.take()
            && let Some(mon) = owner.monitor
            && let Some((_, old)) = ctl.kept.replace((owner.pid, mon))
            && old != mon
        {
            this.demonitor(Some(env), &old);
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
        let Some(pid) = ctl
            .owner
            .as_ref()
            .filter(|o| o.monitor.is_none())
            .map(|o| o.pid)
        else {
            return;
        };
        let monitor = ctl.reuse(pid).or_else(|| this.monitor(Some(env), &pid));
        if let Some(owner) = ctl.owner.as_mut() {
            owner.monitor = monitor;
        }
    }

    fn is_owner(&self, pid: LocalPid) -> bool {
        lock(&self.control)
            .owner
            .as_ref()
            .is_some_and(|o| o.pid == pid && o.started)
    }

    /// The error for a caller that would go on with a call it does not own.
    fn not_owner(env: Env) -> Term {
        Error::Internal("this process has no call in progress on this instance".into()).encode(env)
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
        if let Err(Failure::Trap(t)) = &done.outcome {
            self.stats.traps[t.kind.index()].fetch_add(1, Ordering::Relaxed);
            self.stats.recycles.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn allowance(limits: &Limits) -> u64 {
        (limits.max_memory / 8).max(1 << 16)
    }

    /// Starts a call of export `export` (`None`: only make sure the instance
    /// is instantiated) with converted `args`, once the turn is had, after
    /// the destructors `drops` names. With `preserve`, a trap does not lose
    /// the instance's state: its memories are copied first and put back
    /// into the next store.
    #[allow(clippy::too_many_arguments)]
    pub fn begin<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        export: Option<usize>,
        drops: Drops,
        args: Vec<Value>,
        handles: &[(ResourceArc<HandleResource>, bool)],
        limits: Limits,
        preserve: bool,
        dirty: bool,
    ) -> Term<'a> {
        let mut slot = lock(&this.slot);
        if !handles.is_empty() {
            // Checked here, with the turn and the slot held: the store they
            // name cannot change before the call runs.
            let has_store = matches!(*slot, Slot::Ready(_));
            if let Err(e) = crate::resource::check_used(handles, this.id, &this.shared, has_store) {
                drop(slot);
                Self::release(this, env);
                return e.encode(env);
            }
        }
        if matches!(drops, Drops::Queued) && !matches!(*slot, Slot::Ready(_)) {
            // No store: the objects were in the one that went (a trap
            // recycled it); instantiating one only to destroy nothing
            // would cost the next caller a fresh instance's state.
            let mut queue = lock(&this.shared.drops);
            this.shared.drops_notified.store(false, Ordering::SeqCst);
            queue.clear();
            drop(queue);
            drop(slot);
            Self::release(this, env);
            return (ok(), rustler::types::atom::nil(), 0u64).encode(env);
        }
        let live = match std::mem::replace(&mut *slot, Slot::Empty) {
            Slot::Ready(live) => Some(live),
            Slot::Empty => None,
            Slot::Running(r) => {
                // Cannot happen while ownership is respected; never lose a call.
                *slot = Slot::Running(r);
                drop(slot);
                Self::release(this, env);
                return Error::Internal("instance already running a call".into()).encode(env);
            }
        };
        let target = export.map(|slot| {
            let e = &this.component.exports[slot];
            Target {
                slot,
                index: e.index,
                flat_params: e.flat_params,
                has_result: e.info.result.is_some(),
                heavy_result: e.heavy_result,
                host: e.info.host,
                http: Some(slot) == this.component.http_handler,
            }
        });
        let checkpoint = match &live {
            Some(live) if preserve => Some(Arc::new(live.checkpoint())),
            _ => None,
        };
        let transplant = if live.is_none() {
            lock(&this.transplant).take()
        } else {
            None
        };
        let pre = live.is_none().then(|| this.link.pre.clone());
        let fut = run::start(
            pre,
            live,
            transplant,
            target,
            drops,
            args,
            limits,
            this.shared.clone(),
            this.link.heavy_imports,
        );
        *slot = Slot::Running(Box::new(Running {
            fut,
            waker: CallWaker::new(env.pid(), this.id),
            export,
            import: None,
            finished: None,
            limits,
            deadline: None,
            checkpoint,
            heavy_answer: false,
        }));
        Self::drive(this, env, &mut slot, dirty)
    }

    /// Polls the running call once and reports where it stands.
    fn drive<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        slot: &mut MutexGuard<Slot>,
        dirty: bool,
    ) -> Term<'a> {
        let Slot::Running(running) = &mut **slot else {
            return Error::Internal("no call in progress".into()).encode(env);
        };
        if let Some(done) = running.finished.take() {
            return Self::finish(this, env, slot, done, dirty);
        }
        if std::mem::take(&mut running.heavy_answer) && !dirty {
            running.heavy_answer = true;
            return (go_dirty(), this.clone().encode(env)).encode(env);
        }
        let shared = &this.shared;
        shared.on_dirty.store(dirty, Ordering::Relaxed);
        shared.wants_dirty.store(false, Ordering::Relaxed);
        let polled = poll_slice(
            &mut running.fut,
            &running.waker,
            Self::allowance(&running.limits),
        );
        match polled {
            Poll::Ready(done) => {
                if !dirty && running.waker.take_woken() {
                    // It ran up to a tick before finishing: account for it.
                    rustler::schedule::consume_timeslice(env, 50);
                }
                Self::finish(this, env, slot, done, dirty)
            }
            Poll::Pending => {
                Self::watch_owner(this, env);
                let me = this.clone().encode(env);
                if shared.wants_dirty.swap(false, Ordering::Relaxed) {
                    return (go_dirty(), me).encode(env);
                }
                if let Some(call) = shared.imports.take_request() {
                    let token = this.tokens.fetch_add(1, Ordering::Relaxed);
                    let inline = this.inline.get(call.import).copied().unwrap_or(false);
                    let mut request = Import {
                        call,
                        token,
                        taken: false,
                    };
                    // An inline import gets its function and arguments at
                    // once (one NIF call fewer), unless they are too large
                    // for this scheduler or cannot be converted: then
                    // `import_take` reports it as for a runner.
                    let taken = if inline {
                        Self::take_args(this, env, &mut request, dirty).ok()
                    } else {
                        None
                    };
                    running.import = Some(request);
                    let remaining = running.remaining(env);
                    let how = if inline { inline_import() } else { import() };
                    let mut status = vec![how.encode(env), me, token.encode(env), remaining];
                    if let Some((fun, args)) = taken {
                        status.extend([fun, args.encode(env)]);
                    }
                    return make_tuple(env, &status);
                }
                if running.waker.take_woken() {
                    if !dirty {
                        rustler::schedule::consume_timeslice(env, 50);
                    }
                    (r#yield(), me).encode(env)
                } else {
                    let remaining = running.remaining(env);
                    make_tuple(
                        env,
                        &[wait().encode(env), me, this.id.encode(env), remaining],
                    )
                }
            }
        }
    }

    /// Reports a finished call, converting its result (on a dirty
    /// scheduler when it is too large for a normal one).
    fn finish<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        slot: &mut MutexGuard<Slot>,
        done: Done,
        dirty: bool,
    ) -> Term<'a> {
        let export = match &**slot {
            Slot::Running(r) => r.export,
            _ => None,
        };
        let term = match (&done.outcome, export) {
            (Ok(Some(value)), Some(i)) => {
                let shape = if Some(i) == this.component.http_handler {
                    Some(crate::http::response_shape())
                } else {
                    this.component.exports[i].info.result.as_ref()
                };
                let Some(shape) = shape else {
                    return Error::Internal("a result for a function without one".into())
                        .encode(env);
                };
                let mut work = if dirty {
                    Work::unbounded()
                } else {
                    Work::bounded()
                };
                let (converted, made) = crate::resource::with_origin(this.origin(), || {
                    value_to_term(env, value, shape, &this.component.names, &mut work)
                });
                if matches!(converted, Err(Conv::Over)) {
                    crate::resource::forget(&made);
                }
                match converted {
                    Ok(t) => Ok(t),
                    Err(Conv::Over) => {
                        if let Slot::Running(r) = &mut **slot {
                            r.finished = Some(done);
                        }
                        Self::watch_owner(this, env);
                        return (go_dirty(), this.clone().encode(env)).encode(env);
                    }
                    Err(Conv::Bad(e)) => Err(e),
                }
            }
            _ => Ok(rustler::types::atom::nil().encode(env)),
        };
        this.record(&done, export.is_some());
        if let (Err(Failure::Trap(_)), Slot::Running(r)) = (&done.outcome, &mut **slot)
            && let Some(checkpoint) = r.checkpoint.take()
        {
            *lock(&this.transplant) = Some(checkpoint);
        }
        let fuel = done.fuel_used;
        **slot = match done.live {
            Some(live) if !this.is_retired() => Slot::Ready(live),
            _ => Slot::Empty,
        };
        Self::release(this, env);
        Self::report_refusals(this, env);
        let trap_stderr = match &done.outcome {
            Err(Failure::Trap(t)) => Some(t.stderr.as_slice()),
            _ => None,
        };
        let output = Self::output(this, env, trap_stderr);
        let (tag, value) = match (done.outcome, term) {
            (Ok(_), Ok(t)) => (ok(), t),
            (Err(Failure::Trap(t)), _) => (trap(), trap_info(env, &t)),
            (Ok(_), Err(e)) | (Err(Failure::Refused(e)), _) => return e.encode(env),
        };
        // With output for Elixir: `{:ok, v, fuel, output}` or `{:trap,
        // info, fuel, output}` (see `Capsid.Call`).
        let reply = [tag.encode(env), value, fuel.encode(env)];
        match output {
            Some(o) => make_tuple(env, &[reply[0], reply[1], reply[2], o]),
            None => make_tuple(env, &reply),
        }
    }

    /// Tells `Capsid.Budget` which node budgets (or the instance's own
    /// share of them) the call that just ended met: `{:capsid_resource_limit,
    /// budget, instance, caller, in_use, limit}`. Nothing is sent when none
    /// was (one relaxed load per call).
    fn report_refusals(this: &ResourceArc<Self>, env: Env) {
        for budget in this.shared.refused.take() {
            let Some(to) = env.whereis_pid(budget_process()) else {
                continue;
            };
            let instance = *lock(&this.owner);
            let message = [
                capsid_resource_limit().encode(env),
                budget.atom(env),
                instance.encode(env),
                env.pid().encode(env),
                budget.in_use().encode(env),
                budget.limit().encode(env),
            ];
            let _ = env.send(&to, make_tuple(env, &message));
        }
    }

    /// The output of the call that just ended that Elixir asked for, as
    /// `{spec, owner, stdout, stderr}`, if there is any.
    fn output<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        trap_stderr: Option<&[u8]>,
    ) -> Option<Term<'a>> {
        let wasi = &this.shared.wasi;
        if !wasi.keep_stdout && !wasi.keep_stderr {
            return None;
        }
        let stdout = if wasi.keep_stdout {
            this.shared.stdout.take()
        } else {
            Vec::new()
        };
        let stderr = match (wasi.keep_stderr, trap_stderr) {
            (false, _) => Vec::new(),
            (true, Some(e)) => e.to_vec(),
            (true, None) => this.shared.stderr.take(),
        };
        if stdout.is_empty() && stderr.is_empty() {
            return None;
        }
        let owner = *lock(&this.owner);
        Some(make_tuple(
            env,
            &[
                lock(&this.funs).output(env),
                owner.encode(env),
                binary(env, &stdout),
                binary(env, &stderr),
            ],
        ))
    }

    /// Continues the caller's call (poll again).
    pub fn resume<'a>(this: &ResourceArc<Self>, env: Env<'a>, dirty: bool) -> Term<'a> {
        if !this.is_owner(env.pid()) {
            return Self::not_owner(env);
        }
        let mut slot = lock(&this.slot);
        Self::drive(this, env, &mut slot, dirty)
    }

    /// The running import's function and arguments, converted in the
    /// calling process (the import's runner): `{:ok, {fun, args}}`,
    /// `:dirty` (too large for a normal scheduler), `{:error, message}`
    /// (arguments that cannot be converted), or `:stale` (no such import).
    pub fn import_take<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        token: u64,
        dirty: bool,
    ) -> Term<'a> {
        let mut slot = lock(&this.slot);
        let Slot::Running(running) = &mut *slot else {
            return stale().encode(env);
        };
        let Some(import) = running
            .import
            .as_mut()
            .filter(|i| i.token == token && !i.taken)
        else {
            return stale().encode(env);
        };
        match Self::take_args(this, env, import, dirty) {
            Ok((fun, args)) => (ok(), (fun, args)).encode(env),
            Err(None) => go_dirty().encode(env),
            Err(Some(message)) => (error(), message).encode(env),
        }
    }

    /// Converts a pending import's arguments into `env` and marks it taken:
    /// `(fun, args)`, or else leaves it untaken: `Err(None)` when they are
    /// too large for this scheduler, `Err(Some(message))` when they cannot
    /// be converted.
    fn take_args<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        import: &mut Import,
        dirty: bool,
    ) -> Result<(Term<'a>, Vec<Term<'a>>), Option<String>> {
        let index = import.call.import;
        if !dirty && this.heavy.get(index).copied().unwrap_or(false) {
            return Err(None);
        }
        let info = &this.component.imports[this.link.bound[index].import];
        let mut work = if dirty {
            Work::unbounded()
        } else {
            Work::bounded()
        };
        let mut args = Vec::with_capacity(import.call.args.len());
        let mut all_made = Vec::new();
        for (v, (_, shape)) in import.call.args.iter().zip(info.params.iter()) {
            let (converted, made) = crate::resource::with_origin(this.origin(), || {
                value_to_term(env, v, shape, &this.component.names, &mut work)
            });
            all_made.extend(made);
            match converted {
                Ok(t) => args.push(t),
                Err(Conv::Over) => {
                    crate::resource::forget(&all_made);
                    return Err(None);
                }
                Err(Conv::Bad(e)) => {
                    return Err(Some(format!(
                        "import {:?} got arguments Capsid cannot convert: {e}",
                        info.name
                    )));
                }
            }
        }
        import.taken = true;
        import.call.args = Vec::new();
        Ok((lock(&this.funs).get(index, env), args))
    }

    /// Gives the running import's answer (`{:ok, value}` or `{:error,
    /// message}`), converted in the calling process (the import's runner):
    /// `:ok`, `:dirty`, or `:stale` (the call ended meanwhile).
    pub fn import_answer<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        token: u64,
        reply: Term<'a>,
        dirty: bool,
    ) -> Term<'a> {
        Self::answer_in(this, env, &mut lock(&this.slot), token, reply, dirty)
    }

    /// `import_answer` with the slot already locked.
    fn answer_in<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        slot: &mut Slot,
        token: u64,
        reply: Term<'a>,
        dirty: bool,
    ) -> Term<'a> {
        let Slot::Running(running) = slot else {
            return stale().encode(env);
        };
        let Some(import) = running.import.as_ref().filter(|i| i.token == token) else {
            return stale().encode(env);
        };
        let info = &this.component.imports[this.link.bound[import.call.import].import];
        let answer = match get_tuple(reply).ok().as_deref() {
            Some([tag, value]) if tag.as_c_arg() == ok().as_c_arg() => match &info.result {
                None => Ok(None),
                Some(shape) => {
                    let mut work = if dirty {
                        Work::unbounded()
                    } else {
                        Work::bounded()
                    };
                    let names = &this.component.names;
                    match term_to_value(*value, shape, names, &mut Path::root("result"), &mut work)
                    {
                        Ok(v) => Ok(Some(v)),
                        Err(Conv::Over) => return go_dirty().encode(env),
                        Err(Conv::Bad(e)) => {
                            Err(format!("import {:?} returned a bad value: {e}", info.name))
                        }
                    }
                }
            },
            // Bounded before it is copied: an import may raise with megabytes.
            Some([_, message]) if message.get_type() == TermType::Binary => Err(message
                .decode::<rustler::Binary>()
                .map(|b| bounded(b.as_slice(), MAX_MESSAGE))
                .unwrap_or_else(|_| format!("import {:?} failed", info.name))),
            _ => Err(format!("import {:?} failed", info.name)),
        };
        running.import = None;
        running.heavy_answer = dirty;
        this.shared.imports.answer(answer);
        ok().encode(env)
    }

    /// Answers an inline import and goes on with the call, in one NIF call:
    /// the next status as `resume` gives it, `:dirty` (the answer is too
    /// large for a normal scheduler: nothing was done) or, when the import
    /// returned after the call's deadline, the call ends in `:timeout`.
    pub fn answer_resume<'a>(
        this: &ResourceArc<Self>,
        env: Env<'a>,
        token: u64,
        reply: Term<'a>,
        dirty: bool,
    ) -> Term<'a> {
        if !this.is_owner(env.pid()) {
            return Self::not_owner(env);
        }
        let mut slot = lock(&this.slot);
        let answered = Self::answer_in(this, env, &mut slot, token, reply, dirty);
        if answered.as_c_arg() == go_dirty().encode(env).as_c_arg() {
            return answered;
        }
        let late = match &*slot {
            Slot::Running(r) => r.deadline.is_some_and(|d| Instant::now() >= d),
            _ => false,
        };
        if late {
            drop(slot);
            Self::cancel(this, env, crate::error::TrapKind::Timeout.atom())
        } else {
            Self::drive(this, env, &mut slot, dirty)
        }
    }

    /// Abandons the caller's call: its deadline passed while it waited on
    /// the host (`:timeout`), or the caller gave up (`:cancelled`). The
    /// store is dropped; the next call gets a fresh one.
    pub fn cancel<'a>(this: &ResourceArc<Self>, env: Env<'a>, kind: Atom) -> Term<'a> {
        if !this.is_owner(env.pid()) {
            // Not (or no longer) in a call: just leave the line.
            let mut ctl = lock(&this.control);
            Self::leave(this, env, &mut ctl, env.pid());
            return ok().encode(env);
        }
        let mut slot = lock(&this.slot);
        let running = match std::mem::replace(&mut *slot, Slot::Empty) {
            Slot::Running(r) => r,
            other => {
                *slot = other;
                drop(slot);
                Self::release(this, env);
                return ok().encode(env);
            }
        };
        let timeout_ms = running.limits.timeout;
        drop(running);
        drop(slot);
        this.shared.imports.reset();
        this.shared.stdout.take();
        let stderr = this.shared.stderr.take();
        let info = if kind.as_c_arg() == crate::error::TrapKind::Timeout.atom().as_c_arg() {
            run::trap(
                TrapKind::Timeout,
                format!(
                    "the call exceeded its timeout of {timeout_ms} ms while waiting on the host"
                ),
                stderr,
            )
        } else {
            run::trap(
                TrapKind::Cancelled,
                "the caller abandoned the call".into(),
                stderr,
            )
        };
        this.stats.calls.fetch_add(1, Ordering::Relaxed);
        this.stats.traps[info.kind.index()].fetch_add(1, Ordering::Relaxed);
        this.stats.recycles.fetch_add(1, Ordering::Relaxed);
        Self::release(this, env);
        encode_trap(env, &info, 0)
    }

    /// Leaves the wait queue (the caller gave up waiting for its turn).
    pub fn dequeue(this: &ResourceArc<Self>, env: Env) {
        let mut ctl = lock(&this.control);
        Self::leave(this, env, &mut ctl, env.pid());
    }

    /// Retires the instance: new calls answer `:retired`; the running call
    /// and its imports finish normally. Waiters are woken so they can go
    /// elsewhere. `env` is the calling process's, or a resource callback's
    /// (`process: false`), where monitors cannot be removed: those of the
    /// woken waiters then stay until the waiters exit, and are harmless.
    pub fn retire(this: &ResourceArc<Self>, env: Env, process: bool) {
        this.retired.store(true, Ordering::Release);
        let waiters: Vec<Waiter> = lock(&this.control).queue.drain(..).collect();
        for w in waiters {
            if process && let Some(mon) = w.monitor {
                this.demonitor(Some(env), &mon);
            }
            let _ = env.send(&w.pid, (capsid_turn(), this.id));
        }
        // An idle store goes now, with its memory, descriptors and host
        // terms, not when the last process that called the instance happens
        // to collect its garbage (a running call's store goes when it ends).
        let idle = {
            let mut slot = lock(&this.slot);
            match &*slot {
                Slot::Ready(_) => std::mem::replace(&mut *slot, Slot::Empty),
                _ => Slot::Empty,
            }
        };
        drop(idle);
    }

    /// Holds the instance for the calling process: it becomes the owner once
    /// the calls running and queued before it are done (`Queued` until
    /// then: `{:capsid_turn, id}` says when to ask again), and stays the
    /// owner across its own calls until `unhold`. A hot swap holds the old
    /// members so that no call runs on them after their snapshot.
    pub fn hold(this: &ResourceArc<Self>, env: Env) -> Turn {
        let pid = env.pid();
        let mut ctl = lock(&this.control);
        if this.is_retired() {
            Self::leave(this, env, &mut ctl, pid);
            return Turn::Retired;
        }
        ctl.held = Some(pid);
        let idle = ctl.queue.is_empty();
        match ctl.owner.as_ref() {
            Some(o) if o.pid == pid => Turn::Go,
            None if idle => {
                let monitor = ctl.reuse(pid).or_else(|| this.monitor(Some(env), &pid));
                ctl.owner = Some(Owner {
                    pid,
                    started: false,
                    monitor,
                });
                Turn::Go
            }
            _ => {
                if !ctl.queue.iter().any(|w| w.pid == pid) {
                    let monitor = ctl.reuse(pid).or_else(|| this.monitor(Some(env), &pid));
                    ctl.queue.push_back(Waiter { pid, monitor });
                }
                Turn::Queued
            }
        }
    }

    /// Ends the calling process's hold (or its wait for one): the turn
    /// goes to the next caller.
    pub fn unhold(this: &ResourceArc<Self>, env: Env) {
        let pid = env.pid();
        let mut ctl = lock(&this.control);
        ctl.held.take_if(|h| *h == pid);
        Self::leave(this, env, &mut ctl, pid);
    }

    /// Gives `copy` (of the same component, never instantiated) the
    /// memories of this instance, which the calling process holds: its
    /// first call instantiates it with them (a hot swap's rehearsal).
    pub fn copy_state(this: &ResourceArc<Self>, env: Env, copy: &Self) -> Result<(), Error> {
        let pid = env.pid();
        if lock(&this.control)
            .owner
            .as_ref()
            .is_none_or(|o| o.pid != pid)
        {
            return Err(Error::Internal(
                "copying an instance's state needs its turn (hold it first)".into(),
            ));
        }
        if !std::ptr::eq(&*this.component, &*copy.component) {
            return Err(Error::Internal(
                "an instance's state can only be copied into one of the same component".into(),
            ));
        }
        let memories = match &*lock(&this.slot) {
            Slot::Ready(live) => Some(Arc::new(live.checkpoint())),
            Slot::Empty => lock(&this.transplant).clone(),
            Slot::Running(_) => {
                return Err(Error::Internal("the instance is running a call".into()));
            }
        };
        if !matches!(*lock(&copy.slot), Slot::Empty) {
            return Err(Error::Internal("the copy was instantiated already".into()));
        }
        *lock(&copy.transplant) = memories;
        Ok(())
    }

    /// The instance's limits narrowed by per-call options (`None` keeps the
    /// instance's value).
    pub fn call_limits(&self, narrow: (Option<u64>, Option<u64>, Option<u64>, bool)) -> Limits {
        self.limits.narrow(narrow.0, narrow.1, narrow.2)
    }

    pub fn queue_timeout(&self) -> u64 {
        self.queue_timeout
    }
}

pub fn encode_trap<'a>(env: Env<'a>, t: &TrapInfo, fuel: u64) -> Term<'a> {
    (trap(), trap_info(env, t), fuel).encode(env)
}

/// `{kind | {:exit, status}, message, backtrace, stderr}`.
/// Strings a guest (or an import) provides are bounded here, whatever made
/// the trap (see `error::bounded`).
fn trap_info<'a>(env: Env<'a>, t: &TrapInfo) -> Term<'a> {
    let stderr = bounded_output(&t.stderr, MAX_MESSAGE);
    let message = bounded(t.message.as_bytes(), MAX_MESSAGE);
    let backtrace: Vec<String> = t
        .backtrace
        .iter()
        .map(|frame| bounded(frame.as_bytes(), 256))
        .collect();
    let kind = match t.status {
        Some(status) => (t.kind.atom(), status).encode(env),
        None => t.kind.atom().encode(env),
    };
    (kind, message, backtrace, stderr).encode(env)
}

/// Creates an instance resource: links the component's imports (WASI plus
/// the Elixir functions given as `[{key, fun, inline, heavy}]`, sorted by
/// key)
/// through the component's link cache.
#[cfg_attr(not(test), rustler::nif)]
fn instance_new<'a>(
    env: Env<'a>,
    component: ResourceArc<ComponentResource>,
    provided: Vec<(String, Term<'a>, bool, bool)>,
    limits: Limits,
    queue: (usize, u64),
    wasi: crate::wasi::Grant<'a>,
) -> Term<'a> {
    let keys: Vec<String> = provided.iter().map(|(k, ..)| k.clone()).collect();
    let link = match imports::link(&component, &keys) {
        Ok(link) => link,
        Err(e) => return e.encode(env),
    };
    let owned = OwnedEnv::new();
    let output = owned.save(wasi.output.2);
    // A map, not a search per import: a component may import 100,000.
    let by_key: std::collections::HashMap<&str, (Term<'a>, bool, bool)> = provided
        .iter()
        .map(|(k, f, inline, heavy)| (k.as_str(), (*f, *inline, *heavy)))
        .collect();
    let mut funs = Vec::with_capacity(link.bound.len());
    let mut inline = Vec::with_capacity(link.bound.len());
    let mut heavy = Vec::with_capacity(link.bound.len());
    for b in &link.bound {
        let (fun, is_inline, is_heavy) = by_key
            .get(b.key.as_str())
            .copied()
            .unwrap_or_else(|| (rustler::types::atom::nil().encode(env), false, false));
        funs.push(owned.save(fun));
        inline.push(is_inline);
        heavy.push(is_heavy);
    }
    let res = InstanceResource {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        owner: Mutex::new(None),
        component,
        link,
        funs: Mutex::new(Funs {
            env: owned,
            funs,
            output,
        }),
        inline,
        heavy,
        limits,
        max_queue: queue.0,
        queue_timeout: queue.1,
        shared: Arc::new(Shared {
            wasi: wasi.into(),
            ..Shared::default()
        }),
        slot: Mutex::new(Slot::Empty),
        control: Mutex::new(Control::default()),
        stats: Stats::default(),
        retired: AtomicBool::new(false),
        transplant: Mutex::new(None),
        tokens: AtomicU64::new(1),
    };
    let id = res.id;
    (ok(), (ResourceArc::new(res), id)).encode(env)
}

/// Instantiates the component in the instance (the caller gets the turn
/// first), so that start-up errors surface before its process exists.
#[cfg_attr(not(test), rustler::nif)]
fn instance_warm<'a>(env: Env<'a>, this: ResourceArc<InstanceResource>) -> Term<'a> {
    match InstanceResource::acquire(&this, env, true) {
        Ok(Turn::Go) => InstanceResource::begin(
            &this,
            env,
            None,
            Drops::None,
            Vec::new(),
            &[],
            this.limits,
            false,
            false,
        ),
        other => turn_status(env, &this, other),
    }
}

/// What a caller that did not get the turn is told (see `Capsid.Call`).
fn turn_status<'a>(
    env: Env<'a>,
    this: &ResourceArc<InstanceResource>,
    turn: Result<Turn, Error>,
) -> Term<'a> {
    match turn {
        Ok(Turn::Go) => Error::Internal("the turn was had".into()).encode(env),
        Ok(Turn::Queued) => make_tuple(
            env,
            &[
                queued().encode(env),
                this.clone().encode(env),
                this.id.encode(env),
                this.queue_timeout.encode(env),
            ],
        ),
        Ok(Turn::Taken) => taken().encode(env),
        Ok(Turn::Retired) => retired().encode(env),
        Err(e) => e.encode(env),
    }
}

/// Runs the destructors of the instance's garbage-collected handles, as a
/// call of its own under the instance's limits: its process makes it when
/// told `{:capsid_drops, id}` (see `resource.rs`). Statuses as for a call;
/// called again once a queued turn is granted. A destructor that traps
/// recycles the instance, as any trap does.
#[cfg_attr(not(test), rustler::nif)]
fn instance_drain<'a>(env: Env<'a>, this: ResourceArc<InstanceResource>) -> Term<'a> {
    match InstanceResource::acquire(&this, env, true) {
        Ok(Turn::Go) => InstanceResource::begin(
            &this,
            env,
            None,
            Drops::Queued,
            Vec::new(),
            &[],
            this.limits,
            false,
            false,
        ),
        other => turn_status(env, &this, other),
    }
}

/// Retires the instance (a hot swap replaced it, or it stopped).
#[cfg_attr(not(test), rustler::nif)]
fn instance_retire(env: Env, this: ResourceArc<InstanceResource>) -> Atom {
    InstanceResource::retire(&this, env, true);
    ok()
}

/// Holds the instance for the caller (see `InstanceResource::hold`): `:ok`,
/// `{:queued, id}` (wait for `{:capsid_turn, id}`, then ask again) or
/// `:retired`.
#[cfg_attr(not(test), rustler::nif)]
fn instance_hold(env: Env, this: ResourceArc<InstanceResource>) -> Term {
    match InstanceResource::hold(&this, env) {
        Turn::Go => ok().encode(env),
        Turn::Queued => (queued(), this.id).encode(env),
        Turn::Taken | Turn::Retired => retired().encode(env),
    }
}

/// Ends the caller's hold on the instance.
#[cfg_attr(not(test), rustler::nif)]
fn instance_unhold(env: Env, this: ResourceArc<InstanceResource>) -> Atom {
    InstanceResource::unhold(&this, env);
    ok()
}

/// Gives `copy` the memories of `this`, which the caller holds.
#[cfg_attr(not(test), rustler::nif)]
fn instance_copy_state<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    copy: ResourceArc<InstanceResource>,
) -> Term<'a> {
    match InstanceResource::copy_state(&this, env, &copy) {
        Ok(()) => ok().encode(env),
        Err(e) => e.encode(env),
    }
}

/// True when no call is running or waiting: a retired instance can stop.
#[cfg_attr(not(test), rustler::nif)]
fn instance_idle(this: ResourceArc<InstanceResource>) -> bool {
    let ctl = lock(&this.control);
    ctl.owner.is_none() && ctl.queue.is_empty()
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

/// The running import's `{fun, args}` for its runner (see `import_take`).
#[cfg_attr(not(test), rustler::nif)]
fn import_take(env: Env, this: ResourceArc<InstanceResource>, token: u64) -> Term {
    InstanceResource::import_take(&this, env, token, false)
}

#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn import_take_dirty(env: Env, this: ResourceArc<InstanceResource>, token: u64) -> Term {
    let Some(_slot) = crate::budget::dirty_slot() else {
        return dirty_busy().encode(env);
    };
    InstanceResource::import_take(&this, env, token, true)
}

/// The running import's answer from its runner (see `import_answer`).
#[cfg_attr(not(test), rustler::nif)]
fn import_answer<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    token: u64,
    reply: Term<'a>,
) -> Term<'a> {
    InstanceResource::import_answer(&this, env, token, reply, false)
}

/// An inline import's answer from the caller, and the call goes on (see
/// `answer_resume`).
#[cfg_attr(not(test), rustler::nif)]
fn import_answer_resume<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    token: u64,
    reply: Term<'a>,
) -> Term<'a> {
    InstanceResource::answer_resume(&this, env, token, reply, false)
}

#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn import_answer_resume_dirty<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    token: u64,
    reply: Term<'a>,
) -> Term<'a> {
    let Some(_slot) = crate::budget::dirty_slot() else {
        return dirty_busy().encode(env);
    };
    InstanceResource::answer_resume(&this, env, token, reply, true)
}

#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn import_answer_dirty<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    token: u64,
    reply: Term<'a>,
) -> Term<'a> {
    let Some(_slot) = crate::budget::dirty_slot() else {
        return dirty_busy().encode(env);
    };
    InstanceResource::import_answer(&this, env, token, reply, true)
}
