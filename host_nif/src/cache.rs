//! On-disk cache of compiled components, so a restart or a swap back to a
//! known version loads in milliseconds instead of recompiling.
//!
//! An artifact is keyed by the component's SHA-256 and by the engine's
//! compatibility hash (wasmtime version + configuration). wasmtime's
//! `deserialize` trusts its input completely, so every artifact carries an
//! HMAC-SHA256 under a secret key kept in the cache directory (mode 0600): a
//! truncated, corrupted or tampered file fails the check, is deleted, and the
//! component is recompiled. Nothing is deserialized before the check passes.

use crate::engine::engine;
use sha2::{Digest, Sha256};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;

const MAC_LEN: usize = 32;
const KEY_FILE: &str = ".capsid-cache-key";

/// What the cache did for one load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded from the cache: no compilation.
    Hit,
    /// Not cached: compiled, and stored for next time.
    Miss,
    /// A cached artifact failed its integrity check: deleted, recompiled, stored.
    Rejected,
    /// No cache directory given.
    Disabled,
}

pub struct Cache {
    dir: PathBuf,
    key: [u8; 32],
}

/// The engine's identity for artifacts: a compiled component is only valid
/// for an engine whose configuration hashes the same.
fn engine_tag() -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine().precompile_compatibility_hash().hash(&mut h);
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

fn read_or_create_key(dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = dir.join(KEY_FILE);
    let mut key = [0u8; 32];
    if let Ok(mut f) = fs::File::open(&path)
        && f.read_exact(&mut key).is_ok()
    {
        return Ok(key);
    }
    fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let tmp = dir.join(format!("{KEY_FILE}.{}", std::process::id()));
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(&tmp)?.write_all(&key)?;
    }
    // Another VM may have raced us; whichever key landed is the key.
    match fs::hard_link(&tmp, &path) {
        Ok(()) => {}
        Err(_) => {
            fs::File::open(&path)?.read_exact(&mut key)?;
        }
    }
    let _ = fs::remove_file(&tmp);
    Ok(key)
}

impl Cache {
    pub fn open(dir: &Path) -> std::io::Result<Cache> {
        fs::create_dir_all(dir)?;
        let key = read_or_create_key(dir)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
            key,
        })
    }

    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", engine_tag()))
    }

    fn mac(&self, hash: &str, payload: &[u8]) -> [u8; MAC_LEN] {
        hmac(
            &self.key,
            &[engine_tag().as_bytes(), hash.as_bytes(), payload],
        )
    }

    /// The cached component for `hash`: `Ok(None)` if there is none, `Err`
    /// if there was one that failed the integrity check (it is deleted).
    pub fn load(&self, hash: &str) -> Result<Option<Component>, ()> {
        let path = self.path(hash);
        let Ok(bytes) = fs::read(&path) else {
            return Ok(None);
        };
        if bytes.len() < MAC_LEN || !same(&bytes[..MAC_LEN], &self.mac(hash, &bytes[MAC_LEN..])) {
            let _ = fs::remove_file(&path);
            return Err(());
        }
        match deserialize(&bytes[MAC_LEN..]) {
            Ok(c) => Ok(Some(c)),
            Err(_) => {
                let _ = fs::remove_file(&path);
                Err(())
            }
        }
    }

    /// Stores `component`; failures only cost a recompile next time.
    pub fn store(&self, hash: &str, component: &Component) {
        let Ok(payload) = component.serialize() else {
            return;
        };
        let mac = self.mac(hash, &payload);
        let path = self.path(hash);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&mac)?;
            f.write_all(&payload)
        });
        // Rename is atomic: readers see the old file or the whole new one.
        if written.is_err() || fs::rename(&tmp, &path).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

/// The one place Capsid deserializes compiled code.
#[allow(unsafe_code)]
fn deserialize(payload: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `payload` passed the HMAC check above: it was written by
    // `Cache::store` from `Component::serialize` of this engine's own
    // compilation (the engine tag is part of both the file name and the
    // MAC), and only a holder of this cache's secret key could forge it.
    unsafe { Component::deserialize(engine(), payload) }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn key_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("capsid-key-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = Cache::open(&dir).unwrap().key;
        let b = Cache::open(&dir).unwrap().key;
        assert_eq!(a, b);
        assert_ne!(a, [0u8; 32]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_artifact_is_not_an_error() {
        let dir = std::env::temp_dir().join(format!("capsid-miss-test-{}", std::process::id()));
        let cache = Cache::open(&dir).unwrap();
        assert!(matches!(cache.load("0123"), Ok(None)));
        fs::write(
            cache.path("0123"),
            b"garbage that is long enough to hold a mac.....",
        )
        .unwrap();
        assert!(
            cache.load("0123").is_err(),
            "a forged artifact must be rejected"
        );
        assert!(
            !cache.path("0123").exists(),
            "a rejected artifact is deleted"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
