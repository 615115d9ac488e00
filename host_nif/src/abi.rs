//! `Value`s in and out of a guest through the component model's canonical
//! ABI, without `wasmtime::component::Val`.
//!
//! Why not `Val`: it holds one 40-byte value per element, so a `list<u8>`
//! costs 40 bytes of host memory per byte and ~60 ns per byte, and wasmtime
//! caps what it lifts that way at 128 MiB of `Val`s (a 3.3 MB `list<u8>`),
//! which made large snapshots and records impossible. Here `list<u8>` and
//! strings move with one copy wherever they sit in a signature, and nothing
//! is materialised twice.
//!
//! How: a call's parameters and results are typed as `Lowered<N>` /
//! `Lifted<N>`, whose flat representation is `N` core values. wasmtime hands
//! them the function's real interface type (a tuple) and a lowering or
//! lifting context; the walk over that type is ours. `TypedFunc` is created
//! with `new_unchecked` for exports, so `N` must be the function's true flat
//! count (`flat_count`): every entry point re-checks it and bails on a
//! mismatch. Imports are typechecked by wasmtime at link time through
//! `typecheck` below.
//!
//! Everything read from guest memory is bounds-checked; a malformed value is
//! an error (a trap for the call), never a panic. Lifted data is charged
//! against the call's lift allowance (`set_lift_allowance`), so a guest
//! cannot make the host hold more than its own memory limit allows.
#![allow(unsafe_code)]

use crate::error::{HostTrap, TrapKind};
use crate::shape::Shape;
use crate::value::Value;
use std::cell::Cell;
use std::mem::MaybeUninit;
use wasmtime::ValRaw;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, ComponentTypes, InstanceType, InterfaceType, LiftContext, LowerContext,
};
use wasmtime::component::{
    ComponentNamedList, ComponentType, Lift, Lower, ResourceAny, ResourceDynamic,
};

/// Flat values the canonical ABI passes directly; beyond, through memory.
pub const MAX_FLAT_PARAMS: usize = 16;
pub const MAX_FLAT_RESULTS: usize = 1;

type Result<T> = wasmtime::Result<T>;

fn bad(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::msg(message.into())
}

// ------------------------------------------------------------- allowance

thread_local! {
    /// Units a lift on this thread may still produce (one per value, one per
    /// 8 bytes of string or list<u8>).
    static ALLOWANCE: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// Sets what the lifts of the next poll on this thread may produce.
pub fn set_lift_allowance(units: u64) {
    ALLOWANCE.with(|a| a.set(units));
}

fn charge(units: u64) -> Result<()> {
    ALLOWANCE.with(|a| {
        let left = a.get();
        if units > left {
            a.set(0);
            return Err(wasmtime::Error::new(HostTrap {
                kind: TrapKind::MemoryLimit,
                message: "the guest handed the host more data than its max_memory allows \
                          (results and import arguments are limited to max_memory / 8 values)"
                    .into(),
            }));
        }
        a.set(left - units);
        Ok(())
    })
}

// ------------------------------------------------------------- flat types

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flat {
    I32,
    I64,
    F32,
    F64,
}

fn join(a: Flat, b: Flat) -> Flat {
    match (a, b) {
        _ if a == b => a,
        (Flat::I32, Flat::F32) | (Flat::F32, Flat::I32) => Flat::I32,
        _ => Flat::I64,
    }
}

fn unsupported(ty: &InterfaceType) -> wasmtime::Error {
    bad(format!("values of type {ty:?} are not supported by Capsid"))
}

/// The core types `ty` flattens to (canonical ABI `flatten_type`).
fn flatten(types: &ComponentTypes, ty: &InterfaceType, out: &mut Vec<Flat>) -> Result<()> {
    use InterfaceType as T;
    match ty {
        T::Bool | T::S8 | T::U8 | T::S16 | T::U16 | T::S32 | T::U32 | T::Char => {
            out.push(Flat::I32)
        }
        T::Enum(_) | T::Own(_) | T::Borrow(_) => out.push(Flat::I32),
        T::S64 | T::U64 => out.push(Flat::I64),
        T::Float32 => out.push(Flat::F32),
        T::Float64 => out.push(Flat::F64),
        T::String | T::List(_) => out.extend([Flat::I32, Flat::I32]),
        T::Record(i) => {
            for f in types[*i].fields.iter() {
                flatten(types, &f.ty, out)?;
            }
        }
        T::Tuple(i) => {
            for t in types[*i].types.iter() {
                flatten(types, t, out)?;
            }
        }
        T::Flags(i) => out.extend(std::iter::repeat_n(
            Flat::I32,
            types[*i].names.len().div_ceil(32),
        )),
        T::Variant(i) => variant_flat(types, types[*i].cases.values().map(|c| c.as_ref()), out)?,
        T::Option(i) => variant_flat(types, [None, Some(&types[*i].ty)].into_iter(), out)?,
        T::Result(i) => {
            let r = &types[*i];
            variant_flat(types, [r.ok.as_ref(), r.err.as_ref()].into_iter(), out)?
        }
        other => return Err(unsupported(other)),
    }
    Ok(())
}

fn variant_flat<'t>(
    types: &ComponentTypes,
    cases: impl Iterator<Item = Option<&'t InterfaceType>>,
    out: &mut Vec<Flat>,
) -> Result<()> {
    out.push(Flat::I32);
    out.extend(joined(types, cases)?);
    Ok(())
}

/// The payload slots of a variant: each case's flat types, joined slot by slot.
fn joined<'t>(
    types: &ComponentTypes,
    cases: impl Iterator<Item = Option<&'t InterfaceType>>,
) -> Result<Vec<Flat>> {
    let mut slots: Vec<Flat> = Vec::new();
    let mut case = Vec::new();
    for payload in cases.flatten() {
        case.clear();
        flatten(types, payload, &mut case)?;
        for (i, t) in case.iter().enumerate() {
            match slots.get_mut(i) {
                Some(s) => *s = join(*s, *t),
                None => slots.push(*t),
            }
        }
    }
    Ok(slots)
}

/// How many core values a shape flattens to: the count `Lowered`/`Lifted`
/// must be instantiated with. Mirrors `flatten` (the joins do not change it).
pub fn shape_flat_count(shape: &Shape) -> usize {
    match shape {
        Shape::String | Shape::Bytes | Shape::List(_) => 2,
        Shape::Record(fields) => fields.iter().map(|(_, s)| shape_flat_count(s)).sum(),
        Shape::Tuple(items) => items.iter().map(shape_flat_count).sum(),
        Shape::Flags(names) => names.len().div_ceil(32),
        Shape::Variant(cases) => {
            1 + cases
                .iter()
                .map(|(_, s)| s.as_ref().map_or(0, shape_flat_count))
                .max()
                .unwrap_or(0)
        }
        Shape::Option(s) => 1 + shape_flat_count(s),
        Shape::Result(ok, err) => {
            1 + ok
                .as_deref()
                .map_or(0, shape_flat_count)
                .max(err.as_deref().map_or(0, shape_flat_count))
        }
        _ => 1,
    }
}

fn zero(t: Flat) -> ValRaw {
    match t {
        Flat::I32 => ValRaw::i32(0),
        Flat::I64 => ValRaw::i64(0),
        Flat::F32 => ValRaw::f32(0),
        Flat::F64 => ValRaw::f64(0),
    }
}

/// A payload value of type `have`, widened into a joined slot of type `want`.
fn widen(v: ValRaw, have: Flat, want: Flat) -> ValRaw {
    match (have, want) {
        _ if have == want => v,
        (Flat::F32, Flat::I32) => ValRaw::i32(v.get_f32() as i32),
        (Flat::I32, Flat::I64) => ValRaw::i64(i64::from(v.get_u32())),
        (Flat::F32, Flat::I64) => ValRaw::i64(i64::from(v.get_f32())),
        (Flat::F64, Flat::I64) => ValRaw::i64(v.get_f64() as i64),
        _ => v,
    }
}

/// A joined slot of type `have` read back as the payload's type `want`.
fn narrow(v: ValRaw, have: Flat, want: Flat) -> ValRaw {
    match (have, want) {
        _ if have == want => v,
        (Flat::I32, Flat::F32) => ValRaw::f32(v.get_u32()),
        (Flat::I64, Flat::I32) => ValRaw::i32(v.get_i64() as i32),
        (Flat::I64, Flat::F32) => ValRaw::f32(v.get_i64() as u32),
        (Flat::I64, Flat::F64) => ValRaw::f64(v.get_i64() as u64),
        _ => v,
    }
}

// ------------------------------------------------------------- helpers

fn abi<'t>(types: &'t ComponentTypes, ty: &InterfaceType) -> &'t CanonicalAbiInfo {
    types.canonical_abi(ty)
}

fn read<const N: usize>(memory: &[u8], offset: usize) -> Result<[u8; N]> {
    memory
        .get(offset..)
        .and_then(|m| m.first_chunk::<N>())
        .copied()
        .ok_or_else(|| bad("guest value out of bounds of memory"))
}

fn read_discriminant(memory: &[u8], offset: usize, size: usize) -> Result<u32> {
    Ok(match size {
        1 => u32::from(read::<1>(memory, offset)?[0]),
        2 => u32::from(u16::from_le_bytes(read::<2>(memory, offset)?)),
        _ => u32::from_le_bytes(read::<4>(memory, offset)?),
    })
}

fn write_discriminant<T>(cx: &mut LowerContext<'_, T>, offset: usize, size: usize, d: u32) {
    match size {
        1 => cx.get::<1>(offset)[0] = d as u8,
        2 => *cx.get::<2>(offset) = (d as u16).to_le_bytes(),
        _ => *cx.get::<4>(offset) = d.to_le_bytes(),
    }
}

fn check_case(index: u32, count: usize, what: &str) -> Result<()> {
    if (index as usize) < count {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid {what} discriminant {index} (the type has {count} cases)"
        )))
    }
}

/// A variant's case payload types, for any of the variant-like types.
fn cases<'t>(
    types: &'t ComponentTypes,
    ty: &InterfaceType,
) -> Option<(Vec<Option<&'t InterfaceType>>, usize, u32)> {
    use InterfaceType as T;
    Some(match ty {
        T::Variant(i) => {
            let v = &types[*i];
            (
                v.cases.values().map(|c| c.as_ref()).collect(),
                usize::from(v.info.size),
                v.info.payload_offset32,
            )
        }
        T::Option(i) => {
            let o = &types[*i];
            (
                vec![None, Some(&o.ty)],
                usize::from(o.info.size),
                o.info.payload_offset32,
            )
        }
        T::Result(i) => {
            let r = &types[*i];
            (
                vec![r.ok.as_ref(), r.err.as_ref()],
                usize::from(r.info.size),
                r.info.payload_offset32,
            )
        }
        _ => return None,
    })
}

/// A host resource's handle for the guest, `own` or `borrow` as its type
/// says (wasmtime checks the resource type itself).
fn host_handle(ty: &InterfaceType, rep: u32, id: u32) -> ResourceDynamic {
    match ty {
        InterfaceType::Own(_) => ResourceDynamic::new_own(rep, id),
        _ => ResourceDynamic::new_borrow(rep, id),
    }
}

fn mismatch(ty: &InterfaceType, v: &Value) -> wasmtime::Error {
    bad(format!(
        "internal: a value does not match its type ({ty:?} vs {v:?})"
    ))
}

// ------------------------------------------------------------- lowering

/// Stores `v` of type `ty` at `offset` of guest memory.
fn store<T>(
    cx: &mut LowerContext<'_, T>,
    ty: &InterfaceType,
    v: &Value,
    offset: usize,
) -> Result<()> {
    use InterfaceType as I;
    let types = cx.types;
    match (ty, v) {
        (I::Bool, Value::Bool(b)) => cx.get::<1>(offset)[0] = u8::from(*b),
        (I::S8, Value::S8(x)) => *cx.get::<1>(offset) = x.to_le_bytes(),
        (I::U8, Value::U8(x)) => *cx.get::<1>(offset) = x.to_le_bytes(),
        (I::S16, Value::S16(x)) => *cx.get::<2>(offset) = x.to_le_bytes(),
        (I::U16, Value::U16(x)) => *cx.get::<2>(offset) = x.to_le_bytes(),
        (I::S32, Value::S32(x)) => *cx.get::<4>(offset) = x.to_le_bytes(),
        (I::U32, Value::U32(x)) => *cx.get::<4>(offset) = x.to_le_bytes(),
        (I::S64, Value::S64(x)) => *cx.get::<8>(offset) = x.to_le_bytes(),
        (I::U64, Value::U64(x)) => *cx.get::<8>(offset) = x.to_le_bytes(),
        (I::Float32, Value::F32(x)) => *cx.get::<4>(offset) = x.to_bits().to_le_bytes(),
        (I::Float64, Value::F64(x)) => *cx.get::<8>(offset) = x.to_bits().to_le_bytes(),
        (I::Char, Value::Char(c)) => *cx.get::<4>(offset) = u32::from(*c).to_le_bytes(),
        (I::String, Value::String(s)) => s.as_str().linear_lower_to_memory(cx, *ty, offset)?,
        (I::List(_), Value::Bytes(b)) => b.as_slice().linear_lower_to_memory(cx, *ty, offset)?,
        (I::List(i), Value::List(items)) => {
            let (ptr, len) = store_list(cx, &types[*i].element, items)?;
            *cx.get::<4>(offset) = (ptr as u32).to_le_bytes();
            *cx.get::<4>(offset + 4) = (len as u32).to_le_bytes();
        }
        (I::Record(i), Value::Fields(vals)) => {
            let mut rel = 0usize;
            for (f, v) in types[*i].fields.iter().zip(vals) {
                let at = abi(types, &f.ty).next_field32_size(&mut rel);
                store(cx, &f.ty, v, offset + at)?;
            }
        }
        (I::Tuple(i), Value::Fields(vals)) => {
            let mut rel = 0usize;
            for (t, v) in types[*i].types.iter().zip(vals) {
                let at = abi(types, t).next_field32_size(&mut rel);
                store(cx, t, v, offset + at)?;
            }
        }
        (I::Enum(i), Value::Enum(d)) => {
            write_discriminant(cx, offset, usize::from(types[*i].info.size), *d);
        }
        (I::Flags(_), Value::Flags(words)) => {
            let size = abi(types, ty).size32 as usize;
            let word = |n: usize| words.get(n).copied().unwrap_or(0);
            match size {
                0 => {}
                1 => cx.get::<1>(offset)[0] = word(0) as u8,
                2 => *cx.get::<2>(offset) = (word(0) as u16).to_le_bytes(),
                _ => {
                    for n in 0..size / 4 {
                        *cx.get::<4>(offset + 4 * n) = word(n).to_le_bytes();
                    }
                }
            }
        }
        (I::Own(_) | I::Borrow(_), Value::Resource(r)) => {
            r.linear_lower_to_memory(cx, *ty, offset)?
        }
        (I::Own(_) | I::Borrow(_), Value::HostRep(rep, id)) => {
            host_handle(ty, *rep, *id).linear_lower_to_memory(cx, *ty, offset)?
        }
        (_, Value::Case(d, payload)) => {
            let (case_tys, dsize, payload_at) = cases(types, ty).ok_or_else(|| mismatch(ty, v))?;
            write_discriminant(cx, offset, dsize, *d);
            if let (Some(Some(pty)), Some(p)) = (case_tys.get(*d as usize), payload) {
                store(cx, pty, p, offset + payload_at as usize)?;
            }
        }
        _ => return Err(mismatch(ty, v)),
    }
    Ok(())
}

/// Allocates a list in guest memory and stores its items; returns (ptr, len).
fn store_list<T>(
    cx: &mut LowerContext<'_, T>,
    elem: &InterfaceType,
    items: &[Value],
) -> Result<(usize, usize)> {
    let a = abi(cx.types, elem);
    let (size, align) = (a.size32 as usize, a.align32);
    let total = items
        .len()
        .checked_mul(size)
        .filter(|t| *t <= u32::MAX as usize)
        .ok_or_else(|| bad("list too large for a 32-bit memory"))?;
    let ptr = cx.realloc(0, 0, align, total)?;
    for (i, item) in items.iter().enumerate() {
        store(cx, elem, item, ptr + i * size)?;
    }
    Ok((ptr, items.len()))
}

/// Lowers `v` of type `ty` into flat core values.
fn lower_flat<T>(
    cx: &mut LowerContext<'_, T>,
    ty: &InterfaceType,
    v: &Value,
    out: &mut Vec<ValRaw>,
) -> Result<()> {
    use InterfaceType as I;
    let types = cx.types;
    match (ty, v) {
        (I::Bool, Value::Bool(b)) => out.push(ValRaw::i32(i32::from(*b))),
        (I::S8, Value::S8(x)) => out.push(ValRaw::i32(i32::from(*x))),
        (I::U8, Value::U8(x)) => out.push(ValRaw::i32(i32::from(*x))),
        (I::S16, Value::S16(x)) => out.push(ValRaw::i32(i32::from(*x))),
        (I::U16, Value::U16(x)) => out.push(ValRaw::i32(i32::from(*x))),
        (I::S32, Value::S32(x)) => out.push(ValRaw::i32(*x)),
        (I::U32, Value::U32(x)) => out.push(ValRaw::u32(*x)),
        (I::S64, Value::S64(x)) => out.push(ValRaw::i64(*x)),
        (I::U64, Value::U64(x)) => out.push(ValRaw::u64(*x)),
        (I::Float32, Value::F32(x)) => out.push(ValRaw::f32(x.to_bits())),
        (I::Float64, Value::F64(x)) => out.push(ValRaw::f64(x.to_bits())),
        (I::Char, Value::Char(c)) => out.push(ValRaw::u32(u32::from(*c))),
        (I::String, Value::String(s)) => {
            let mut pair = MaybeUninit::<[ValRaw; 2]>::uninit();
            s.as_str().linear_lower_to_flat(cx, *ty, &mut pair)?;
            // SAFETY: a successful `linear_lower_to_flat` initialises `dst`.
            out.extend(unsafe { pair.assume_init() });
        }
        (I::List(_), Value::Bytes(b)) => {
            let mut pair = MaybeUninit::<[ValRaw; 2]>::uninit();
            b.as_slice().linear_lower_to_flat(cx, *ty, &mut pair)?;
            // SAFETY: as above.
            out.extend(unsafe { pair.assume_init() });
        }
        (I::List(i), Value::List(items)) => {
            let (ptr, len) = store_list(cx, &types[*i].element, items)?;
            out.push(ValRaw::u32(ptr as u32));
            out.push(ValRaw::u32(len as u32));
        }
        (I::Record(i), Value::Fields(vals)) => {
            for (f, v) in types[*i].fields.iter().zip(vals) {
                lower_flat(cx, &f.ty, v, out)?;
            }
        }
        (I::Tuple(i), Value::Fields(vals)) => {
            for (t, v) in types[*i].types.iter().zip(vals) {
                lower_flat(cx, t, v, out)?;
            }
        }
        (I::Enum(_), Value::Enum(d)) => out.push(ValRaw::u32(*d)),
        (I::Flags(i), Value::Flags(words)) => {
            for n in 0..types[*i].names.len().div_ceil(32) {
                out.push(ValRaw::u32(words.get(n).copied().unwrap_or(0)));
            }
        }
        (I::Own(_) | I::Borrow(_), Value::Resource(r)) => {
            let mut one = MaybeUninit::<[ValRaw; 1]>::uninit();
            // SAFETY: `ResourceAny::Lower` is one `ValRaw`; reinterpret the
            // one-element array as it.
            let dst = unsafe { &mut *one.as_mut_ptr().cast::<MaybeUninit<ValRaw>>() };
            r.linear_lower_to_flat(cx, *ty, dst)?;
            // SAFETY: initialised by the successful lowering above.
            out.extend(unsafe { one.assume_init() });
        }
        (I::Own(_) | I::Borrow(_), Value::HostRep(rep, id)) => {
            let mut one = MaybeUninit::<[ValRaw; 1]>::uninit();
            // SAFETY: `ResourceDynamic::Lower` is one `ValRaw`, as above.
            let dst = unsafe { &mut *one.as_mut_ptr().cast::<MaybeUninit<ValRaw>>() };
            host_handle(ty, *rep, *id).linear_lower_to_flat(cx, *ty, dst)?;
            // SAFETY: initialised by the successful lowering above.
            out.extend(unsafe { one.assume_init() });
        }
        (_, Value::Case(d, payload)) => {
            let (case_tys, _, _) = cases(types, ty).ok_or_else(|| mismatch(ty, v))?;
            let slots = joined(types, case_tys.iter().copied())?;
            out.push(ValRaw::u32(*d));
            let mut written = 0;
            if let (Some(Some(pty)), Some(p)) = (case_tys.get(*d as usize), payload) {
                let mut have = Vec::new();
                flatten(types, pty, &mut have)?;
                let mut vals = Vec::with_capacity(have.len());
                lower_flat(cx, pty, p, &mut vals)?;
                for ((v, h), w) in vals.into_iter().zip(have).zip(slots.iter()) {
                    out.push(widen(v, h, *w));
                    written += 1;
                }
            }
            out.extend(slots[written..].iter().map(|t| zero(*t)));
        }
        _ => return Err(mismatch(ty, v)),
    }
    Ok(())
}

// ------------------------------------------------------------- lifting

/// Loads a value of type `ty` from `offset` of guest memory.
fn load(cx: &mut LiftContext<'_>, ty: &InterfaceType, offset: usize) -> Result<Value> {
    use InterfaceType as I;
    let types: &ComponentTypes = cx.types;
    let memory = cx.memory();
    charge(1)?;
    Ok(match ty {
        I::Bool => Value::Bool(read::<1>(memory, offset)?[0] != 0),
        I::S8 => Value::S8(i8::from_le_bytes(read(memory, offset)?)),
        I::U8 => Value::U8(read::<1>(memory, offset)?[0]),
        I::S16 => Value::S16(i16::from_le_bytes(read(memory, offset)?)),
        I::U16 => Value::U16(u16::from_le_bytes(read(memory, offset)?)),
        I::S32 => Value::S32(i32::from_le_bytes(read(memory, offset)?)),
        I::U32 => Value::U32(u32::from_le_bytes(read(memory, offset)?)),
        I::S64 => Value::S64(i64::from_le_bytes(read(memory, offset)?)),
        I::U64 => Value::U64(u64::from_le_bytes(read(memory, offset)?)),
        I::Float32 => Value::F32(f32::from_bits(u32::from_le_bytes(read(memory, offset)?))),
        I::Float64 => Value::F64(f64::from_bits(u64::from_le_bytes(read(memory, offset)?))),
        I::Char => {
            let cp = u32::from_le_bytes(read(memory, offset)?);
            Value::Char(char::from_u32(cp).ok_or_else(|| bad(format!("invalid char {cp:#x}")))?)
        }
        I::String => {
            let bytes = memory
                .get(offset..offset + 8)
                .ok_or_else(|| bad("string out of bounds"))?;
            let (_, len) = pair(bytes);
            charge(len as u64 / 8)?;
            Value::String(String::linear_lift_from_memory(cx, *ty, bytes)?)
        }
        I::List(i) => {
            let bytes = memory
                .get(offset..offset + 8)
                .ok_or_else(|| bad("list out of bounds"))?;
            let elem = types[*i].element;
            if matches!(elem, I::U8) {
                let (_, len) = pair(bytes);
                charge(len as u64 / 8)?;
                Value::Bytes(Vec::<u8>::linear_lift_from_memory(cx, *ty, bytes)?)
            } else {
                let (ptr, len) = pair(bytes);
                Value::List(load_list(cx, &elem, ptr, len)?)
            }
        }
        I::Record(i) => {
            let mut rel = 0usize;
            let mut vals = Vec::with_capacity(types[*i].fields.len());
            for f in types[*i].fields.iter() {
                let at = abi(types, &f.ty).next_field32_size(&mut rel);
                vals.push(load(cx, &f.ty, offset + at)?);
            }
            Value::Fields(vals)
        }
        I::Tuple(i) => {
            let mut rel = 0usize;
            let mut vals = Vec::with_capacity(types[*i].types.len());
            for t in types[*i].types.iter() {
                let at = abi(types, t).next_field32_size(&mut rel);
                vals.push(load(cx, t, offset + at)?);
            }
            Value::Fields(vals)
        }
        I::Enum(i) => {
            let e = &types[*i];
            let d = read_discriminant(memory, offset, usize::from(e.info.size))?;
            check_case(d, e.names.len(), "enum")?;
            Value::Enum(d)
        }
        I::Flags(i) => {
            let count = types[*i].names.len();
            let size = abi(types, ty).size32 as usize;
            let mut words = match size {
                0 => Vec::new(),
                1 => vec![u32::from(read::<1>(memory, offset)?[0])],
                2 => vec![u32::from(u16::from_le_bytes(read(memory, offset)?))],
                _ => (0..size / 4)
                    .map(|n| read::<4>(memory, offset + 4 * n).map(u32::from_le_bytes))
                    .collect::<Result<_>>()?,
            };
            mask_flags(&mut words, count);
            Value::Flags(words)
        }
        I::Own(_) | I::Borrow(_) => {
            let bytes = memory
                .get(offset..offset + 4)
                .ok_or_else(|| bad("handle out of bounds"))?;
            Value::Resource(ResourceAny::linear_lift_from_memory(cx, *ty, bytes)?)
        }
        other => match cases(types, other) {
            Some((case_tys, dsize, payload_at)) => {
                let d = read_discriminant(memory, offset, dsize)?;
                check_case(d, case_tys.len(), "variant")?;
                let payload = match case_tys[d as usize] {
                    Some(pty) => Some(Box::new(load(cx, pty, offset + payload_at as usize)?)),
                    None => None,
                };
                Value::Case(d, payload)
            }
            None => return Err(unsupported(other)),
        },
    })
}

/// Flags bits beyond the declared flags are ignored, as the canonical ABI says.
fn mask_flags(words: &mut [u32], count: usize) {
    if let Some(last) = words.last_mut()
        && !count.is_multiple_of(32)
    {
        *last &= (1u32 << (count % 32)) - 1;
    }
}

fn pair(bytes: &[u8]) -> (usize, usize) {
    let ptr = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    (ptr, len)
}

fn load_list(
    cx: &mut LiftContext<'_>,
    elem: &InterfaceType,
    ptr: usize,
    len: usize,
) -> Result<Vec<Value>> {
    let a = abi(cx.types, elem);
    let (size, align) = (a.size32 as usize, a.align32 as usize);
    if !ptr.is_multiple_of(align.max(1)) {
        return Err(bad("list pointer is not aligned"));
    }
    match len.checked_mul(size).and_then(|n| ptr.checked_add(n)) {
        Some(end) if end <= cx.memory().len() => {}
        _ => return Err(bad("list pointer/length out of bounds of memory")),
    }
    charge(len as u64)?;
    let mut items = Vec::with_capacity(len);
    for i in 0..len {
        items.push(load(cx, elem, ptr + i * size)?);
    }
    Ok(items)
}

/// Core values read one by one.
struct Src<'s> {
    vals: &'s [ValRaw],
    at: usize,
}

impl Src<'_> {
    fn next(&mut self) -> Result<ValRaw> {
        let v = self
            .vals
            .get(self.at)
            .copied()
            .ok_or_else(|| bad("internal: fewer flat values than the type needs"))?;
        self.at += 1;
        Ok(v)
    }
}

/// Lifts a value of type `ty` from flat core values.
fn lift_flat(cx: &mut LiftContext<'_>, ty: &InterfaceType, src: &mut Src) -> Result<Value> {
    use InterfaceType as I;
    let types: &ComponentTypes = cx.types;
    charge(1)?;
    Ok(match ty {
        I::Bool => Value::Bool(src.next()?.get_i32() != 0),
        I::S8 => Value::S8(src.next()?.get_i32() as i8),
        I::U8 => Value::U8(src.next()?.get_u32() as u8),
        I::S16 => Value::S16(src.next()?.get_i32() as i16),
        I::U16 => Value::U16(src.next()?.get_u32() as u16),
        I::S32 => Value::S32(src.next()?.get_i32()),
        I::U32 => Value::U32(src.next()?.get_u32()),
        I::S64 => Value::S64(src.next()?.get_i64()),
        I::U64 => Value::U64(src.next()?.get_u64()),
        I::Float32 => Value::F32(f32::from_bits(src.next()?.get_f32())),
        I::Float64 => Value::F64(f64::from_bits(src.next()?.get_f64())),
        I::Char => {
            let cp = src.next()?.get_u32();
            Value::Char(char::from_u32(cp).ok_or_else(|| bad(format!("invalid char {cp:#x}")))?)
        }
        I::String => {
            let p = [src.next()?, src.next()?];
            charge(u64::from(p[1].get_u32()) / 8)?;
            Value::String(String::linear_lift_from_flat(cx, *ty, &p)?)
        }
        I::List(i) => {
            let p = [src.next()?, src.next()?];
            let elem = types[*i].element;
            if matches!(elem, I::U8) {
                charge(u64::from(p[1].get_u32()) / 8)?;
                Value::Bytes(Vec::<u8>::linear_lift_from_flat(cx, *ty, &p)?)
            } else {
                Value::List(load_list(
                    cx,
                    &elem,
                    p[0].get_u32() as usize,
                    p[1].get_u32() as usize,
                )?)
            }
        }
        I::Record(i) => {
            let mut vals = Vec::with_capacity(types[*i].fields.len());
            for f in types[*i].fields.iter() {
                vals.push(lift_flat(cx, &f.ty, src)?);
            }
            Value::Fields(vals)
        }
        I::Tuple(i) => {
            let mut vals = Vec::with_capacity(types[*i].types.len());
            for t in types[*i].types.iter() {
                vals.push(lift_flat(cx, t, src)?);
            }
            Value::Fields(vals)
        }
        I::Enum(i) => {
            let d = src.next()?.get_u32();
            check_case(d, types[*i].names.len(), "enum")?;
            Value::Enum(d)
        }
        I::Flags(i) => {
            let count = types[*i].names.len();
            let mut words = (0..count.div_ceil(32))
                .map(|_| src.next().map(|v| v.get_u32()))
                .collect::<Result<Vec<_>>>()?;
            mask_flags(&mut words, count);
            Value::Flags(words)
        }
        I::Own(_) | I::Borrow(_) => {
            let v = src.next()?;
            Value::Resource(ResourceAny::linear_lift_from_flat(cx, *ty, &v)?)
        }
        other => match cases(types, other) {
            Some((case_tys, _, _)) => {
                let d = src.next()?.get_u32();
                check_case(d, case_tys.len(), "variant")?;
                let slots = joined(types, case_tys.iter().copied())?;
                let raw: Vec<ValRaw> = (0..slots.len())
                    .map(|_| src.next())
                    .collect::<Result<_>>()?;
                match case_tys[d as usize] {
                    Some(pty) => {
                        let mut want = Vec::new();
                        flatten(types, pty, &mut want)?;
                        let vals: Vec<ValRaw> = raw
                            .iter()
                            .zip(slots.iter())
                            .zip(want.iter())
                            .map(|((v, have), want)| narrow(*v, *have, *want))
                            .collect();
                        let payload = lift_flat(cx, pty, &mut Src { vals: &vals, at: 0 })?;
                        Value::Case(d, Some(Box::new(payload)))
                    }
                    None => Value::Case(d, None),
                }
            }
            None => return Err(unsupported(other)),
        },
    })
}

// ------------------------------------------------------------- the typed façades

/// A function's parameters (host → guest) or an import's results.
pub struct Lowered<const N: usize>(pub Vec<Value>);

/// A function's results (guest → host) or an import's parameters.
pub struct Lifted<const N: usize>(pub Vec<Value>);

const fn dyn_abi(n: usize) -> CanonicalAbiInfo {
    // Never used to lay out memory: `Lowered`/`Lifted` do their own layout
    // from the real type. Size 0 makes wasmtime's own slicing a no-op.
    CanonicalAbiInfo {
        size32: 0,
        align32: 1,
        size64: 0,
        align64: 1,
        flat_count: Some(n as u8),
    }
}

fn tuple<'t>(types: &'t ComponentTypes, ty: &InterfaceType) -> Result<&'t [InterfaceType]> {
    match ty {
        InterfaceType::Tuple(i) => Ok(&types[*i].types),
        _ => Err(bad("internal: parameters and results are tuples")),
    }
}

/// `Some(count)` when the tuple is passed flat within `max` core values.
fn flat_within(types: &ComponentTypes, ty: &InterfaceType, max: usize) -> Option<usize> {
    types.canonical_abi(ty).flat_count(max)
}

unsafe impl<const N: usize> ComponentType for Lowered<N> {
    type Lower = [ValRaw; N];
    const ABI: CanonicalAbiInfo = dyn_abi(N);

    /// Called when linking an import: `N` must be its results' flat count.
    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        let expected = flat_within(types.types, ty, MAX_FLAT_RESULTS).unwrap_or(0);
        if expected == N {
            Ok(())
        } else {
            Err(bad(format!(
                "internal: import results flatten to {expected}, not {N}"
            )))
        }
    }
}

unsafe impl<const N: usize> ComponentNamedList for Lowered<N> {}

unsafe impl<const N: usize> Lower for Lowered<N> {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> Result<()> {
        let types = cx.types;
        let items = tuple(types, &ty)?;
        if items.len() != self.0.len() {
            return Err(bad(
                "internal: wrong number of values for the function's type",
            ));
        }
        let mut out: Vec<ValRaw> = Vec::with_capacity(N);
        match flat_within(types, &ty, MAX_FLAT_PARAMS) {
            Some(k) if k == N => {
                for (t, v) in items.iter().zip(&self.0) {
                    lower_flat(cx, t, v, &mut out)?;
                }
            }
            None if N == 1 => {
                // More than 16 flat values: the parameters go through memory
                // and the function gets a pointer (canonical ABI).
                let a = types.canonical_abi(&ty);
                let ptr = cx.realloc(0, 0, a.align32, a.size32 as usize)?;
                let mut rel = 0usize;
                for (t, v) in items.iter().zip(&self.0) {
                    let at = abi(types, t).next_field32_size(&mut rel);
                    store(cx, t, v, ptr + at)?;
                }
                // Written as an i64, as wasmtime does ("WRITEPTR64").
                out.push(ValRaw::i64(ptr as i64));
            }
            other => {
                return Err(bad(format!(
                    "internal: the parameters flatten to {other:?} core values, not {N}"
                )));
            }
        }
        if out.len() != N {
            return Err(bad(
                "internal: flat lowering produced the wrong number of values",
            ));
        }
        let dst = dst.as_mut_ptr().cast::<ValRaw>();
        for (i, v) in out.into_iter().enumerate() {
            // SAFETY: `dst` is `[ValRaw; N]` and `i < N` (checked above).
            unsafe { dst.add(i).write(v) };
        }
        Ok(())
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        offset: usize,
    ) -> Result<()> {
        let types = cx.types;
        let items = tuple(types, &ty)?;
        let mut rel = 0usize;
        for (t, v) in items.iter().zip(&self.0) {
            let at = abi(types, t).next_field32_size(&mut rel);
            store(cx, t, v, offset + at)?;
        }
        Ok(())
    }
}

unsafe impl<const N: usize> ComponentType for Lifted<N> {
    type Lower = [ValRaw; N];
    const ABI: CanonicalAbiInfo = dyn_abi(N);

    /// Called when linking an import: `N` must be its parameters' flat count
    /// (1 when they go through memory).
    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        let expected = flat_within(types.types, ty, MAX_FLAT_PARAMS).unwrap_or(1);
        if expected == N {
            Ok(())
        } else {
            Err(bad(format!(
                "internal: import parameters flatten to {expected}, not {N}"
            )))
        }
    }
}

unsafe impl<const N: usize> ComponentNamedList for Lifted<N> {}

unsafe impl<const N: usize> Lift for Lifted<N> {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> Result<Self> {
        let types: &ComponentTypes = cx.types;
        let items = tuple(types, &ty)?;
        match flat_within(types, &ty, MAX_FLAT_PARAMS) {
            Some(k) if k <= N => {
                let mut src = Src { vals: src, at: 0 };
                let mut vals = Vec::with_capacity(items.len());
                for t in items {
                    vals.push(lift_flat(cx, t, &mut src)?);
                }
                Ok(Lifted(vals))
            }
            _ if N == 1 => {
                // A result that does not fit in one core value: the function
                // returned a pointer to it.
                let ptr = src[0].get_u32() as usize;
                lift_tuple_from(cx, &ty, ptr).map(Lifted)
            }
            other => Err(bad(format!(
                "internal: the results flatten to {other:?}, not {N}"
            ))),
        }
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> Result<Self> {
        // wasmtime sliced `bytes` with our size (0); recover the offset.
        let base = cx.memory().as_ptr() as usize;
        let offset = (bytes.as_ptr() as usize)
            .checked_sub(base)
            .ok_or_else(|| bad("internal: parameters outside memory"))?;
        lift_tuple_from(cx, &ty, offset).map(Lifted)
    }
}

fn lift_tuple_from(
    cx: &mut LiftContext<'_>,
    ty: &InterfaceType,
    offset: usize,
) -> Result<Vec<Value>> {
    let types: &ComponentTypes = cx.types;
    let a = types.canonical_abi(ty);
    if !offset.is_multiple_of(a.align32.max(1) as usize) {
        return Err(bad("return pointer not aligned"));
    }
    match offset.checked_add(a.size32 as usize) {
        Some(end) if end <= cx.memory().len() => {}
        _ => return Err(bad("return pointer out of bounds of memory")),
    }
    let items = tuple(types, ty)?;
    let mut rel = 0usize;
    let mut vals = Vec::with_capacity(items.len());
    for t in items {
        let at = abi(types, t).next_field32_size(&mut rel);
        vals.push(load(cx, t, offset + at)?);
    }
    Ok(vals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_follow_the_canonical_abi() {
        assert_eq!(join(Flat::I32, Flat::I32), Flat::I32);
        assert_eq!(join(Flat::I32, Flat::F32), Flat::I32);
        assert_eq!(join(Flat::F32, Flat::F64), Flat::I64);
        assert_eq!(join(Flat::I32, Flat::I64), Flat::I64);
    }

    #[test]
    fn widening_and_narrowing_round_trip() {
        let f = ValRaw::f32(1.5f32.to_bits());
        let back = narrow(widen(f, Flat::F32, Flat::I64), Flat::I64, Flat::F32);
        assert_eq!(f32::from_bits(back.get_f32()), 1.5);
        let d = ValRaw::f64((-2.25f64).to_bits());
        let back = narrow(widen(d, Flat::F64, Flat::I64), Flat::I64, Flat::F64);
        assert_eq!(f64::from_bits(back.get_f64()), -2.25);
        let i = ValRaw::u32(0xFFFF_FFFF);
        let back = narrow(widen(i, Flat::I32, Flat::I64), Flat::I64, Flat::I32);
        assert_eq!(back.get_u32(), 0xFFFF_FFFF);
    }

    #[test]
    fn extra_flag_bits_are_masked() {
        let mut w = vec![0xFFFF_FFFF];
        mask_flags(&mut w, 4);
        assert_eq!(w, vec![0xF]);
        let mut w = vec![0xFFFF_FFFF];
        mask_flags(&mut w, 32);
        assert_eq!(w, vec![0xFFFF_FFFF]);
    }

    #[test]
    fn the_lift_allowance_runs_out() {
        set_lift_allowance(10);
        assert!(charge(10).is_ok());
        assert!(charge(1).is_err());
        set_lift_allowance(u64::MAX);
    }
}
