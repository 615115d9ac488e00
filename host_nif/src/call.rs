//! The call entry points (`Capsid.Call`): find the target, resolve the
//! function, convert the arguments, take the turn, drive the call.
//!
//! Each entry point has a dirty-scheduler twin. A normal scheduler converts
//! at most `convert::WORK_BUDGET` of data and polls the guest for at most a
//! tick; whatever could take longer (huge arguments, a large result, large
//! import arguments or answers) makes the NIF answer `:dirty_start` or
//! `{:dirty, ref}`, and the caller repeats the step through the twin.

use crate::component::ComponentResource;
use crate::convert::{Conv, Path, Work, proper_list, term_to_value};
use crate::error::{Error, TrapKind};
use crate::instance::{InstanceResource, Turn};
use crate::registry::{self, Entry};
use crate::resource::HandleResource;
use crate::run::Drops;
use crate::shape::wit_name;
use crate::value::Value;
use rustler::types::tuple::make_tuple;
use rustler::{Atom, Binary, Encoder, Env, ResourceArc, Term};

rustler::atoms! {
    not_found,
    retired,
    dirty_start,
    dirty_busy,
    queued,
    taken,
    timeout,
    cancelled,
}

/// Per-call limits (`nil` keeps the instance's) and whether the call must
/// preserve the instance's state even if it traps.
type Narrow = (Option<u64>, Option<u64>, Option<u64>, bool);

fn work(dirty: bool) -> Work {
    if dirty {
        Work::unbounded()
    } else {
        Work::bounded()
    }
}

/// The export `function` names, and `args` converted for it.
fn prepare(
    component: &ComponentResource,
    function: Binary,
    args: Term,
    work: &mut Work,
) -> Result<(usize, Vec<Value>), Conv> {
    let Ok(name) = std::str::from_utf8(function.as_slice()) else {
        return Err(Conv::Bad(Error::UnknownFunction(
            "function names are UTF-8 strings".into(),
        )));
    };
    if function.as_slice() == crate::http::SERVE {
        return prepare_http(component, args, work);
    }
    let index = component.resolve(name)?;
    if Some(index) == component.http_handler {
        return Err(Conv::Bad(Error::BadArgument(format!(
            "{name} takes wasi:http resources, not values: serve the component with \
             Capsid.HTTP.handle/3"
        ))));
    }
    let export = &component.exports[index];
    let names = &component.names;
    let signature = || {
        let ps: Vec<String> = export
            .info
            .params
            .iter()
            .map(|(n, s)| format!("{n}: {}", wit_name(s, names)))
            .collect();
        format!("{}({})", export.info.name, ps.join(", "))
    };
    let Some(items) = proper_list(args, work)? else {
        return Err(Conv::Bad(Error::BadArgument(format!(
            "arguments must be a proper list; {} takes {}",
            export.info.name,
            signature()
        ))));
    };
    if items.len() != export.info.params.len() {
        return Err(Conv::Bad(Error::BadArgument(format!(
            "wrong number of arguments: {} takes {} ({}), got {}",
            export.info.name,
            export.info.params.len(),
            signature(),
            items.len()
        ))));
    }
    let mut values = Vec::with_capacity(items.len());
    for (i, (item, (_, shape))) in items.into_iter().zip(export.info.params.iter()).enumerate() {
        values.push(term_to_value(item, shape, names, &mut Path::arg(i), work)?);
    }
    Ok((index, values))
}

/// `Capsid.HTTP.handle/3`'s request and options, converted for the
/// component's `wasi:http/incoming-handler#handle` and checked.
fn prepare_http(
    component: &ComponentResource,
    args: Term,
    work: &mut Work,
) -> Result<(usize, Vec<Value>), Conv> {
    let Some(index) = component.http_handler else {
        return Err(Conv::Bad(Error::UnknownFunction(
            "the component does not export wasi:http/incoming-handler: it is not a \
             wasi:http/proxy component, and cannot serve HTTP requests"
                .into(),
        )));
    };
    let items = proper_list(args, work)?.unwrap_or_default();
    let shapes = crate::http::request_shapes();
    if items.len() != shapes.len() {
        return Err(Conv::Bad(Error::Internal("malformed HTTP request".into())));
    }
    let mut values = Vec::with_capacity(2);
    for (i, (item, shape)) in items.into_iter().zip(shapes.iter()).enumerate() {
        values.push(term_to_value(
            item,
            shape,
            &component.names,
            &mut Path::arg(i),
            work,
        )?);
    }
    crate::http::check(&values).map_err(Conv::Bad)?;
    Ok((index, values))
}

fn queued_status<'a>(env: Env<'a>, this: &ResourceArc<InstanceResource>) -> Term<'a> {
    make_tuple(
        env,
        &[
            queued().encode(env),
            this.clone().encode(env),
            this.id.encode(env),
            this.queue_timeout().encode(env),
        ],
    )
}

/// Takes the turn on `this` (queueing unless `queue` is false) and starts.
#[allow(clippy::too_many_arguments)]
fn go<'a>(
    env: Env<'a>,
    this: &ResourceArc<InstanceResource>,
    index: Option<usize>,
    drops: Drops,
    values: Vec<Value>,
    handles: &[(ResourceArc<HandleResource>, bool)],
    narrow: Narrow,
    queue: bool,
    dirty: bool,
) -> Result<Term<'a>, (Atom, Vec<Value>)> {
    match InstanceResource::acquire(this, env, queue) {
        Ok(Turn::Go) => {
            let limits = this.call_limits(narrow);
            Ok(InstanceResource::begin(
                this, env, index, drops, values, handles, limits, narrow.3, dirty,
            ))
        }
        Ok(Turn::Queued) => Ok(queued_status(env, this)),
        Ok(Turn::Taken) => Err((taken(), values)),
        Ok(Turn::Retired) => Err((retired(), values)),
        Err(e) => Ok(e.encode(env)),
    }
}

/// `go`, queueing, with a refused turn answered as its status.
#[allow(clippy::too_many_arguments)]
fn go_or_status<'a>(
    env: Env<'a>,
    this: &ResourceArc<InstanceResource>,
    index: Option<usize>,
    drops: Drops,
    values: Vec<Value>,
    handles: &[(ResourceArc<HandleResource>, bool)],
    narrow: Narrow,
    dirty: bool,
) -> Term<'a> {
    match go(
        env, this, index, drops, values, handles, narrow, true, dirty,
    ) {
        Ok(t) => t,
        Err((status, _)) => status.encode(env),
    }
}

fn start<'a>(
    env: Env<'a>,
    target: Term<'a>,
    function: Binary<'a>,
    args: Term<'a>,
    narrow: Narrow,
    dirty: bool,
) -> Term<'a> {
    let Some(entry) = registry::resolve(env, target) else {
        return not_found().encode(env);
    };
    if function.as_slice().starts_with(DROP) {
        return drop_start(env, entry, args, narrow, dirty);
    }
    // Handles in the arguments are recorded while converting them.
    crate::resource::take_used();
    // Borrowed, not cloned: a clone is an atomic increment and decrement
    // on the component's reference count, one cache line that every caller
    // of every instance of the component would write.
    let members;
    let component = match &entry {
        Entry::Instance(this) => &this.component,
        Entry::Pool(pool) => {
            members = pool.members();
            match members.first() {
                Some(m) => &m.component,
                None => return retired().encode(env),
            }
        }
    };
    if !component.fuel_metering && narrow.0.is_some_and(|fuel| fuel != u64::MAX) {
        return Error::BadArgument(
            "fuel: this component was loaded with fuel_metering: false, so it has no fuel \
             to limit; bound the call with :timeout"
                .into(),
        )
        .encode(env);
    }
    let prepared = prepare(component, function, args, &mut work(dirty));
    let handles = crate::resource::take_used();
    let (index, values) = match prepared {
        Ok(p) => p,
        Err(Conv::Over) => return dirty_start().encode(env),
        Err(Conv::Bad(e)) => return e.encode(env),
    };
    match entry {
        Entry::Instance(this) => {
            if this.is_retired() {
                return retired().encode(env);
            }
            go_or_status(
                env,
                &this,
                Some(index),
                Drops::None,
                values,
                &handles,
                narrow,
                dirty,
            )
        }
        Entry::Pool(pool) => {
            let members = pool.members();
            if pool.is_retired() || members.is_empty() {
                return retired().encode(env);
            }
            // A call with resource handles runs on the member that made
            // them (if it is still one).
            if let Some(id) = crate::resource::instance_of(&handles) {
                return match members.iter().find(|m| m.id == id) {
                    Some(member) => go_or_status(
                        env,
                        member,
                        Some(index),
                        Drops::None,
                        values,
                        &handles,
                        narrow,
                        dirty,
                    ),
                    None => Error::StaleResource(format!(
                        "the {} handle is stale: its instance is no longer a member of this pool \
                         or deployment (a hot swap replaced it, or it was restarted)",
                        handles[0].0.name
                    ))
                    .encode(env),
                };
            }
            // The member of this scheduler first: callers on different
            // schedulers never share one. Busy members are skipped; the
            // last one tried queues the caller.
            let n = members.len();
            let first = crate::engine::thread_slot() % n;
            let mut values = values;
            for k in 0..n {
                let member = &members[(first + k) % n];
                match go(
                    env,
                    member,
                    Some(index),
                    Drops::None,
                    values,
                    &[],
                    narrow,
                    k == n - 1,
                    dirty,
                ) {
                    Ok(t) => return t,
                    Err((_, v)) => values = v,
                }
            }
            retired().encode(env)
        }
    }
}

/// `"[resource-drop]R"`: the name a component gives to dropping an `R`.
const DROP: &[u8] = b"[resource-drop]";

/// The handle a `"[resource-drop]R"` call's `args` (`[handle]`) hold.
fn dropped_handle(args: Term) -> Option<ResourceArc<HandleResource>> {
    match args.decode::<Vec<Term>>().ok().as_deref() {
        Some([h]) => h
            .map_get(crate::resource::ref_atom())
            .ok()
            .and_then(|r| r.decode::<ResourceArc<HandleResource>>().ok()),
        _ => None,
    }
}

/// Drops the handle in `args` (`[handle]`), then runs its destructor at
/// once with a call that runs nothing else on the handle's instance (no
/// other handle's destructor either: those are not this caller's).
fn drop_start<'a>(
    env: Env<'a>,
    entry: Entry,
    args: Term<'a>,
    narrow: Narrow,
    dirty: bool,
) -> Term<'a> {
    let Some(handle) = dropped_handle(args) else {
        return Error::BadArgument(
            "[resource-drop] takes one argument, a Capsid.Resource handle".into(),
        )
        .encode(env);
    };
    let this = match entry {
        Entry::Instance(this) => Some(this),
        Entry::Pool(pool) => pool
            .members()
            .iter()
            .find(|m| m.id == handle.instance)
            .cloned(),
    };
    if let Err(e) = crate::resource::drop_handle(&handle) {
        return e.encode(env);
    }
    match this {
        Some(this) if this.id == handle.instance && !this.is_retired() => {
            let (generation, resource) = handle.queued();
            let drops = Drops::One(generation, resource);
            go_or_status(env, &this, None, drops, Vec::new(), &[], narrow, dirty)
        }
        // Its instance is gone, and the object with it.
        _ => (
            rustler::types::atom::ok(),
            rustler::types::atom::nil(),
            0u64,
        )
            .encode(env),
    }
}

/// Starts a call of `function` on `target` (a pid, a name, or a resource).
/// Answers the outcome or how to go on (see `Capsid.Call`).
#[cfg_attr(not(test), rustler::nif)]
fn call_start<'a>(
    env: Env<'a>,
    target: Term<'a>,
    function: Binary<'a>,
    arguments: Term<'a>,
    narrow: (Option<u64>, Option<u64>, Option<u64>, bool),
) -> Term<'a> {
    start(env, target, function, arguments, narrow, false)
}

#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn call_start_dirty<'a>(
    env: Env<'a>,
    target: Term<'a>,
    function: Binary<'a>,
    arguments: Term<'a>,
    narrow: (Option<u64>, Option<u64>, Option<u64>, bool),
) -> Term<'a> {
    let Some(_slot) = crate::budget::dirty_slot() else {
        return dirty_busy().encode(env);
    };
    start(env, target, function, arguments, narrow, true)
}

fn start_on<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    function: Binary<'a>,
    args: Term<'a>,
    narrow: Narrow,
    dirty: bool,
) -> Term<'a> {
    if function.as_slice().starts_with(DROP) {
        // The handle was dropped when the call first started; what is left
        // is running its destructor.
        let drops = match dropped_handle(args) {
            Some(h) => {
                let (generation, resource) = h.queued();
                Drops::One(generation, resource)
            }
            None => Drops::None,
        };
        return go_or_status(env, &this, None, drops, Vec::new(), &[], narrow, dirty);
    }
    crate::resource::take_used();
    let prepared = prepare(&this.component, function, args, &mut work(dirty));
    let handles = crate::resource::take_used();
    let (index, values) = match prepared {
        Ok(p) => p,
        Err(Conv::Over) => return dirty_start().encode(env),
        Err(Conv::Bad(e)) => {
            // The turn may have been granted to us: pass it on.
            InstanceResource::dequeue(&this, env);
            return e.encode(env);
        }
    };
    go_or_status(
        env,
        &this,
        Some(index),
        Drops::None,
        values,
        &handles,
        narrow,
        dirty,
    )
}

/// Starts the call on the instance whose turn the caller was granted.
#[cfg_attr(not(test), rustler::nif)]
fn call_start_on<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    function: Binary<'a>,
    arguments: Term<'a>,
    narrow: (Option<u64>, Option<u64>, Option<u64>, bool),
) -> Term<'a> {
    start_on(env, this, function, arguments, narrow, false)
}

#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn call_start_on_dirty<'a>(
    env: Env<'a>,
    this: ResourceArc<InstanceResource>,
    function: Binary<'a>,
    arguments: Term<'a>,
    narrow: (Option<u64>, Option<u64>, Option<u64>, bool),
) -> Term<'a> {
    let Some(_slot) = crate::budget::dirty_slot() else {
        return dirty_busy().encode(env);
    };
    start_on(env, this, function, arguments, narrow, true)
}

/// Continues a call (polls again).
#[cfg_attr(not(test), rustler::nif)]
fn call_resume(env: Env, this: ResourceArc<InstanceResource>) -> Term {
    InstanceResource::resume(&this, env, false)
}

#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn call_resume_dirty(env: Env, this: ResourceArc<InstanceResource>) -> Term {
    let Some(_slot) = crate::budget::dirty_slot() else {
        return dirty_busy().encode(env);
    };
    InstanceResource::resume(&this, env, true)
}

/// Abandons the caller's call: `:timeout` (its deadline passed while it
/// waited on the host) or `:cancelled` (the caller gave up).
#[cfg_attr(not(test), rustler::nif)]
fn call_cancel<'a>(env: Env<'a>, this: ResourceArc<InstanceResource>, kind: Atom) -> Term<'a> {
    let kind = if kind == timeout() {
        TrapKind::Timeout.atom()
    } else {
        cancelled()
    };
    InstanceResource::cancel(&this, env, kind)
}

/// Leaves the wait queue (the caller gave up waiting for its turn).
#[cfg_attr(not(test), rustler::nif)]
fn call_dequeue(env: Env, this: ResourceArc<InstanceResource>) -> Atom {
    InstanceResource::dequeue(&this, env);
    rustler::types::atom::ok()
}
