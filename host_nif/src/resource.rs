//! Guest resources as Elixir handles (`Capsid.Resource`).
//!
//! An `own<R>` that a guest returns becomes a `HandleResource`: a rustler
//! resource naming the instance and the store (its generation) it lives in.
//! Its life in Elixir ends one of three ways: passed back as an `own`
//! argument (the guest takes it: `Consumed`), `Capsid.Resource.drop/1`, or
//! garbage collection. A rustler destructor cannot call into wasm, so the
//! last two queue the guest's resource in the instance's `Shared::drops`.
//! `drop/1`'s own call then runs that one destructor. A collected handle's
//! destructor is never run by whoever calls next (it would spend that
//! caller's deadline and fuel, and hand it the destructor's trap and
//! stderr): the instance's process is sent `{:capsid_drops, id}` and runs
//! the queue as a call of its own, under the instance's limits
//! (`Capsid.Instance`, `run::Drops::Queued`).
//!
//! A handle is only valid with the instance and store that made it: any
//! other use, and any use after it was consumed or dropped, is
//! `:stale_resource`. Handles are found in argument terms by their
//! reference only, so a forged map or another reference is refused.

use crate::error::{Error, lock};
use crate::host::Shared;
use rustler::{Encoder, Env, LocalPid, Resource, ResourceArc, Term};
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use wasmtime::component::ResourceAny;

rustler::atoms! {
    __struct__,
    capsid_drops,
    r#ref = "ref",
    name,
    instance,
    resource_struct = "Elixir.Capsid.Resource",
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Live,
    /// Passed to the guest as an `own` argument.
    Consumed,
    /// Dropped from Elixir; its destructor is queued or has run.
    Dropped,
}

pub struct HandleResource {
    /// `InstanceResource::id` of the instance that made it.
    pub instance: u64,
    /// The store it lives in (`Shared::generation` when it was made).
    pub generation: u64,
    pub name: Box<str>,
    resource: ResourceAny,
    state: Mutex<State>,
    shared: Arc<Shared>,
    /// The instance's process, told when a collected handle queued work.
    owner: Option<LocalPid>,
}

#[cfg_attr(not(test), rustler::resource_impl)]
impl Resource for HandleResource {
    const IMPLEMENTS_DESTRUCTOR: bool = true;

    /// Garbage-collected while the guest still owns the object: its
    /// destructor is queued, and the instance's process is told (once until
    /// it takes the queue), to run it on the instance's own time.
    fn destructor(self, env: Env<'_>) {
        if *lock(&self.state) != State::Live || !self.resource.owned() {
            return;
        }
        lock(&self.shared.drops).push((self.generation, self.resource));
        if let Some(owner) = self.owner
            && !self.shared.drops_notified.swap(true, Ordering::SeqCst)
            && env.send(&owner, (capsid_drops(), self.instance)).is_err()
        {
            // The instance is gone: its store, and the queue, go with it.
            self.shared.drops_notified.store(false, Ordering::SeqCst);
        }
    }
}

impl HandleResource {
    fn stale(&self, why: &str) -> Error {
        Error::StaleResource(format!(
            "the {} handle is stale: {why}; a handle is valid only with the instance that \
             made it, until it is dropped or passed as an own argument",
            self.name
        ))
    }

    /// Marks it dropped and queues its destructor; false if it was not live.
    fn drop_now(&self) -> bool {
        let mut state = lock(&self.state);
        if *state != State::Live {
            return false;
        }
        *state = State::Dropped;
        if self.resource.owned() {
            lock(&self.shared.drops).push((self.generation, self.resource));
        }
        true
    }

    /// What `drop/1`'s call runs: the store it lives in and the resource.
    pub fn queued(&self) -> (u64, ResourceAny) {
        (self.generation, self.resource)
    }
}

/// Where handles made by a result belong, and who owns that instance.
pub struct Origin {
    pub instance: u64,
    pub owner: Option<LocalPid>,
    pub shared: Arc<Shared>,
}

thread_local! {
    /// The instance whose result is being converted (set around
    /// `value_to_term`): conversions have no other way to know it. With the
    /// handles made so far.
    static ORIGIN: RefCell<Option<(Origin, Vec<ResourceArc<HandleResource>>)>> =
        const { RefCell::new(None) };
    /// Handles met while converting arguments, with whether they go as
    /// `own` (taken by `prepare`, checked and consumed by `begin`).
    static USED: RefCell<Vec<(ResourceArc<HandleResource>, bool)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `origin` as the owner of the handles it makes; returns
/// them too (see `forget`).
pub fn with_origin<T>(
    origin: Origin,
    f: impl FnOnce() -> T,
) -> (T, Vec<ResourceArc<HandleResource>>) {
    ORIGIN.with(|o| *o.borrow_mut() = Some((origin, Vec::new())));
    let out = f();
    let made = ORIGIN.with(|o| {
        o.borrow_mut()
            .take()
            .map(|(_, made)| made)
            .unwrap_or_default()
    });
    (out, made)
}

/// Handles made by a conversion that is abandoned to be done again (on a
/// dirty scheduler): they must not drop the guest's objects when they are
/// garbage-collected, since the retry hands out new handles to them.
pub fn forget(made: &[ResourceArc<HandleResource>]) {
    for h in made {
        *lock(&h.state) = State::Consumed;
    }
}

/// Clears the handles recorded on this thread and returns them.
pub fn take_used() -> Vec<(ResourceArc<HandleResource>, bool)> {
    USED.with(|u| std::mem::take(&mut *u.borrow_mut()))
}

/// `%Capsid.Resource{ref, name, instance}` for a resource the guest
/// returned.
pub fn to_term<'a>(env: Env<'a>, resource: ResourceAny, name: &str) -> Result<Term<'a>, Error> {
    ORIGIN.with(|o| {
        let mut o = o.borrow_mut();
        let Some((origin, made)) = o.as_mut() else {
            return Err(Error::Internal(
                "a resource handle outside of a call's result".into(),
            ));
        };
        let handle = ResourceArc::new(HandleResource {
            instance: origin.instance,
            generation: origin.shared.generation.load(Ordering::SeqCst),
            name: name.into(),
            resource,
            state: Mutex::new(State::Live),
            shared: origin.shared.clone(),
            owner: origin.owner,
        });
        made.push(handle.clone());
        let keys = [__struct__(), r#ref(), self::name(), instance()].map(|a| a.encode(env));
        let vals = [
            resource_struct().encode(env),
            handle.encode(env),
            name.encode(env),
            origin.owner.encode(env),
        ];
        Term::map_from_term_arrays(env, &keys, &vals)
            .map_err(|_| Error::Internal("building a resource handle".into()))
    })
}

/// The guest resource a `%Capsid.Resource{}` argument stands for; records
/// the handle for `check_used`. `None` if the term is not a handle.
pub fn from_term(term: Term, own: bool) -> Result<Option<ResourceAny>, Error> {
    let Ok(r) = term.map_get(r#ref()) else {
        return Ok(None);
    };
    let Ok(handle) = r.decode::<ResourceArc<HandleResource>>() else {
        return Ok(None);
    };
    match *lock(&handle.state) {
        State::Live => {}
        State::Consumed => {
            return Err(handle.stale("it was passed to the guest as an own argument"));
        }
        State::Dropped => return Err(handle.stale("it was dropped")),
    }
    if own && !handle.resource.owned() {
        return Err(handle.stale("it is borrowed, not owned"));
    }
    let resource = handle.resource;
    USED.with(|u| {
        let mut used = u.borrow_mut();
        // Given away and used in the same call: refused either way round.
        if used
            .iter()
            .any(|(h, o)| std::ptr::eq(&**h, &*handle) && (own || *o))
        {
            return Err(handle.stale("it is passed twice in one call, once as own"));
        }
        used.push((handle, own));
        Ok(())
    })?;
    Ok(Some(resource))
}

/// Checks the handles of a call's arguments against the instance and store
/// the call runs in, and consumes the owned ones. All or nothing: an error
/// consumes none.
pub fn check_used(
    used: &[(ResourceArc<HandleResource>, bool)],
    instance: u64,
    shared: &Shared,
    has_store: bool,
) -> Result<(), Error> {
    let generation = shared.generation.load(Ordering::SeqCst);
    for (h, _) in used {
        if h.instance != instance {
            return Err(h.stale("it belongs to another instance"));
        }
        if !has_store || h.generation != generation {
            return Err(
                h.stale("its instance was recycled (after a trap) or replaced since it was made")
            );
        }
        if *lock(&h.state) != State::Live {
            return Err(h.stale("it was dropped or passed to the guest"));
        }
    }
    for (h, own) in used {
        if *own {
            *lock(&h.state) = State::Consumed;
        }
    }
    Ok(())
}

/// The instance a call with these handles must run on, if any.
pub fn instance_of(used: &[(ResourceArc<HandleResource>, bool)]) -> Option<u64> {
    used.first().map(|(h, _)| h.instance)
}

/// The `ref` key of a `%Capsid.Resource{}`.
pub fn ref_atom() -> rustler::Atom {
    r#ref()
}

/// Drops a handle from Elixir: its destructor is queued, for the call that
/// `drop/1` makes next. A handle that was not live is `:stale_resource`.
pub fn drop_handle(handle: &HandleResource) -> Result<(), Error> {
    if handle.drop_now() {
        Ok(())
    } else {
        Err(handle.stale("it was already dropped or passed to the guest"))
    }
}
