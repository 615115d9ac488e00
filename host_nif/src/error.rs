//! The one error type of the NIF. Every failure crosses the boundary as
//! `{:error, {kind, message}}` (host refused) or `{:trap, {kind, message,
//! backtrace, stderr}}` (guest faulted); `Capsid.Error` / `Capsid.Trap` on the
//! Elixir side are built from exactly these tuples.

use rustler::{Encoder, Env, Term};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, ignoring poisoning: a panic while holding one of Capsid's
/// locks is caught and turned into a trap, and the data stays consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

rustler::atoms! {
    bad_argument,
    unknown_function,
    invalid_component,
    link,
    busy,
    internal,
    resource_limit,
    stale_resource,
    out_of_fuel,
    timeout,
    memory_limit,
    stack_overflow,
    unreachable,
    memory_out_of_bounds,
    divide_by_zero,
    integer_overflow,
    import_failed,
    cancelled,
    exit,
    other,
}

/// What kind of guest fault ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrapKind {
    OutOfFuel,
    Timeout,
    MemoryLimit,
    StackOverflow,
    Unreachable,
    MemoryOutOfBounds,
    DivideByZero,
    IntegerOverflow,
    ImportFailed,
    Cancelled,
    /// The guest called WASI's `exit`.
    Exit,
    Other,
}

impl TrapKind {
    pub const ALL: [TrapKind; 12] = [
        TrapKind::OutOfFuel,
        TrapKind::Timeout,
        TrapKind::MemoryLimit,
        TrapKind::StackOverflow,
        TrapKind::Unreachable,
        TrapKind::MemoryOutOfBounds,
        TrapKind::DivideByZero,
        TrapKind::IntegerOverflow,
        TrapKind::ImportFailed,
        TrapKind::Cancelled,
        TrapKind::Exit,
        TrapKind::Other,
    ];

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    pub fn atom(self) -> rustler::Atom {
        match self {
            TrapKind::OutOfFuel => out_of_fuel(),
            TrapKind::Timeout => timeout(),
            TrapKind::MemoryLimit => memory_limit(),
            TrapKind::StackOverflow => stack_overflow(),
            TrapKind::Unreachable => unreachable(),
            TrapKind::MemoryOutOfBounds => memory_out_of_bounds(),
            TrapKind::DivideByZero => divide_by_zero(),
            TrapKind::IntegerOverflow => integer_overflow(),
            TrapKind::ImportFailed => import_failed(),
            TrapKind::Cancelled => cancelled(),
            TrapKind::Exit => exit(),
            TrapKind::Other => other(),
        }
    }
}

/// A guest fault, classified, with what the guest left behind.
#[derive(Debug, Clone)]
pub struct TrapInfo {
    pub kind: TrapKind,
    pub message: String,
    /// Wasm frames, innermost first, as `"func_name"` or `"<wasm function N>"`.
    pub backtrace: Vec<String>,
    pub stderr: Vec<u8>,
    /// The status a guest gave `exit` (kind `Exit`).
    pub status: Option<i32>,
}

#[derive(Debug, Clone)]
pub enum Error {
    BadArgument(String),
    UnknownFunction(String),
    InvalidComponent(String),
    Link(String),
    Busy(String),
    /// A host resource limit was reached (atoms, address space, compile
    /// size...); the message names the limit and how to raise it.
    ResourceLimit(String),
    /// A resource handle that no longer names anything in its instance
    /// (dropped, consumed, its store recycled or swapped away).
    StaleResource(String),
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadArgument(m)
            | Error::UnknownFunction(m)
            | Error::InvalidComponent(m)
            | Error::Link(m)
            | Error::Busy(m)
            | Error::ResourceLimit(m)
            | Error::StaleResource(m)
            | Error::Internal(m) => f.write_str(m),
        }
    }
}

impl Encoder for Error {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let (kind, message) = match self {
            Error::BadArgument(m) => (bad_argument(), m),
            Error::UnknownFunction(m) => (unknown_function(), m),
            Error::InvalidComponent(m) => (invalid_component(), m),
            Error::Link(m) => (link(), m),
            Error::Busy(m) => (busy(), m),
            Error::ResourceLimit(m) => (resource_limit(), m),
            Error::StaleResource(m) => (stale_resource(), m),
            Error::Internal(m) => (internal(), m),
        };
        (rustler::types::atom::error(), (kind, message.as_str())).encode(env)
    }
}

/// Errors raised *inside* a guest call by the host (epoch callback, limiter,
/// Elixir imports). They travel through wasmtime as `wasmtime::Error` and are
/// recognised again by `classify`.
#[derive(Debug)]
pub struct HostTrap {
    pub kind: TrapKind,
    pub message: String,
}

impl fmt::Display for HostTrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HostTrap {}

/// What ended a call that did not return: the guest faulted, or the host
/// refused to go on (a resource limit of the node, not of the guest).
#[derive(Debug, Clone)]
pub enum Failure {
    Trap(TrapInfo),
    Refused(Error),
}

/// Errors that are the node's limits rather than the guest's fault: an
/// exhausted arena (address space, mappings).
pub fn refusal(err: &wasmtime::Error) -> Option<Error> {
    if let Some(e) = err.downcast_ref::<crate::arena::Exhausted>() {
        return Some(Error::ResourceLimit(e.0.clone()));
    }
    let message = root_message(err);
    if message.contains(crate::arena::MARKER) {
        return Some(Error::ResourceLimit(
            message.replace(crate::arena::MARKER, ""),
        ));
    }
    // wasmtime's own count limits, set from the instance's options.
    for (what, option) in [
        ("instance", "max_instances"),
        ("memory", "max_memories"),
        ("table", "max_tables"),
    ] {
        if message.contains(&format!("resource limit exceeded: {what} count too high")) {
            return Some(Error::ResourceLimit(format!(
                "the component creates more core {what} objects than the instance allows ({option}): {message}"
            )));
        }
    }
    None
}

/// Turns a failed guest call into a classified trap.
pub fn classify(err: &wasmtime::Error, stderr: Vec<u8>) -> TrapInfo {
    use wasmtime::Trap;
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| {
            bt.frames()
                .iter()
                .map(|f| match f.func_name() {
                    Some(name) => demangle(name),
                    None => format!("<wasm function {}>", f.func_index()),
                })
                .collect()
        })
        .unwrap_or_default();

    if let Some(host) = err.downcast_ref::<HostTrap>() {
        return TrapInfo {
            kind: host.kind,
            message: host.message.clone(),
            backtrace,
            stderr,
            status: None,
        };
    }
    if let Some(wasmtime_wasi::I32Exit(code)) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        // WASI 0.2's `exit` takes ok or err: 0 or 1 reach the host.
        let how = if *code == 0 { "success" } else { "failure" };
        return TrapInfo {
            kind: TrapKind::Exit,
            message: format!("the guest called exit with status {code} ({how})"),
            backtrace: Vec::new(),
            stderr,
            status: Some(*code),
        };
    }
    let root = root_message(err);
    if root.contains("store handle limit exceeded") {
        return TrapInfo {
            kind: TrapKind::MemoryLimit,
            message: format!(
                "the guest holds more resource handles than the instance allows (max_handles): {root}"
            ),
            backtrace,
            stderr,
            status: None,
        };
    }
    let (kind, message) = match err.downcast_ref::<Trap>() {
        Some(trap) => {
            let kind = match trap {
                Trap::OutOfFuel => TrapKind::OutOfFuel,
                Trap::Interrupt => TrapKind::Timeout,
                Trap::StackOverflow => TrapKind::StackOverflow,
                Trap::UnreachableCodeReached => TrapKind::Unreachable,
                Trap::MemoryOutOfBounds | Trap::HeapMisaligned => TrapKind::MemoryOutOfBounds,
                Trap::IntegerDivisionByZero => TrapKind::DivideByZero,
                Trap::IntegerOverflow => TrapKind::IntegerOverflow,
                _ => TrapKind::Other,
            };
            (kind, trap.to_string())
        }
        None => (TrapKind::Other, root),
    };
    TrapInfo {
        kind,
        message,
        backtrace,
        stderr,
        status: None,
    }
}

/// Bytes kept of a message that an import or a guest provides (a trap's
/// message, its stderr, a frame's name): a trap is not a channel for
/// megabytes, and copying them would hold the scheduler that encodes it.
pub const MAX_MESSAGE: usize = 4096;

/// Room for the note that says how much was left out: a text bounded
/// once (by Elixir, or by a previous step) is not cut again.
const NOTE: usize = 64;

/// `bytes` as text, cut to its first `max` bytes (at a character boundary)
/// with how many were left out: "… N bytes more". Invalid UTF-8 is
/// replaced, never a reason to lose the message.
pub fn bounded(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max + NOTE {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut cut = max;
    while cut > 0 && bytes[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    format!(
        "{}… {} bytes more",
        String::from_utf8_lossy(&bytes[..cut]),
        bytes.len() - cut
    )
}

/// A guest's output kept whole up to `max` bytes, or else its first and
/// last `max / 2` (a panic's message comes last) with how many bytes
/// were left out between them.
pub fn bounded_output(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut end = max / 2;
    while end > 0 && bytes[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let mut start = bytes.len() - max / 2;
    while start < bytes.len() && bytes[start] & 0xC0 == 0x80 {
        start += 1;
    }
    format!(
        "{}… {} bytes more …{}",
        String::from_utf8_lossy(&bytes[..end]),
        start - end,
        String::from_utf8_lossy(&bytes[start..])
    )
}

/// Rust symbol names as people read them: `faulty::recurse`, not
/// `_ZN6faulty7recurse17hc3e4484b645d37e3E`. Other names pass through.
pub fn demangle(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(d) => format!("{d:#}"),
        Err(_) => name.to_string(),
    }
}

/// The innermost cause of an error, which is the most specific message
/// wasmtime gives (outer layers are context like "error while executing").
pub fn root_message(err: &wasmtime::Error) -> String {
    let mut chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    chain.dedup();
    chain.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_traps_keep_their_kind() {
        let err = wasmtime::Error::new(HostTrap {
            kind: TrapKind::Timeout,
            message: "call exceeded its 5 ms timeout".into(),
        });
        let info = classify(&err, b"oops".to_vec());
        assert_eq!(info.kind, TrapKind::Timeout);
        assert_eq!(info.message, "call exceeded its 5 ms timeout");
        assert_eq!(info.stderr, b"oops");
    }

    #[test]
    fn wasm_traps_are_classified() {
        let err = wasmtime::Error::new(wasmtime::Trap::IntegerDivisionByZero);
        assert_eq!(classify(&err, vec![]).kind, TrapKind::DivideByZero);
        let err = wasmtime::Error::new(wasmtime::Trap::OutOfFuel);
        assert_eq!(classify(&err, vec![]).kind, TrapKind::OutOfFuel);
    }

    #[test]
    fn rust_frame_names_are_demangled() {
        assert_eq!(
            demangle("_ZN6faulty7recurse17hc3e4484b645d37e3E"),
            "faulty::recurse"
        );
        assert_eq!(demangle("hit-unreachable"), "hit-unreachable");
    }

    #[test]
    fn long_messages_are_bounded_at_a_character_boundary() {
        assert_eq!(bounded(b"short", 8), "short");
        let long = "x".repeat(100);
        assert_eq!(bounded(long.as_bytes(), 4), "xxxx\u{2026} 96 bytes more");
        // Bounded once, with its note: not cut again.
        let once = bounded(long.as_bytes(), 4);
        assert_eq!(bounded(once.as_bytes(), 4), once);
        // "é" is two bytes: a cut inside it keeps it whole out.
        let accents = format!("abc{}", "é".repeat(50));
        assert_eq!(bounded(accents.as_bytes(), 4), "abc\u{2026} 100 bytes more");
        assert_eq!(bounded(b"\xff\xfe", 8), "\u{fffd}\u{fffd}");
        let out = bounded_output(b"0123456789panic!", 8);
        assert_eq!(out, "0123\u{2026} 8 bytes more \u{2026}nic!");
    }

    #[test]
    fn trap_kind_indices_are_distinct() {
        for (i, k) in TrapKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
