//! A component value in transit between Elixir terms and the guest's
//! canonical ABI: owned (it outlives the NIF call that made it when a call is
//! suspended), compact (`list<u8>` and strings are one buffer, not one value
//! per byte), and positional (record fields, cases and flags by index, as in
//! the component's type).

#[cfg(not(test))]
use crate::error::lock;
#[cfg(not(test))]
use rustler::OwnedEnv;
#[cfg(not(test))]
use rustler::env::SavedTerm;
use rustler::{Env, Term};
use std::sync::Arc;
#[cfg(not(test))]
use std::sync::Mutex;
use wasmtime::component::ResourceAny;

#[derive(Debug)]
pub enum Value {
    Bool(bool),
    S8(i8),
    U8(u8),
    S16(i16),
    U16(u16),
    S32(i32),
    U32(u32),
    S64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Char(char),
    String(String),
    /// `list<u8>`.
    Bytes(Vec<u8>),
    List(Vec<Value>),
    /// Record fields or tuple items, in declaration order.
    Fields(Vec<Value>),
    /// Variant case (also `option`: 0 none, 1 some; `result`: 0 ok, 1 error)
    /// and its payload.
    Case(u32, Option<Box<Value>>),
    /// Enum case.
    Enum(u32),
    /// Flags as bits, 32 per word, flag `i` at bit `i % 32` of word `i / 32`.
    Flags(Vec<u32>),
    /// An `own` or `borrow` handle of a guest resource (or, straight out
    /// of the guest, of any resource: see `host_resource::leave`).
    Resource(ResourceAny),
    /// A host resource's Elixir state, between Elixir and the store's
    /// table of host resources (`host_resource`).
    HostTerm(HostTerm),
    /// A host resource as the guest's ABI sees it: its rep in the store's
    /// table and its resource type (an index into `Names`' resources).
    HostRep(u32, u32),
}

/// An Elixir term kept outside any process (in its own environment).
/// Test builds run outside the BEAM (see lib.rs): there it holds nothing, so
/// that dropping a `Value` links without the `enif_*` symbols.
pub struct Stored {
    #[cfg(not(test))]
    term: Mutex<(OwnedEnv, SavedTerm)>,
    /// Its size in term nodes: what copying it out costs (`convert::Work`).
    pub nodes: u64,
    /// About how many bytes the host keeps for it (`host_resource::Table`
    /// counts them against `max_host_bytes` and the node's budget).
    pub bytes: u64,
}

#[cfg(not(test))]
impl Stored {
    pub fn new(term: Term, nodes: u64, bytes: u64) -> Arc<Self> {
        let env = OwnedEnv::new();
        let saved = env.save(term);
        Arc::new(Stored {
            term: Mutex::new((env, saved)),
            nodes,
            bytes,
        })
    }

    /// The term, copied into `env`.
    pub fn load<'a>(&self, env: Env<'a>) -> Term<'a> {
        let stored = lock(&self.term);
        stored.0.run(|own| stored.1.load(own).in_env(env))
    }
}

#[cfg(test)]
impl Stored {
    pub fn new(_term: Term, nodes: u64, bytes: u64) -> Arc<Self> {
        Arc::new(Stored { nodes, bytes })
    }

    pub fn load<'a>(&self, env: Env<'a>) -> Term<'a> {
        rustler::types::atom::nil().to_term(env)
    }
}

/// A host resource's state on its way between Elixir and the table.
#[derive(Clone)]
pub struct HostTerm {
    pub stored: Arc<Stored>,
    /// Its resource type (an index into the component's resource names).
    pub resource: u32,
    /// Whether it goes into the guest as `own` (else `borrow`, for the
    /// length of one call).
    pub own: bool,
}

impl std::fmt::Debug for HostTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTerm({}, own: {})", self.resource, self.own)
    }
}
