//! Elixir terms ↔ `Value`s, walking a function's compiled types (`Shape`,
//! DESIGN.md section 2). Argument errors name the path to the offending value
//! and the expected WIT type, e.g. `args[0].points[2].x: expected f64, got "a"`.
//!
//! Every term from a caller is hostile: lists may be improper (checked cell
//! by cell, never with rustler's list iterator, which panics on them), maps
//! and tuples may be anything, integers may be bignums. No atom is ever
//! created here: names were made atoms when the component was loaded.
//!
//! Conversions are bounded by a work budget: a normal scheduler converts at
//! most `WORK_BUDGET` units (about a millisecond) and then gives up with
//! `Conv::Over`, so that the caller redoes the work on a dirty scheduler.

use crate::error::Error;
use crate::shape::{Names, Shape, kebab_to_snake, wit_name};
use crate::value::Value;
use crate::value::{HostTerm, Stored};
use rustler::types::map::MapIterator;
use rustler::types::tuple::{get_tuple, make_tuple};
use rustler::{Atom, Binary, Encoder, Env, NewBinary, Term, TermType};
use std::fmt::Write;

rustler::atoms! {
    nil,
    ok,
    error,
    some,
    nan,
    infinity,
    neg_infinity,
    __struct__,
    map,
    r#true = "true",
    r#false = "false",
    // Elixir's MapSet module name, accepted for flags.
    mapset = "Elixir.MapSet",
}

/// Units of conversion work a normal scheduler may do in one NIF call:
/// about a millisecond (a unit is one term node, or 256 bytes copied).
pub const WORK_BUDGET: u64 = 20_000;

/// Why a conversion stopped.
#[derive(Debug)]
pub enum Conv {
    Bad(Error),
    /// The budget ran out: redo it where time does not matter.
    Over,
}

impl From<Error> for Conv {
    fn from(e: Error) -> Self {
        Conv::Bad(e)
    }
}

pub type ConvResult<T> = std::result::Result<T, Conv>;

/// Remaining work units (`u64::MAX`: unbounded, on a dirty scheduler).
pub struct Work(pub u64);

impl Work {
    pub fn bounded() -> Self {
        Work(WORK_BUDGET)
    }

    pub fn unbounded() -> Self {
        Work(u64::MAX)
    }

    pub fn spend(&mut self, units: u64) -> ConvResult<()> {
        if units > self.0 {
            return Err(Conv::Over);
        }
        self.0 -= units;
        Ok(())
    }
}

/// One step of the path from `args` to the value being converted. Field
/// and case names are the type's own (WIT, kebab-case), borrowed: they are
/// written in Elixir's snake_case only when an error is rendered.
#[derive(Debug, Clone)]
pub enum Seg<'n> {
    Arg(usize),
    Field(&'n str),
    Index(usize),
    Elem(usize),
    Case(&'n str),
}

/// Path to the value being converted, rendered only when an error happens.
/// Building it allocates nothing until a value nests (a `String` per record
/// field and a `Vec` per argument were a visible share of a trivial call).
#[derive(Debug, Clone)]
pub struct Path<'n> {
    first: Seg<'n>,
    rest: Vec<Seg<'n>>,
}

impl<'n> Path<'n> {
    pub fn arg(i: usize) -> Self {
        Path {
            first: Seg::Arg(i),
            rest: Vec::new(),
        }
    }

    pub fn root(label: &'n str) -> Self {
        Path {
            first: Seg::Field(label),
            rest: Vec::new(),
        }
    }

    fn with<T>(&mut self, seg: Seg<'n>, f: impl FnOnce(&mut Self) -> T) -> T {
        self.rest.push(seg);
        let out = f(self);
        self.rest.pop();
        out
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for seg in std::iter::once(&self.first).chain(&self.rest) {
            let _ = match seg {
                Seg::Arg(i) => write!(out, "args[{i}]"),
                Seg::Field(f) if out.is_empty() => write!(out, "{}", kebab_to_snake(f)),
                Seg::Field(f) => write!(out, ".{}", kebab_to_snake(f)),
                Seg::Index(i) => write!(out, "[{i}]"),
                Seg::Elem(i) => write!(out, ".{i}"),
                Seg::Case(c) => write!(out, "({})", kebab_to_snake(c)),
            };
        }
        out
    }

    fn error(&self, expected: impl std::fmt::Display, got: Term) -> Conv {
        Conv::Bad(Error::BadArgument(format!(
            "{}: expected {expected}, got {}",
            self.render(),
            render_term(got)
        )))
    }

    fn fail(&self, message: impl std::fmt::Display) -> Conv {
        Conv::Bad(Error::BadArgument(format!("{}: {message}", self.render())))
    }
}

// ------------------------------------------------------------- list cells

/// The elements of a proper list, or `None` (not a list, or improper).
/// Costs one unit per element.
pub fn proper_list<'a>(term: Term<'a>, work: &mut Work) -> ConvResult<Option<Vec<Term<'a>>>> {
    let mut items = Vec::new();
    let mut rest = term;
    loop {
        if rest.is_empty_list() {
            return Ok(Some(items));
        }
        match rest.list_get_cell() {
            Ok((head, tail)) => {
                work.spend(1)?;
                items.push(head);
                rest = tail;
            }
            Err(_) => return Ok(None),
        }
    }
}

/// An `inspect`-like rendering of a term, bounded in size, for error messages.
pub fn render_term(term: Term) -> String {
    let mut out = String::new();
    render_into(term, &mut out, 3);
    if out.len() > 120 {
        let mut cut = 117;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

fn render_into(term: Term, out: &mut String, depth: usize) {
    if depth == 0 {
        out.push_str("...");
        return;
    }
    match term.get_type() {
        TermType::Atom => {
            let name = term.atom_to_string().unwrap_or_default();
            if matches!(name.as_str(), "nil" | "true" | "false") {
                out.push_str(&name);
            } else {
                let _ = write!(out, ":{name}");
            }
        }
        TermType::Integer => match int_wide(term) {
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => out.push_str("<big integer>"),
        },
        TermType::Float => {
            let _ = write!(out, "{:?}", term.decode::<f64>().unwrap_or(f64::NAN));
        }
        TermType::Binary => {
            let Ok(bin) = Binary::from_term(term).map(|b| b.as_slice()) else {
                out.push_str("<<bitstring>>");
                return;
            };
            match std::str::from_utf8(&bin[..bin.len().min(200)]) {
                Ok(s) => {
                    let _ = write!(out, "{s:?}");
                }
                Err(_) => {
                    let bytes: Vec<String> = bin.iter().take(16).map(|b| b.to_string()).collect();
                    let more = if bin.len() > 16 { ", ..." } else { "" };
                    let _ = write!(out, "<<{}{more}>>", bytes.join(", "));
                }
            }
        }
        TermType::List => {
            out.push('[');
            let mut rest = term;
            let mut i = 0;
            loop {
                if rest.is_empty_list() {
                    break;
                }
                match rest.list_get_cell() {
                    Ok((head, tail)) => {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        if i == 8 {
                            out.push_str("...");
                            break;
                        }
                        render_into(head, out, depth - 1);
                        rest = tail;
                        i += 1;
                    }
                    Err(_) => {
                        out.push_str(" | ");
                        render_into(rest, out, depth - 1);
                        break;
                    }
                }
            }
            out.push(']');
        }
        TermType::Tuple => {
            out.push('{');
            let items = get_tuple(term).unwrap_or_default();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                if i == 8 {
                    out.push_str("...");
                    break;
                }
                render_into(*item, out, depth - 1);
            }
            out.push('}');
        }
        TermType::Map => {
            out.push_str("%{");
            if let Some(iter) = MapIterator::new(term) {
                for (i, (k, v)) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    if i == 8 {
                        out.push_str("...");
                        break;
                    }
                    render_into(k, out, depth - 1);
                    out.push_str(" => ");
                    render_into(v, out, depth - 1);
                }
            }
            out.push('}');
        }
        TermType::Fun => out.push_str("#Function<>"),
        TermType::Pid => out.push_str("#PID<>"),
        TermType::Port => out.push_str("#Port<>"),
        TermType::Ref => out.push_str("#Reference<>"),
        TermType::Unknown => out.push_str("<term>"),
    }
}

// ---------------------------------------------------------------- term → Value

/// An integer term's value when it fits 64 bits (signed or unsigned).
/// rustler's own 128-bit decoding is not used: it silently changes the
/// value of some bignums.
fn int_of(term: Term) -> Option<i128> {
    if term.get_type() != TermType::Integer {
        return None;
    }
    if let Ok(i) = term.decode::<i64>() {
        return Some(i128::from(i));
    }
    term.decode::<u64>().ok().map(i128::from)
}

/// A bignum's sign and little-endian magnitude bytes, read from the
/// external term format (SMALL_BIG_EXT or LARGE_BIG_EXT).
fn big_digits(term: Term) -> Option<(bool, Vec<u8>)> {
    let bin = term.to_binary();
    let bytes = bin.as_slice();
    let (n, rest) = match bytes {
        [131, 110, n, rest @ ..] => (usize::from(*n), rest),
        [131, 111, a, b, c, d, rest @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]) as usize, rest),
        _ => return None,
    };
    let (sign, digits) = rest.split_first()?;
    Some((*sign != 0, digits.get(..n)?.to_vec()))
}

/// Any integer term that fits 128 bits, for messages (exactly, unlike
/// rustler's 128-bit decoding).
fn int_wide(term: Term) -> Option<i128> {
    if let Some(i) = int_of(term) {
        return Some(i);
    }
    let (negative, digits) = big_digits(term)?;
    if digits.len() > 16 {
        return None;
    }
    let magnitude = digits
        .iter()
        .rev()
        .fold(0u128, |acc, d| (acc << 8) | u128::from(*d));
    if negative {
        0i128.checked_sub_unsigned(magnitude)
    } else {
        i128::try_from(magnitude).ok()
    }
}

/// Any integer term as the nearest float, bignums included.
fn int_to_f64(term: Term) -> Option<f64> {
    if let Some(i) = int_of(term) {
        return Some(i as f64);
    }
    let (negative, digits) = big_digits(term)?;
    let magnitude = digits
        .iter()
        .rev()
        .fold(0.0f64, |acc, d| acc * 256.0 + f64::from(*d));
    Some(if negative { -magnitude } else { magnitude })
}

fn is_atom(term: Term, atom: Atom) -> bool {
    term.as_c_arg() == atom.as_c_arg()
}

fn int_range(shape: &Shape) -> (i128, i128) {
    match shape {
        Shape::S8 => (i8::MIN.into(), i8::MAX.into()),
        Shape::U8 => (0, u8::MAX.into()),
        Shape::S16 => (i16::MIN.into(), i16::MAX.into()),
        Shape::U16 => (0, u16::MAX.into()),
        Shape::S32 => (i32::MIN.into(), i32::MAX.into()),
        Shape::U32 => (0, u32::MAX.into()),
        Shape::S64 => (i64::MIN.into(), i64::MAX.into()),
        _ => (0, u64::MAX.into()),
    }
}

/// The float named by one of the special atoms.
fn special_float(term: Term) -> Option<f64> {
    if is_atom(term, nan()) {
        Some(f64::NAN)
    } else if is_atom(term, infinity()) {
        Some(f64::INFINITY)
    } else if is_atom(term, neg_infinity()) {
        Some(f64::NEG_INFINITY)
    } else {
        None
    }
}

fn float_of(term: Term, name: &str, path: &Path) -> ConvResult<f64> {
    match term.get_type() {
        TermType::Float => Ok(term.decode::<f64>().unwrap_or(f64::NAN)),
        TermType::Integer => int_to_f64(term)
            .ok_or_else(|| path.fail(format!("expected {name}, got an integer out of range"))),
        TermType::Atom => special_float(term).ok_or_else(|| {
            path.error(
                format!("{name} (a number, :nan, :infinity or :neg_infinity)"),
                term,
            )
        }),
        _ => Err(path.error(name, term)),
    }
}

fn case_of(
    names: &Names,
    ids: impl Iterator<Item = crate::shape::NameId>,
    atom: Term,
) -> Option<u32> {
    let id = names.of_atom(Atom::from_term(atom).ok()?)?;
    ids.enumerate()
        .find(|(_, c)| *c == id)
        .map(|(i, _)| i as u32)
}

/// Converts an Elixir value to a `Value` of the type `shape`.
pub fn term_to_value<'n>(
    term: Term,
    shape: &Shape,
    names: &'n Names,
    path: &mut Path<'n>,
    work: &mut Work,
) -> ConvResult<Value> {
    work.spend(1)?;
    match shape {
        Shape::Bool => {
            if is_atom(term, r#true()) {
                Ok(Value::Bool(true))
            } else if is_atom(term, r#false()) {
                Ok(Value::Bool(false))
            } else {
                Err(path.error("bool", term))
            }
        }
        Shape::S8
        | Shape::U8
        | Shape::S16
        | Shape::U16
        | Shape::S32
        | Shape::U32
        | Shape::S64
        | Shape::U64 => {
            // The type's name only for an error: a String per argument
            // was a visible share of a trivial call.
            let name = || wit_name(shape, names);
            if term.get_type() != TermType::Integer {
                return Err(path.error(name(), term));
            }
            let (lo, hi) = int_range(shape);
            let v = match int_wide(term).ok_or(()) {
                Ok(v) if v >= lo && v <= hi => v,
                Ok(v) => {
                    return Err(path.fail(format!("expected {} ({lo}..{hi}), got {v}", name())));
                }
                Err(_) => {
                    return Err(path.fail(format!(
                        "expected {}, got an integer out of range ({lo}..{hi})",
                        name()
                    )));
                }
            };
            // In range, so the casts are exact.
            Ok(match shape {
                Shape::S8 => Value::S8(v as i8),
                Shape::U8 => Value::U8(v as u8),
                Shape::S16 => Value::S16(v as i16),
                Shape::U16 => Value::U16(v as u16),
                Shape::S32 => Value::S32(v as i32),
                Shape::U32 => Value::U32(v as u32),
                Shape::S64 => Value::S64(v as i64),
                _ => Value::U64(v as u64),
            })
        }
        Shape::F32 => {
            let f = float_of(term, "f32", path)?;
            let narrowed = f as f32;
            if f.is_finite() && !narrowed.is_finite() {
                return Err(path.fail(format!(
                    "expected f32, got {f:?}, which is out of the range of f32 (±{:e})",
                    f32::MAX
                )));
            }
            Ok(Value::F32(narrowed))
        }
        Shape::F64 => Ok(Value::F64(float_of(term, "f64", path)?)),
        Shape::Char => {
            if term.get_type() != TermType::Integer {
                return Err(path.error("char (an integer code point such as ?a)", term));
            }
            let cp = int_of(term)
                .and_then(|i| i64::try_from(i).ok())
                .unwrap_or(-1);
            u32::try_from(cp)
                .ok()
                .and_then(char::from_u32)
                .map(Value::Char)
                .ok_or_else(|| {
                    path.fail(format!("expected char (a Unicode scalar value), got {cp}"))
                })
        }
        Shape::String => {
            if term.get_type() != TermType::Binary {
                return Err(path.error("string (a UTF-8 binary)", term));
            }
            let bin = Binary::from_term(term).map_err(|_| path.error("string", term))?;
            work.spend(bin.len() as u64 >> 8)?;
            match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => Ok(Value::String(s.to_string())),
                Err(e) => Err(path.fail(format!(
                    "expected string, got a binary that is not valid UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                ))),
            }
        }
        Shape::Bytes => {
            if term.get_type() == TermType::Binary {
                let bin = Binary::from_term(term).map_err(|_| path.error("list<u8>", term))?;
                work.spend(bin.len() as u64 >> 8)?;
                return Ok(Value::Bytes(bin.as_slice().to_vec()));
            }
            let Some(items) = proper_list(term, work)? else {
                return Err(path.error("list<u8> (a binary or a list of bytes)", term));
            };
            let mut bytes = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match int_of(item).and_then(|v| u8::try_from(v).ok()) {
                    Some(b) => bytes.push(b),
                    None => {
                        return Err(path.with(Seg::Index(i), |p| p.error("u8 (0..255)", item)));
                    }
                }
            }
            Ok(Value::Bytes(bytes))
        }
        Shape::List(elem) => {
            let Some(items) = proper_list(term, work)? else {
                return Err(path.error(format!("{} (a proper list)", wit_name(shape, names)), term));
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(path.with(Seg::Index(i), |p| term_to_value(item, elem, names, p, work))?);
            }
            Ok(Value::List(out))
        }
        Shape::Tuple(types) => {
            let items = match term.get_type() {
                TermType::Tuple => get_tuple(term).unwrap_or_default(),
                _ => Vec::new(),
            };
            if term.get_type() != TermType::Tuple || items.len() != types.len() {
                return Err(path.error(
                    format!("{} (a tuple of {})", wit_name(shape, names), types.len()),
                    term,
                ));
            }
            let mut out = Vec::with_capacity(types.len());
            for (i, (item, t)) in items.into_iter().zip(types.iter()).enumerate() {
                out.push(path.with(Seg::Elem(i), |p| term_to_value(item, t, names, p, work))?);
            }
            Ok(Value::Fields(out))
        }
        Shape::Record(fields) => {
            if term.get_type() != TermType::Map {
                return Err(path.error(format!("a map ({})", wit_name(shape, names)), term));
            }
            let mut out = Vec::with_capacity(fields.len());
            let mut missing = Vec::new();
            for (id, fshape) in fields.iter() {
                match term.map_get(names.atom(*id)) {
                    Ok(v) => {
                        out.push(path.with(Seg::Field(names.wit(*id)), |p| {
                            term_to_value(v, fshape, names, p, work)
                        })?);
                    }
                    Err(_) => missing.push(format!(":{}", kebab_to_snake(names.wit(*id)))),
                }
            }
            if !missing.is_empty() {
                return Err(path.fail(format!(
                    "missing key{} {} (expected {})",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.join(", "),
                    wit_name(shape, names)
                )));
            }
            if term.map_size().unwrap_or(0) != fields.len() {
                let known: Vec<rustler::sys::ErlNifTerm> = fields
                    .iter()
                    .map(|(id, _)| names.atom(*id).as_c_arg())
                    .collect();
                let unknown: Vec<String> = MapIterator::new(term)
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| !known.contains(&k.as_c_arg()))
                    .take(5)
                    .map(|(k, _)| render_term(k))
                    .collect();
                return Err(path.fail(format!(
                    "unknown key{} {} (expected {})",
                    if unknown.len() > 1 { "s" } else { "" },
                    unknown.join(", "),
                    wit_name(shape, names)
                )));
            }
            Ok(Value::Fields(out))
        }
        Shape::Variant(cases) => {
            let (tag, payload) = match term.get_type() {
                TermType::Atom => (Some(term), None),
                TermType::Tuple => match get_tuple(term).ok().as_deref() {
                    Some([tag, payload]) if tag.get_type() == TermType::Atom => {
                        (Some(*tag), Some(*payload))
                    }
                    _ => (None, None),
                },
                _ => (None, None),
            };
            let Some(tag) = tag else {
                return Err(path.error(
                    format!("{} as :case or {{:case, payload}}", wit_name(shape, names)),
                    term,
                ));
            };
            let Some(index) = case_of(names, cases.iter().map(|(id, _)| *id), tag) else {
                return Err(path.fail(format!(
                    "unknown case {} (expected {})",
                    render_term(tag),
                    wit_name(shape, names)
                )));
            };
            let (id, case_shape) = &cases[index as usize];
            let wit = names.wit(*id);
            let case = || kebab_to_snake(wit);
            match (case_shape, payload) {
                (None, None) => Ok(Value::Case(index, None)),
                (Some(s), Some(p)) => {
                    let v = path.with(Seg::Case(wit), |path| {
                        term_to_value(p, s, names, path, work)
                    })?;
                    Ok(Value::Case(index, Some(Box::new(v))))
                }
                (None, Some(_)) => {
                    let case = case();
                    Err(path.fail(format!(
                        "case :{case} has no payload; pass the atom :{case}"
                    )))
                }
                (Some(s), None) => {
                    let case = case();
                    Err(path.fail(format!(
                        "case :{case} carries a {}; pass {{:{case}, value}}",
                        wit_name(s, names)
                    )))
                }
            }
        }
        Shape::Enum(cases) => {
            if term.get_type() != TermType::Atom {
                return Err(path.error(wit_name(shape, names), term));
            }
            case_of(names, cases.iter().copied(), term)
                .map(Value::Enum)
                .ok_or_else(|| {
                    path.fail(format!(
                        "unknown case {} (expected {})",
                        render_term(term),
                        wit_name(shape, names)
                    ))
                })
        }
        Shape::Flags(flags) => {
            let items = match term.get_type() {
                TermType::List => proper_list(term, work)?,
                TermType::Map if is_mapset(term) => term
                    .map_get(map())
                    .ok()
                    .and_then(MapIterator::new)
                    .map(|it| it.map(|(k, _)| k).collect()),
                _ => None,
            };
            let Some(items) = items else {
                return Err(path.error(
                    format!("{} (a list of atoms or a MapSet)", wit_name(shape, names)),
                    term,
                ));
            };
            let mut words = vec![0u32; flags.len().div_ceil(32)];
            for item in items {
                work.spend(1)?;
                match case_of(names, flags.iter().copied(), item) {
                    Some(i) if item.get_type() == TermType::Atom => {
                        words[i as usize / 32] |= 1 << (i % 32)
                    }
                    _ => {
                        return Err(path.fail(format!(
                            "unknown flag {} (expected {})",
                            render_term(item),
                            wit_name(shape, names)
                        )));
                    }
                }
            }
            Ok(Value::Flags(words))
        }
        Shape::Option(inner) => {
            if is_atom(term, nil()) {
                return Ok(Value::Case(0, None));
            }
            let value = if inner.can_be_nil(names) {
                // `nil` alone would be ambiguous: the outer `some` is explicit.
                match get_tuple(term).ok().as_deref() {
                    Some([tag, v]) if is_atom(*tag, some()) => *v,
                    _ => {
                        return Err(path.error(
                            format!("{} as nil or {{:some, value}}", wit_name(shape, names)),
                            term,
                        ));
                    }
                }
            } else {
                term
            };
            let v = term_to_value(value, inner, names, path, work)?;
            Ok(Value::Case(1, Some(Box::new(v))))
        }
        Shape::Result(ok_shape, err_shape) => {
            let expected = || {
                let ok = if ok_shape.is_some() {
                    "{:ok, value}"
                } else {
                    ":ok"
                };
                let err = if err_shape.is_some() {
                    "{:error, value}"
                } else {
                    ":error"
                };
                format!("{} as {ok} or {err}", wit_name(shape, names))
            };
            let (tag, payload) = match term.get_type() {
                TermType::Atom => (term, None),
                TermType::Tuple => match get_tuple(term).ok().as_deref() {
                    Some([t, p]) => (*t, Some(*p)),
                    _ => return Err(path.error(expected(), term)),
                },
                _ => return Err(path.error(expected(), term)),
            };
            let (index, label, slot) = if is_atom(tag, ok()) {
                (0, "ok", ok_shape)
            } else if is_atom(tag, error()) {
                (1, "error", err_shape)
            } else {
                return Err(path.error(expected(), term));
            };
            match (slot, payload) {
                (None, None) => Ok(Value::Case(index, None)),
                (Some(s), Some(p)) => {
                    let v = path.with(Seg::Case(label), |path| {
                        term_to_value(p, s, names, path, work)
                    })?;
                    Ok(Value::Case(index, Some(Box::new(v))))
                }
                _ => Err(path.error(expected(), term)),
            }
        }
        Shape::Own(r) | Shape::Borrow(r) if names.is_host(*r) => {
            // Any term is a host resource's state: it is kept as it is,
            // copied (so a large one goes to a dirty scheduler first).
            let (nodes, bytes) = term_size(term, work)?;
            Ok(Value::HostTerm(HostTerm {
                stored: Stored::new(term, nodes, bytes),
                resource: *r,
                own: matches!(shape, Shape::Own(_)),
            }))
        }
        Shape::Own(r) | Shape::Borrow(r) => {
            let own = matches!(shape, Shape::Own(_));
            match crate::resource::from_term(term, own) {
                Ok(Some(resource)) => Ok(Value::Resource(resource)),
                Ok(None) => Err(path.error(
                    format!(
                        "a Capsid.Resource handle of {} (as a call returned it)",
                        names.resource(*r)
                    ),
                    term,
                )),
                Err(e) => Err(Conv::Bad(e)),
            }
        }
        Shape::Unsupported(what) => {
            Err(path.fail(format!("{what} values are not supported by Capsid yet")))
        }
    }
}

fn is_mapset(term: Term) -> bool {
    term.map_get(__struct__())
        .ok()
        .is_some_and(|v| is_atom(v, mapset()))
}

// ---------------------------------------------------------------- Value → term

fn float_term(env: Env, f: f64) -> Term {
    if f.is_nan() {
        nan().encode(env)
    } else if f == f64::INFINITY {
        infinity().encode(env)
    } else if f == f64::NEG_INFINITY {
        neg_infinity().encode(env)
    } else {
        f.encode(env)
    }
}

/// Bytes a term node is counted for in `term_size` (a cons cell or a map
/// entry is two words, a small value one; this errs on the large side).
const NODE_BYTES: u64 = 16;

/// How many nodes `term` has (a binary counts as one: copying a large one
/// copies a reference), spending one unit of `work` each, and about how
/// many bytes the host keeps for it: its nodes and its binaries' bytes (a
/// sub-binary counts its visible part). Iterative: a term nested a million
/// deep must not overflow the native stack.
fn term_size(term: Term, work: &mut Work) -> ConvResult<(u64, u64)> {
    let mut stack = vec![term];
    let mut nodes = 0u64;
    let mut bytes = 0u64;
    while let Some(t) = stack.pop() {
        nodes += 1;
        work.spend(1)?;
        match t.get_type() {
            TermType::Binary => {
                if let Ok(b) = rustler::Binary::from_term(t) {
                    bytes = bytes.saturating_add(b.len() as u64);
                }
            }
            TermType::List => {
                if let Ok(items) = t.into_list_iterator() {
                    for item in items {
                        work.spend(1)?;
                        stack.push(item);
                    }
                }
            }
            TermType::Tuple => {
                if let Ok(items) = get_tuple(t) {
                    work.spend(items.len() as u64)?;
                    stack.extend(items);
                }
            }
            TermType::Map => {
                if let Some(entries) = MapIterator::new(t) {
                    for (k, v) in entries {
                        work.spend(2)?;
                        stack.push(k);
                        stack.push(v);
                    }
                }
            }
            _ => {}
        }
    }
    Ok((
        nodes,
        bytes.saturating_add(nodes.saturating_mul(NODE_BYTES)),
    ))
}

pub fn binary<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    bin.into()
}

/// Converts a guest value to an Elixir term, shaped by its WIT type.
pub fn value_to_term<'a>(
    env: Env<'a>,
    value: &Value,
    shape: &Shape,
    names: &Names,
    work: &mut Work,
) -> ConvResult<Term<'a>> {
    work.spend(1)?;
    Ok(match (value, shape) {
        (Value::Bool(b), _) => b.encode(env),
        (Value::S8(i), _) => i.encode(env),
        (Value::U8(i), _) => i.encode(env),
        (Value::S16(i), _) => i.encode(env),
        (Value::U16(i), _) => i.encode(env),
        (Value::S32(i), _) => i.encode(env),
        (Value::U32(i), _) => i.encode(env),
        (Value::S64(i), _) => i.encode(env),
        (Value::U64(i), _) => i.encode(env),
        (Value::F32(f), _) => float_term(env, f64::from(*f)),
        (Value::F64(f), _) => float_term(env, *f),
        (Value::Char(c), _) => (*c as u32).encode(env),
        (Value::String(s), _) => {
            work.spend(s.len() as u64 >> 8)?;
            binary(env, s.as_bytes())
        }
        (Value::Bytes(b), _) => {
            work.spend(b.len() as u64 >> 8)?;
            binary(env, b)
        }
        (Value::List(items), Shape::List(elem)) => {
            let mut terms = Vec::with_capacity(items.len());
            for item in items {
                terms.push(value_to_term(env, item, elem, names, work)?);
            }
            terms.encode(env)
        }
        (Value::Fields(items), Shape::Tuple(types)) => {
            let mut terms = Vec::with_capacity(items.len());
            for (item, t) in items.iter().zip(types.iter()) {
                terms.push(value_to_term(env, item, t, names, work)?);
            }
            make_tuple(env, &terms)
        }
        (Value::Fields(items), Shape::Record(fields)) => {
            let mut keys = Vec::with_capacity(items.len());
            let mut values = Vec::with_capacity(items.len());
            for (item, (id, fshape)) in items.iter().zip(fields.iter()) {
                keys.push(names.atom(*id).encode(env));
                values.push(value_to_term(env, item, fshape, names, work)?);
            }
            Term::map_from_term_arrays(env, &keys, &values).unwrap_or_else(|_| Term::map_new(env))
        }
        (Value::Case(i, payload), Shape::Variant(cases)) => {
            let Some((id, case_shape)) = cases.get(*i as usize) else {
                return Err(Conv::Bad(Error::Internal(
                    "variant case out of range".into(),
                )));
            };
            let tag = names.atom(*id).encode(env);
            match (payload, case_shape) {
                (Some(p), Some(s)) => {
                    make_tuple(env, &[tag, value_to_term(env, p, s, names, work)?])
                }
                _ => tag,
            }
        }
        (Value::Enum(i), Shape::Enum(cases)) => match cases.get(*i as usize) {
            Some(id) => names.atom(*id).encode(env),
            None => return Err(Conv::Bad(Error::Internal("enum case out of range".into()))),
        },
        (Value::Flags(words), Shape::Flags(flags)) => {
            let set: Vec<Term> = flags
                .iter()
                .enumerate()
                .filter(|(i, _)| words.get(i / 32).is_some_and(|w| w & (1 << (i % 32)) != 0))
                .map(|(_, id)| names.atom(*id).encode(env))
                .collect();
            set.encode(env)
        }
        (Value::Case(0, _), Shape::Option(_)) => nil().encode(env),
        (Value::Case(_, Some(v)), Shape::Option(inner)) => {
            let term = value_to_term(env, v, inner, names, work)?;
            if inner.can_be_nil(names) {
                make_tuple(env, &[some().encode(env), term])
            } else {
                term
            }
        }
        (Value::Case(i, payload), Shape::Result(ok_shape, err_shape)) => {
            let (tag, slot) = if *i == 0 {
                (ok().encode(env), ok_shape)
            } else {
                (error().encode(env), err_shape)
            };
            match (payload, slot) {
                (Some(p), Some(s)) => {
                    make_tuple(env, &[tag, value_to_term(env, p, s, names, work)?])
                }
                _ => tag,
            }
        }
        (Value::Resource(r), Shape::Own(id)) => {
            crate::resource::to_term(env, *r, names.resource(*id)).map_err(Conv::Bad)?
        }
        (Value::HostTerm(h), Shape::Own(_) | Shape::Borrow(_)) => {
            work.spend(h.stored.nodes)?;
            h.stored.load(env)
        }
        _ => {
            return Err(Conv::Bad(Error::Internal(format!(
                "a guest value does not match its type ({})",
                wit_name(shape, names)
            ))));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_like_elixir_access() {
        let mut p = Path::arg(0);
        p.rest.push(Seg::Field("points"));
        p.rest.push(Seg::Index(2));
        p.rest.push(Seg::Field("x-min"));
        assert_eq!(p.render(), "args[0].points[2].x_min");
        let mut p = Path::arg(1);
        p.rest.push(Seg::Case("many-sided"));
        p.rest.push(Seg::Elem(1));
        assert_eq!(p.render(), "args[1](many_sided).1");
        assert_eq!(Path::root("result").render(), "result");
    }

    #[test]
    fn work_runs_out() {
        let mut w = Work(3);
        assert!(w.spend(2).is_ok());
        assert!(matches!(w.spend(2), Err(Conv::Over)));
        assert!(Work::unbounded().spend(u64::MAX).is_ok());
    }
}
