//! The WASI capabilities an instance is granted (`Capsid.WASI`, the `wasi:`
//! option). Everything is denied unless granted: no environment, arguments
//! or directories, stdin closed, no sockets, outbound `wasi:http` to no one;
//! clocks and randomness real. What is granted is checked in Elixir; here it
//! becomes a `WasiCtx`, made for each store the first time the guest touches
//! WASI, and the hooks wasmtime-wasi-http asks before sending a request.

use crate::descriptors::{Account, Permit};
use crate::stdio::Capture;
use http_body_util::BodyExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustler::{Binary, NifTuple, Term};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, WasiCtx};
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// As Elixir passes it (`Capsid.WASI.native/1`).
#[derive(NifTuple)]
pub struct Grant<'a> {
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// `{host_path, guest_path, read_only}`.
    dirs: Vec<(String, String, bool)>,
    stdin: Option<Binary<'a>>,
    /// `{seconds, nanoseconds}` since the Unix epoch: a clock that stands.
    clock: Option<(u64, u32)>,
    seed: Option<u64>,
    /// `{allowed_authorities, max_response_body}`.
    http: (Vec<String>, u64),
    /// `{stdout_kept, stderr_kept, spec}`: which streams Elixir wants after
    /// each call, and how to route them (`Capsid.WASI.deliver/1`).
    pub output: (bool, bool, Term<'a>),
    /// Host paths of the preopens granted with `symlinks: false`.
    no_symlinks: Vec<String>,
}

#[derive(Default)]
pub struct WasiConfig {
    /// Hand stdout (stderr) to Elixir after each call instead of dropping it.
    pub keep_stdout: bool,
    pub keep_stderr: bool,
    env: Vec<(String, String)>,
    args: Vec<String>,
    dirs: Vec<(String, String, bool)>,
    stdin: Option<Vec<u8>>,
    clock: Option<Duration>,
    seed: Option<u64>,
    pub http: Arc<Outbound>,
    /// The preopens the guest may not create symlinks in (`symlinks`).
    pub symlinks: crate::symlinks::Guarded,
}

impl From<Grant<'_>> for WasiConfig {
    fn from(g: Grant) -> Self {
        WasiConfig {
            keep_stdout: g.output.0,
            keep_stderr: g.output.1,
            env: g.env,
            args: g.args,
            dirs: g.dirs,
            stdin: g.stdin.map(|b| b.as_slice().to_vec()),
            clock: g.clock.map(|(s, n)| Duration::new(s, n)),
            seed: g.seed,
            http: Arc::new(Outbound {
                allow: g.http.0,
                max_body: g.http.1,
            }),
            symlinks: crate::symlinks::Guarded::new(g.no_symlinks),
        }
    }
}

/// A wall clock that always shows the same time.
struct FixedWall(Duration);

impl HostWallClock for FixedWall {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        self.0
    }
}

/// A monotonic clock that never moves (with a fixed wall clock: a guest's
/// timing is then fully deterministic).
struct FixedMonotonic;

impl HostMonotonicClock for FixedMonotonic {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

impl WasiConfig {
    /// The context of one store: `stdout`/`stderr` go to the instance's
    /// captures (bounded per call; see `stdio`).
    /// Each preopen is a descriptor: one that `account` gives no permit
    /// for is left out.
    pub fn ctx(
        &self,
        stdout: Capture,
        stderr: Capture,
        account: &Account,
        permits: &mut Vec<Permit>,
    ) -> WasiCtx {
        let mut b = WasiCtx::builder();
        b.stdout(stdout)
            .stderr(stderr)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .envs(&self.env)
            .args(&self.args);
        for (host, guest, read_only) in &self.dirs {
            let perms = if *read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            let Some(permit) = account.acquire() else {
                continue;
            };
            // Checked when the instance started; a directory removed since
            // is simply not there for the guest.
            if b.preopened_dir(host, guest, perms).is_ok() {
                permits.push(permit);
            }
        }
        if let Some(bytes) = &self.stdin {
            b.stdin(MemoryInputPipe::new(bytes.clone()));
        }
        if let Some(at) = self.clock {
            b.wall_clock(FixedWall(at)).monotonic_clock(FixedMonotonic);
        }
        if let Some(seed) = self.seed {
            // Every source of randomness WASI has, derived from the seed.
            b.secure_random(StdRng::from_seed(derive(seed, "secure")))
                .insecure_random(StdRng::from_seed(derive(seed, "insecure")))
                .insecure_random_seed(derive_u128(seed, "insecure-seed"));
        }
        b.build()
    }
}

/// The bytes that seed one WASI source of randomness (`stream`) for
/// `random: {:seed, n}`: SHA-256 of the stream's label and `n`, so no two
/// seeds or streams share a sequence (seeding with `n` and `n + 1` made
/// seed 1's secure stream seed 0's insecure one).
fn derive(seed: u64, stream: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"capsid/wasi/random/");
    h.update(stream.as_bytes());
    h.update([0]);
    h.update(seed.to_le_bytes());
    h.finalize().into()
}

fn derive_u128(seed: u64, stream: &str) -> u128 {
    let mut half = [0; 16];
    half.copy_from_slice(&derive(seed, stream)[..16]);
    u128::from_le_bytes(half)
}

/// Outbound `wasi:http` as granted (`wasi: [http: ...]`).
#[derive(Default, Clone)]
pub struct Outbound {
    /// Lower-case `host` (any port) or `host:port` entries; empty: deny all.
    pub allow: Vec<String>,
    /// Largest response body a guest may read, in bytes.
    pub max_body: u64,
}

impl Outbound {
    /// Whether the request's authority was granted.
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let with_port = format!("{host}:{port}");
        self.allow.iter().any(|a| *a == host || *a == with_port)
    }
}

/// wasmtime-wasi-http's hooks for one store: every outbound request passes
/// the allow-list first, and its response body is capped.
/// Each connection holds a descriptor permit until it ends.
pub struct Hooks(pub Arc<Outbound>, pub Account);

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        let allowed = self.0.allows(request.uri());
        let max = self.0.max_body;
        let permit = if allowed { self.1.acquire() } else { None };
        Box::new(async move {
            if !allowed {
                // What the guest sees for a request it may not make: the
                // WASI error code, never a host failure.
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            let Some(permit) = permit else {
                return Err(wasmtime_wasi_http::Error::ConnectionLimitReached);
            };
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            let response = response.map(|body| {
                http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
                    .map_err(move |e| match e.downcast::<wasmtime_wasi_http::Error>() {
                        Ok(inner) => *inner,
                        Err(_) => wasmtime_wasi_http::Error::HttpResponseBodySize(Some(max)),
                    })
                    .boxed_unsync()
            });
            let io = async move {
                let _permit = permit;
                io.await
            };
            Ok((
                response,
                Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(allow: &[&str]) -> Outbound {
        Outbound {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            max_body: 1 << 20,
        }
    }

    #[test]
    fn seeds_derive_distinct_streams() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..100 {
            for stream in ["secure", "insecure", "insecure-seed"] {
                assert!(seen.insert(derive(seed, stream)), "{seed} {stream}");
            }
        }
        assert_eq!(derive(7, "secure"), derive(7, "secure"));
    }

    #[test]
    fn allow_list_matches_host_or_host_and_port() {
        let o = outbound(&["api.example.test", "127.0.0.1:4001"]);
        let ok = |u: &str| o.allows(&u.parse().unwrap());
        assert!(ok("http://api.example.test/x"));
        assert!(ok("https://API.example.test:8443/x"));
        assert!(ok("http://127.0.0.1:4001/"));
        assert!(!ok("http://127.0.0.1:4002/"));
        assert!(!ok("http://127.0.0.1/"));
        assert!(!ok("http://api.example.test.evil/"));
        assert!(!ok("http://evil/?api.example.test"));
        assert!(!outbound(&[]).allows(&"http://localhost/".parse().unwrap()));
        // host:port entries name the default port too.
        let o = outbound(&["example.test:80"]);
        assert!(o.allows(&"http://example.test/".parse().unwrap()));
        assert!(!o.allows(&"https://example.test/".parse().unwrap()));
    }
}
