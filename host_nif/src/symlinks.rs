//! `symlinks: false` on a preopen (`Capsid.WASI`): the guest may not create
//! a symlink in that directory or anywhere below it.
//!
//! wasmtime-wasi (cap-std) never follows a symlink out of a preopen for the
//! guest, and refuses absolute targets, but a relative one (`../../etc`)
//! is created as written: the host reading the directory later would follow
//! it. wasmtime-wasi has no switch for this, so the link shadows three
//! functions of `wasi:filesystem/types` with ones that check, then delegate
//! to wasmtime-wasi: `symlink-at` (creates one), and `link-at` and
//! `rename-at` (could bring in a symlink made in another preopen).
//!
//! A descriptor does not say which preopen it came from (a guest opens
//! subdirectories, and wasmtime-wasi keeps no parent), so the check asks the
//! file system: the directory the descriptor names, and each directory
//! above it up to `/`, compared by device and inode with the guarded
//! preopens. Anything the check cannot establish refuses (fail closed).

use crate::host::Host;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::FsResult;
use wasmtime_wasi::p2::bindings::filesystem::types::{ErrorCode, HostDescriptor, PathFlags};

/// `(device, inode)` of a directory.
type Id = (u64, u64);

/// The preopens granted with `symlinks: false`: their host paths, and what
/// those named when the instance started.
#[derive(Default)]
pub struct Guarded {
    paths: Vec<String>,
    ids: Vec<Id>,
}

impl Guarded {
    pub fn new(paths: Vec<String>) -> Self {
        let ids = paths.iter().filter_map(|p| id_of(p)).collect();
        Guarded { paths, ids }
    }

    /// The guarded directories' ids: as at the start and as now (a path
    /// replaced since could be either in a store's preopen).
    fn ids(&self) -> Vec<Id> {
        let mut ids = self.ids.clone();
        ids.extend(self.paths.iter().filter_map(|p| id_of(p)));
        ids
    }
}

fn id_of(path: &str) -> Option<Id> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The most directories the walk up climbs before it gives up (refusing).
const MAX_DEPTH: usize = 4096;

/// The guarded directories among `dir` and those above it.
#[allow(unsafe_code)]
fn guarding(dir: &File, guarded: &[Id]) -> Result<Vec<Id>, ErrorCode> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // O_PATH: climbing needs search permission only, not read.
    #[cfg(target_os = "linux")]
    const FLAGS: libc::c_int = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    #[cfg(not(target_os = "linux"))]
    const FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;

    let meta = dir.metadata().map_err(|_| ErrorCode::NotPermitted)?;
    let mut id = (meta.dev(), meta.ino());
    let mut hits = Vec::new();
    let mut current: Option<OwnedFd> = None;
    for _ in 0..MAX_DEPTH {
        if guarded.contains(&id) {
            hits.push(id);
        }
        let at = current.as_ref().map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
        // SAFETY: `at` is an open descriptor (the guest's, or ours just
        // opened); the path is a NUL-terminated literal.
        let fd = unsafe { libc::openat(at, c"..".as_ptr(), FLAGS) };
        if fd < 0 {
            return Err(ErrorCode::NotPermitted);
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let parent = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let meta = parent.metadata().map_err(|_| ErrorCode::NotPermitted)?;
        let up = (meta.dev(), meta.ino());
        if up == id {
            // `/`: its `..` is itself.
            return Ok(hits);
        }
        id = up;
        current = Some(parent.into());
    }
    Err(ErrorCode::NotPermitted)
}

/// The guarded directories at or above the directory `fd` names; `None`
/// when it is not a directory (wasmtime-wasi then answers for itself).
fn guarding_fd(
    store: &mut StoreContextMut<'_, Host>,
    fd: &Resource<Descriptor>,
    guarded: &[Id],
) -> Result<Option<Vec<Id>>, ErrorCode> {
    let view = store.data_mut().filesystem();
    match view.table.get(fd) {
        Ok(Descriptor::Dir(d)) => guarding(&d.dir, guarded).map(Some),
        _ => Ok(None),
    }
}

/// The guarded ids of this store's instance; empty: nothing to check.
fn guarded(store: &StoreContextMut<'_, Host>) -> Vec<Id> {
    let g = &store.data().shared.wasi.symlinks;
    if g.paths.is_empty() {
        Vec::new()
    } else {
        g.ids()
    }
}

/// May the guest create a symlink in directory `fd`? Not in a guarded tree.
fn may_create(
    store: &mut StoreContextMut<'_, Host>,
    fd: &Resource<Descriptor>,
) -> Result<(), ErrorCode> {
    let guarded = guarded(store);
    if guarded.is_empty() {
        return Ok(());
    }
    match guarding_fd(store, fd, &guarded)? {
        Some(hits) if !hits.is_empty() => Err(ErrorCode::NotPermitted),
        _ => Ok(()),
    }
}

/// May the guest put an entry that could be a symlink made elsewhere into
/// directory `to`, taking it from directory `from`? Not into a guarded tree
/// it does not come from.
fn may_move(
    store: &mut StoreContextMut<'_, Host>,
    from: &Resource<Descriptor>,
    to: &Resource<Descriptor>,
) -> Result<(), ErrorCode> {
    let guarded = guarded(store);
    if guarded.is_empty() {
        return Ok(());
    }
    let Some(into) = guarding_fd(store, to, &guarded)? else {
        return Ok(());
    };
    let out_of = guarding_fd(store, from, &guarded)?.unwrap_or_default();
    if into.iter().all(|id| out_of.contains(id)) {
        Ok(())
    } else {
        Err(ErrorCode::NotPermitted)
    }
}

/// wasmtime-wasi's answer as the guest sees it: its error code, or a trap.
fn answer(r: FsResult<()>) -> wasmtime::Result<(Result<(), ErrorCode>,)> {
    match r {
        Ok(()) => Ok((Ok(()),)),
        Err(e) => Ok((Err(e.downcast()?),)),
    }
}

/// Shadows `symlink-at`, `link-at` and `rename-at` of every
/// `wasi:filesystem/types` WASI p2 linked (after `add_to_linker_async`).
pub fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(crate::descriptors::TYPES)?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store, (fd, old, new): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                if let Err(e) = may_create(&mut store, &fd) {
                    return Ok((Err(e),));
                }
                let mut view = store.data_mut().filesystem();
                answer(HostDescriptor::symlink_at(&mut view, fd, old, new).await)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.link-at",
        |mut store,
         (fd, flags, old, to, new): (
            Resource<Descriptor>,
            PathFlags,
            String,
            Resource<Descriptor>,
            String,
        )| {
            Box::new(async move {
                if let Err(e) = may_move(&mut store, &fd, &to) {
                    return Ok((Err(e),));
                }
                let mut view = store.data_mut().filesystem();
                answer(HostDescriptor::link_at(&mut view, fd, flags, old, to, new).await)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.rename-at",
        |mut store,
         (fd, old, to, new): (Resource<Descriptor>, String, Resource<Descriptor>, String)| {
            Box::new(async move {
                if let Err(e) = may_move(&mut store, &fd, &to) {
                    return Ok((Err(e),));
                }
                let mut view = store.data_mut().filesystem();
                answer(HostDescriptor::rename_at(&mut view, fd, old, to, new).await)
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadows_what_wasmtime_wasi_defines() {
        let engine = wasmtime::Engine::default();
        let mut linker: Linker<Host> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        // Without shadowing, defining the name again fails: it is taken.
        let mut types = linker.instance(crate::descriptors::TYPES).unwrap();
        let again = types.func_wrap_async(
            "[method]descriptor.symlink-at",
            |_store, (_fd, _old, _new): (Resource<Descriptor>, String, String)| {
                Box::new(async { Ok((Ok::<(), ErrorCode>(()),)) })
            },
        );
        assert!(again.is_err());
        add_to_linker(&mut linker).unwrap();
    }
}
