//! A pool: N instances of one component behind one target. A call takes the
//! member of its scheduler thread, skips busy ones, and queues on the last
//! it tries. A deployment's version is a pool; a swap publishes a new pool
//! under the deployment's name and retires the old one.

use crate::error::lock;
use crate::instance::InstanceResource;
use arc_swap::ArcSwap;
use rustler::{Atom, Env, Resource, ResourceArc};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

rustler::atoms! {
    ok,
}

pub struct PoolResource {
    /// Read on every call without a lock (`ArcSwap`), replaced whole when a
    /// member is replaced.
    members: ArcSwap<Vec<ResourceArc<InstanceResource>>>,
    retired: AtomicBool,
    /// Serialises member replacements.
    write: std::sync::Mutex<()>,
}

#[cfg_attr(not(test), rustler::resource_impl)]
impl Resource for PoolResource {}

impl PoolResource {
    pub fn members(&self) -> arc_swap::Guard<Arc<Vec<ResourceArc<InstanceResource>>>> {
        self.members.load()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

/// A pool of the given instances.
#[cfg_attr(not(test), rustler::nif)]
fn pool_new(env: Env, members: Vec<ResourceArc<InstanceResource>>) -> rustler::Term {
    use rustler::Encoder;
    ResourceArc::new(PoolResource {
        members: ArcSwap::from_pointee(members),
        retired: AtomicBool::new(false),
        write: std::sync::Mutex::new(()),
    })
    .encode(env)
}

/// Replaces member `index` (a crashed member's successor).
#[cfg_attr(not(test), rustler::nif)]
fn pool_replace(
    pool: ResourceArc<PoolResource>,
    index: usize,
    member: ResourceArc<InstanceResource>,
) -> Atom {
    let _w = lock(&pool.write);
    let mut members: Vec<_> = pool.members.load().as_ref().clone();
    if index < members.len() {
        members[index] = member;
    }
    pool.members.store(Arc::new(members));
    ok()
}

/// Retires the pool and all its members: calls that picked one of them
/// are turned away (`:retired`) and go to whatever replaced the pool.
#[cfg_attr(not(test), rustler::nif)]
fn pool_retire(env: Env, pool: ResourceArc<PoolResource>) -> Atom {
    pool.retired.store(true, Ordering::Release);
    for m in pool.members.load().iter() {
        InstanceResource::retire(m, env, true);
    }
    ok()
}
