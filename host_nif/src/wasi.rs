//! The WASI capabilities an instance is granted (`Capsid.WASI`, the `wasi:`
//! option). Everything is denied unless granted: no environment, arguments
//! or directories, stdin closed, no network; clocks and randomness real.
//! What is granted is checked in Elixir; here it becomes a `WasiCtx`, made
//! for each store the first time the guest touches WASI.

use crate::stdio::Capture;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustler::{Binary, NifTuple, Term};
use std::time::Duration;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, WasiCtx};

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
    /// `{stdout_kept, stderr_kept, spec}`: which streams Elixir wants after
    /// each call, and how to route them (`Capsid.WASI.deliver/1`).
    pub output: (bool, bool, Term<'a>),
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
    pub fn ctx(&self, stdout: Capture, stderr: Capture) -> WasiCtx {
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
            // Checked when the instance started; a directory removed since
            // is simply not there for the guest.
            let _ = b.preopened_dir(host, guest, perms);
        }
        if let Some(bytes) = &self.stdin {
            b.stdin(MemoryInputPipe::new(bytes.clone()));
        }
        if let Some(at) = self.clock {
            b.wall_clock(FixedWall(at)).monotonic_clock(FixedMonotonic);
        }
        if let Some(seed) = self.seed {
            // Every source of randomness WASI has, derived from the seed.
            b.secure_random(StdRng::seed_from_u64(seed))
                .insecure_random(StdRng::seed_from_u64(seed.wrapping_add(1)))
                .insecure_random_seed(u128::from(seed));
        }
        b.build()
    }
}
