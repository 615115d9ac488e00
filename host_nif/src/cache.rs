//! On-disk cache of compiled components, so a restart or a swap back to a
//! known version loads in milliseconds instead of recompiling.
//!
//! An artifact is keyed by the component's SHA-256 and by the engine's
//! compatibility hash (wasmtime version + configuration). wasmtime's
//! `deserialize` trusts its input completely, so every artifact carries an
//! HMAC-SHA256 under a secret key kept in the cache directory: a truncated,
//! corrupted or tampered file fails the check, is deleted, and the component
//! is recompiled. Nothing is deserialized before the check passes.
//!
//! The directory itself is hostile ground: it may be shared, pre-created by
//! someone else, or full of planted files. The cache is only used when the
//! directory and the key file belong to the current user and nobody else
//! can write them (or read the key); files are opened without following
//! symlinks and without blocking (a FIFO planted at an artifact's name), must
//! be regular files, and are read up to a size cap. The cache is kept under
//! a byte budget by deleting the least recently used artifacts.
#![allow(unsafe_code)]

use crate::engine::{Flavor, engine_of};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use wasmtime::component::Component;

const MAC_LEN: usize = 32;
const KEY_FILE: &str = ".capsid-cache-key";
const EXTENSION: &str = "cwasm";

/// What the cache did for one load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded from the cache: no compilation.
    Hit,
    /// Not cached: compiled, and stored for next time.
    Miss,
    /// A cached artifact failed its integrity check: deleted, recompiled, stored.
    Rejected,
    /// No cache directory given, or it could not be used.
    Disabled,
}

pub struct Cache {
    dir: PathBuf,
    key: [u8; 32],
    /// The engine artifacts are compiled for (see `for_engine`).
    flavor: Flavor,
    /// Bytes of artifacts kept before the least recently used go.
    max_bytes: u64,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The engine's identity for artifacts: a compiled component is only valid
/// for an engine whose configuration hashes the same (each `Flavor`'s
/// engine hashes differently, so their artifacts never mix).
fn engine_tag(flavor: Flavor) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine_of(flavor)
        .precompile_compatibility_hash()
        .hash(&mut h);
    format!("{:016x}", h.finish())
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // HMAC-SHA256 (RFC 2104); the key is one block-size-or-less secret.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let mut inner = Sha256::new();
    inner.update(&ipad);
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(&opad);
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Constant-time comparison, so a forger learns nothing from timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Opens an existing file without following a symlink and without blocking,
/// and checks it is a regular file of ours of at most `max` bytes.
fn open_checked(path: &Path, max: u64) -> Result<(File, u64), String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.uid() != euid() {
        return Err(format!("{} belongs to another user", path.display()));
    }
    if meta.len() > max {
        return Err(format!("{} is larger than {max} bytes", path.display()));
    }
    Ok((file, meta.len()))
}

fn check_dir(dir: &Path) -> Result<(), String> {
    let meta = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != euid() {
        return Err(format!(
            "{} belongs to another user (uid {}); a cache directory must be the current user's",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by other users (mode {:o}); a cache directory must not be",
            dir.display(),
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// A name part no other writer uses: the process id, and a counter for the
/// threads of this one (two loads opening a new cache at once collided on
/// the key's temporary file, and one of them went without a cache).
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

fn read_or_create_key(dir: &Path) -> Result<[u8; 32], String> {
    let path = dir.join(KEY_FILE);
    let mut key = [0u8; 32];
    // Whether it exists is asked first: asked after a failed open, another
    // thread's key landing in between made a missing key look unreadable.
    if path.symlink_metadata().is_ok() {
        let (mut f, len) = open_checked(&path, 32)?;
        let mode = f.metadata().map_err(|e| e.to_string())?.mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "the cache key {} is readable or writable by other users (mode {:o})",
                path.display(),
                mode & 0o777
            ));
        }
        if len != 32 {
            return Err(format!("the cache key {} is not 32 bytes", path.display()));
        }
        f.read_exact(&mut key).map_err(|e| e.to_string())?;
        return Ok(key);
    }
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let tmp = dir.join(format!("{KEY_FILE}.{}", unique()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&key));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(format!("creating the cache key: {e}"));
    }
    // Another VM may have raced us; whichever key landed is the key.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    if linked.is_err() {
        let (mut f, _) = open_checked(&path, 32)?;
        f.read_exact(&mut key).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

impl Cache {
    /// Opens (creating it if need be) the cache in `dir`, or says why it
    /// cannot be used.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Cache, String> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        check_dir(dir)?;
        let key = read_or_create_key(dir)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
            key,
            flavor: Flavor::DEFAULT,
            max_bytes,
        })
    }

    /// The same cache, for components compiled for `flavor`'s engine.
    pub fn for_engine(self, flavor: Flavor) -> Cache {
        Cache { flavor, ..self }
    }

    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir
            .join(format!("{hash}-{}.{EXTENSION}", engine_tag(self.flavor)))
    }

    fn mac(&self, hash: &str, payload: &[u8]) -> [u8; MAC_LEN] {
        hmac(
            &self.key,
            &[engine_tag(self.flavor).as_bytes(), hash.as_bytes(), payload],
        )
    }

    /// The cached component for `hash`: `Ok(None)` if there is none, `Err`
    /// if there was one that failed a check (`discard` deletes it: the
    /// caller does once it can compile a replacement, so that a load that
    /// must wait for a compile slot still sees, and reports, the bad one).
    pub fn load(&self, hash: &str, max_component_bytes: usize) -> Result<Option<Component>, ()> {
        let path = self.path(hash);
        if path.symlink_metadata().is_err() {
            return Ok(None);
        }
        // Compiled code is larger than the component; 16x is generous.
        let cap = (max_component_bytes as u64)
            .saturating_mul(16)
            .max(64 << 20);
        let bytes = match open_checked(&path, cap) {
            Ok((f, len)) => {
                let mut bytes = Vec::with_capacity(len as usize);
                match f.take(cap).read_to_end(&mut bytes) {
                    Ok(_) => bytes,
                    Err(_) => return Err(()),
                }
            }
            Err(_) => return Err(()),
        };
        if bytes.len() < MAC_LEN || !same(&bytes[..MAC_LEN], &self.mac(hash, &bytes[MAC_LEN..])) {
            return Err(());
        }
        match deserialize(self.flavor, &bytes[MAC_LEN..]) {
            Ok(c) => {
                // Least recently used goes first: a hit counts as a use.
                if let Ok(f) = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                {
                    let _ = f.set_modified(SystemTime::now());
                }
                Ok(Some(c))
            }
            Err(_) => Err(()),
        }
    }

    /// Deletes the artifact for `hash` (one that `load` rejected).
    pub fn discard(&self, hash: &str) {
        let _ = fs::remove_file(self.path(hash));
    }

    /// Stores `component`; failures only cost a recompile next time.
    pub fn store(&self, hash: &str, component: &Component) {
        let Ok(payload) = component.serialize() else {
            return;
        };
        let mac = self.mac(hash, &payload);
        let path = self.path(hash);
        let tmp = self.dir.join(format!(".{hash}.tmp{}", unique()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&mac)?;
                f.write_all(&payload)
            });
        // Rename is atomic: readers see the old file or the whole new one.
        if written.is_err() || fs::rename(&tmp, &path).is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
        self.evict();
    }

    /// Deletes the least recently used artifacts until the cache fits its
    /// byte budget.
    fn evict(&self) {
        let (mut entries, mut total) = scan(&self.dir);
        if total <= self.max_bytes {
            return;
        }
        entries.sort_by_key(|(_, _, modified)| *modified);
        for (path, size, _) in entries {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(size);
            }
        }
    }
}

/// The artifacts in `dir`: path, size and last use, and their total size.
fn scan(dir: &Path) -> (Vec<(PathBuf, u64, SystemTime)>, u64) {
    let mut entries = Vec::new();
    let mut total = 0;
    if let Ok(read) = fs::read_dir(dir) {
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            total += meta.len();
            entries.push((
                path,
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
    }
    (entries, total)
}

/// The one place Capsid deserializes compiled code.
fn deserialize(flavor: Flavor, payload: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `payload` passed the HMAC check above: it was written by
    // `Cache::store` from `Component::serialize` of this engine's own
    // compilation (the engine tag is part of both the file name and the
    // MAC), and only a holder of this cache's secret key, readable by the
    // current user alone, could forge it.
    unsafe { Component::deserialize(engine_of(flavor), payload) }
}

rustler::atoms! {
    ok,
    entries,
    bytes,
}

/// `%{entries: n, bytes: n}` of the artifacts in `dir`.
#[cfg_attr(not(test), rustler::nif)]
fn cache_info(env: rustler::Env, dir: String) -> rustler::Term {
    use rustler::Encoder;
    let (list, total) = scan(Path::new(&dir));
    let keys = [entries().encode(env), bytes().encode(env)];
    let vals = [list.len().encode(env), total.encode(env)];
    rustler::Term::map_from_term_arrays(env, &keys, &vals)
        .unwrap_or_else(|_| rustler::Term::map_new(env))
}

/// Deletes every artifact in `dir` (the key stays); returns how many.
#[cfg_attr(not(test), rustler::nif)]
fn cache_clear(dir: String) -> usize {
    let (list, _) = scan(Path::new(&dir));
    list.iter()
        .filter(|(p, _, _)| fs::remove_file(p).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("capsid-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_1() {
        // Key 0x0b × 20; zero padding to 32 bytes is the same HMAC key.
        let mut key = [0u8; 32];
        key[..20].copy_from_slice(&[0x0b; 20]);
        let mac = hmac(&key, &[b"Hi ", b"There"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn key_is_created_once_private_and_reused() {
        let dir = temp("key");
        let a = Cache::open(&dir, 1 << 30).unwrap().key;
        let b = Cache::open(&dir, 1 << 30).unwrap().key;
        assert_eq!(a, b);
        assert_ne!(a, [0u8; 32]);
        let mode = fs::metadata(dir.join(KEY_FILE)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_world_writable_directory_or_readable_key_is_refused() {
        let dir = temp("perm");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Cache::open(&dir, 1 << 30).err().unwrap();
        assert!(err.contains("writable by other users"), "{err}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        Cache::open(&dir, 1 << 30).unwrap();
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Cache::open(&dir, 1 << 30).err().unwrap();
        assert!(err.contains("readable or writable by other users"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn threads_opening_a_new_cache_at_once_all_get_its_key() {
        let dir = temp("race");
        fs::create_dir_all(&dir).unwrap();
        let keys: Vec<_> = (0..16)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || Cache::open(&dir, 1 << 30).map(|c| c.key))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap().expect("every thread can use the cache"))
            .collect();
        assert!(keys.iter().all(|k| *k == keys[0]));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_symlinked_key_is_refused() {
        let dir = temp("link");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join(KEY_FILE)).unwrap();
        assert!(Cache::open(&dir, 1 << 30).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn planted_artifacts_are_rejected_without_blocking() {
        let dir = temp("plant");
        let cache = Cache::open(&dir, 1 << 30).unwrap();
        assert!(matches!(cache.load("0123", 1 << 20), Ok(None)));
        fs::write(
            cache.path("0123"),
            b"garbage that is long enough to hold a mac.....",
        )
        .unwrap();
        assert!(
            cache.load("0123", 1 << 20).is_err(),
            "a forged artifact must be rejected"
        );
        cache.discard("0123");
        assert!(
            !cache.path("0123").exists(),
            "a rejected artifact can be deleted"
        );
        // A FIFO and a symlink to /dev/zero at an artifact's name.
        let fifo = cache.path("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(cache.load("fifo", 1 << 20).is_err());
        std::os::unix::fs::symlink("/dev/zero", cache.path("zero")).unwrap();
        assert!(cache.load("zero", 1 << 20).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn eviction_keeps_the_most_recently_used() {
        let dir = temp("evict");
        let cache = Cache::open(&dir, 250).unwrap();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let p = dir.join(format!("{name}.{EXTENSION}"));
            fs::write(&p, vec![0u8; 100]).unwrap();
            let f = File::options().write(true).open(&p).unwrap();
            f.set_modified(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64),
            )
            .unwrap();
        }
        cache.evict();
        assert!(
            !dir.join(format!("a.{EXTENSION}")).exists(),
            "the oldest goes"
        );
        assert!(dir.join(format!("c.{EXTENSION}")).exists());
        assert_eq!(scan(&dir).1, 200);
        let _ = fs::remove_dir_all(&dir);
    }
}
