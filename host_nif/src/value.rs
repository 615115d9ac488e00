//! A component value in transit between Elixir terms and the guest's
//! canonical ABI: owned (it outlives the NIF call that made it when a call is
//! suspended), compact (`list<u8>` and strings are one buffer, not one value
//! per byte), and positional (record fields, cases and flags by index, as in
//! the component's type).

use crate::host_resource::HostTerm;
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
