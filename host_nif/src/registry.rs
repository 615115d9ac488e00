//! Where a call finds its instance: pid → instance or pool, and name (any
//! term) → instance or pool, without a message and without any VM-wide
//! operation when instances come and go.
//!
//! Reads happen on every call and must not contend: each shard is a
//! copy-on-write map behind an `ArcSwap` (a read touches no shared cache
//! line); writes, which happen when an instance starts or stops, copy one
//! shard of 1/256th of the entries.
//!
//! An entry's owner process is monitored by a small resource (`Watch`);
//! when it dies, however it dies, its entries go and its target is retired.

use crate::error::lock;
use crate::instance::InstanceResource;
use crate::pool::PoolResource;
use arc_swap::ArcSwap;
use rustler::{Atom, Encoder, Env, LocalPid, Monitor, Resource, ResourceArc, Term, TermType};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock, Mutex};

rustler::atoms! {
    ok,
    error,
    already_registered,
}

#[derive(Clone)]
pub enum Entry {
    Instance(ResourceArc<InstanceResource>),
    Pool(ResourceArc<PoolResource>),
}

impl Entry {
    fn retire(&self, env: Env, process: bool) {
        match self {
            Entry::Instance(i) => InstanceResource::retire(i, env, process),
            // Its members are instances with owners of their own.
            Entry::Pool(_) => {}
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Pid(LocalPid),
    Atom(rustler::sys::ErlNifTerm),
    /// Any other term, by its external format.
    Term(Vec<u8>),
}

const SHARDS: usize = 256;

/// Seeded per VM (foldhash draws its seed at random): names may come from
/// outside (tenant ids), and a fixed hash would let them collide on purpose.
type Map = HashMap<Key, Entry, foldhash::fast::RandomState>;

static HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

struct Shard {
    map: ArcSwap<Map>,
    write: Mutex<()>,
}

static TABLE: LazyLock<Vec<Shard>> = LazyLock::new(|| {
    (0..SHARDS)
        .map(|_| Shard {
            map: ArcSwap::from_pointee(Map::with_hasher(HASHER.clone())),
            write: Mutex::new(()),
        })
        .collect()
});

fn shard(key: &Key) -> &'static Shard {
    // The top bits: the maps inside use the low ones for their buckets.
    &TABLE[(HASHER.hash_one(key) >> 56) as usize % SHARDS]
}

fn update(key: &Key, f: impl FnOnce(&mut Map) -> bool) -> bool {
    let s = shard(key);
    let _w = lock(&s.write);
    let mut map = s.map.load().as_ref().clone();
    let changed = f(&mut map);
    if changed {
        s.map.store(Arc::new(map));
    }
    changed
}

fn get(key: &Key) -> Option<Entry> {
    shard(key).map.load().get(key).cloned()
}

fn pid_key(pid: &LocalPid) -> Key {
    Key::Pid(*pid)
}

/// The key of a name term, or `None` for terms that are not names.
fn name_key(term: Term) -> Option<Key> {
    match term.get_type() {
        TermType::Atom => Some(Key::Atom(term.as_c_arg())),
        TermType::Pid => None,
        _ => Some(Key::Term(term.to_binary().as_slice().to_vec())),
    }
}

/// What `target` (a pid, a name, or an instance or pool resource) stands
/// for on this node.
pub fn resolve(env: Env, target: Term) -> Option<Entry> {
    match target.get_type() {
        TermType::Pid => {
            let pid = target.decode::<LocalPid>().ok()?;
            get(&pid_key(&pid))
        }
        TermType::Atom => get(&Key::Atom(target.as_c_arg())).or_else(|| {
            let pid = env.whereis_pid(target)?;
            get(&pid_key(&pid))
        }),
        TermType::Ref => {
            if let Ok(i) = target.decode::<ResourceArc<InstanceResource>>() {
                Some(Entry::Instance(i))
            } else {
                target
                    .decode::<ResourceArc<PoolResource>>()
                    .ok()
                    .map(Entry::Pool)
            }
        }
        _ => get(&name_key(target)?),
    }
}

/// Watches an owner process; when it dies, its entries are removed and its
/// target retired.
pub struct Watch {
    keys: Vec<Key>,
    target: Entry,
}

#[cfg_attr(not(test), rustler::resource_impl)]
impl Resource for Watch {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        remove(&self.keys);
        self.target.retire(env, false);
        // The VM holds a reference to this resource for the duration of
        // the callback, so dropping ours here is safe.
        lock(&WATCHES).remove(&pid_key(&pid));
    }
}

fn remove(keys: &[Key]) {
    for key in keys {
        update(key, |m| m.remove(key).is_some());
    }
}

fn target_of(term: Term) -> Option<Entry> {
    if let Ok(i) = term.decode::<ResourceArc<InstanceResource>>() {
        Some(Entry::Instance(i))
    } else {
        term.decode::<ResourceArc<PoolResource>>()
            .ok()
            .map(Entry::Pool)
    }
}

/// Registers `target` under its owner `pid` and, unless nil, `name`; the
/// owner is monitored. `{:error, :already_registered}` if the name is taken.
#[cfg_attr(not(test), rustler::nif)]
fn registry_register<'a>(
    env: Env<'a>,
    target: Term<'a>,
    pid: LocalPid,
    name: Term<'a>,
) -> Term<'a> {
    let Some(entry) = target_of(target) else {
        return (error(), rustler::types::atom::badarg()).encode(env);
    };
    if let Entry::Instance(this) = &entry {
        this.set_owner(pid);
    }
    let mut keys = vec![pid_key(&pid)];
    if !is_nil(name) {
        let Some(key) = name_key(name) else {
            return (error(), rustler::types::atom::badarg()).encode(env);
        };
        let taken = !update(&key, |m| {
            if m.contains_key(&key) {
                false
            } else {
                m.insert(key.clone(), entry.clone());
                true
            }
        });
        if taken {
            return (error(), already_registered()).encode(env);
        }
        keys.push(key);
    }
    update(&keys[0], |m| {
        m.insert(keys[0].clone(), entry.clone());
        true
    });
    let watch = ResourceArc::new(Watch {
        keys,
        target: entry,
    });
    if watch.monitor(Some(env), &pid).is_none() {
        // Already dead: undo.
        remove(&watch.keys);
        return (error(), rustler::types::atom::badarg()).encode(env);
    }
    lock(&WATCHES).insert(pid_key(&pid), watch);
    ok().encode(env)
}

/// A monitor does not keep its resource alive: the watches are held here
/// until their owner unregisters or dies.
static WATCHES: LazyLock<Mutex<HashMap<Key, ResourceArc<Watch>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Removes the entries of owner `pid` and retires its target (a clean stop).
#[cfg_attr(not(test), rustler::nif)]
fn registry_unregister(env: Env, pid: LocalPid) -> Atom {
    let watch = lock(&WATCHES).remove(&pid_key(&pid));
    if let Some(w) = watch {
        remove(&w.keys);
        w.target.retire(env, true);
    } else {
        remove(&[pid_key(&pid)]);
    }
    ok()
}

/// Points `name` at `target` (a pool: a deployment's current version), or
/// removes it when `target` is nil. One atomic store: every call that
/// starts afterwards sees the new target.
#[cfg_attr(not(test), rustler::nif)]
fn registry_put_name<'a>(env: Env<'a>, name: Term<'a>, target: Term<'a>) -> Term<'a> {
    let Some(key) = name_key(name) else {
        return (error(), rustler::types::atom::badarg()).encode(env);
    };
    match target_of(target) {
        Some(entry) => {
            update(&key, |m| {
                m.insert(key.clone(), entry);
                true
            });
        }
        None => {
            update(&key, |m| m.remove(&key).is_some());
        }
    }
    ok().encode(env)
}

fn is_nil(term: Term) -> bool {
    term.as_c_arg() == rustler::types::atom::nil().as_c_arg()
}
