//! OS descriptors held for guests, bounded per instance (`max_descriptors`)
//! and per node (`budget::DESCRIPTORS`).
//!
//! A guest with a read-only preopen can open files in a loop; every one is
//! a descriptor of the VM's own OS process, and a VM that runs out of them
//! cannot open a file or a socket or load code: it terminates. Every
//! descriptor Capsid opens for a guest therefore holds a `Permit`, given
//! back when the descriptor closes:
//!
//! * files and directories the guest opens (`open-at`): wasmtime-wasi's
//!   `open-at` and the `descriptor` destructor are shadowed in the linker
//!   (`add_to_linker`), so the permit lives exactly as long as the
//!   guest's handle; a refusal is the WASI error `insufficient-memory`
//!   (the filesystem interface has no "too many open files");
//! * preopened directories: one descriptor per preopen per store; one that
//!   gets no permit is left out (the guest does not see it);
//! * outbound `wasi:http` requests: one per connection until it ends
//!   (`wasi::Hooks`); a refusal is `connection-limit-reached`.
//!
//! A store's permits go with it: when a store is dropped, so are its
//! descriptors and their permits.

use crate::budget::{DESCRIPTORS, Refused};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, ErrorCode, Host as _, HostDescriptor, OpenFlags, PathFlags,
};

/// One instance's claim on descriptors: its count across its stores, its
/// ceiling, and where refusals are noted for Elixir.
#[derive(Clone)]
pub struct Account {
    held: Arc<AtomicU64>,
    max: u64,
    refused: Arc<Refused>,
}

/// One descriptor held; dropping it gives it back to the instance and the
/// node.
pub struct Permit(Arc<AtomicU64>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        DESCRIPTORS.give(1);
    }
}

impl Account {
    /// `held` counts the instance's descriptors over all its stores.
    pub fn new(held: Arc<AtomicU64>, max: u64, refused: Arc<Refused>) -> Self {
        Account { held, max, refused }
    }

    /// A permit for one more descriptor, if both the instance's limit and
    /// the node's budget allow it.
    pub fn acquire(&self) -> Option<Permit> {
        let under = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if under && DESCRIPTORS.take(1).is_ok() {
            return Some(Permit(self.held.clone()));
        }
        if under {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
        // Both kinds of refusal reach Elixir as the descriptors budget: a
        // guest at its own limit is worth a look as much as a full node.
        self.refused.note(&DESCRIPTORS);
        None
    }

    /// Descriptors the instance holds now.
    #[cfg(test)]
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// The descriptors one store holds for its guest's handles.
pub struct Held {
    pub account: Account,
    /// Permits of the files and directories the guest opened, by their rep
    /// in the WASI table: preopens' handles share their preopen's
    /// descriptor, so only these are given back when a handle is dropped.
    opened: HashMap<u32, Permit>,
    /// The store's preopened directories.
    pub preopens: Vec<Permit>,
}

impl Held {
    pub fn new(account: Account) -> Self {
        Held {
            account,
            opened: HashMap::new(),
            preopens: Vec::new(),
        }
    }
}

/// Store data that holds descriptors for its guest (`host::Host`).
pub trait Holder {
    fn held(&mut self) -> &mut Held;
}

/// Whether `descriptor` took one of the last `DESCRIPTOR_RESERVE` numbers
/// below `RLIMIT_NOFILE`. The kernel hands out the lowest free number, so
/// one that high means every lower one is taken: the process as a whole
/// (guests and the VM's own use together) is about to run out, whatever the
/// budget says. The guest gives it back at once.
fn near_exhaustion(descriptor: &Descriptor) -> bool {
    let fd = match descriptor {
        Descriptor::File(f) => f.file.as_raw_fd(),
        Descriptor::Dir(d) => d.dir.as_raw_fd(),
    };
    u64::try_from(fd).is_ok_and(|fd| {
        fd >= crate::budget::descriptor_limit().saturating_sub(crate::budget::DESCRIPTOR_RESERVE)
    })
}

/// The interface as wasmtime-wasi 48 defines it (its WIT's version; a guest
/// importing an older 0.2 gets it by semver), where this file and
/// `symlinks` shadow functions. symlinks.rs's test fails if an upgrade
/// renames it, instead of the shadows silently going unused.
pub const TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Replaces wasmtime-wasi's `open-at` and `descriptor` destructor (already
/// in `linker`) with ones that hold a permit per opened descriptor.
pub fn add_to_linker<T: WasiView + Holder + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut inst = linker.instance(TYPES)?;
    inst.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let Some(permit) = store.data_mut().held().account.acquire() else {
                    return Ok((Err(ErrorCode::InsufficientMemory),));
                };
                let (opened, reserve_hit) = {
                    let mut view = store.data_mut().filesystem();
                    match view.open_at(fd, path_flags, path, open_flags, flags).await {
                        Ok(new) if near_exhaustion(view.table.get(&new)?) => {
                            view.table.delete(new)?;
                            (Err(ErrorCode::InsufficientMemory), true)
                        }
                        Ok(new) => (Ok(new), false),
                        Err(e) => (Err(view.convert_error_code(e)?), false),
                    }
                };
                if reserve_hit {
                    DESCRIPTORS.count_refusal();
                    store.data_mut().held().account.refused.note(&DESCRIPTORS);
                }
                if let Ok(new) = &opened {
                    store.data_mut().held().opened.insert(new.rep(), permit);
                }
                Ok((opened,))
            })
        },
    )?;
    inst.resource(
        "descriptor",
        ResourceType::host::<Descriptor>(),
        |mut store, rep| {
            let data = store.data_mut();
            data.held().opened.remove(&rep);
            HostDescriptor::drop(&mut data.filesystem(), Resource::new_own(rep))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_holds_at_most_its_limit_and_gives_back() {
        let refused = Arc::new(Refused::default());
        let account = Account::new(Arc::default(), 2, refused.clone());
        let a = account.acquire().expect("first");
        let b = account.acquire().expect("second");
        assert!(account.acquire().is_none(), "over max_descriptors");
        assert_eq!(refused.take().count(), 1);
        assert_eq!(account.held(), 2);
        drop(a);
        assert_eq!(account.held(), 1);
        let c = account.acquire().expect("given back");
        drop((b, c));
        assert_eq!(account.held(), 0);
    }
}
