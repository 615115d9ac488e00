//! Elixir terms ↔ `wasmtime::component::Val`, walking the function's WIT
//! types (DESIGN.md section 2). Argument errors name the path to the offending
//! value and the expected WIT type, e.g. `args[0].points[2].x: expected f64, got "a"`.
//!
//! Naming rule, both ways: WIT kebab-case ↔ Elixir snake_case (`longest-word`
//! ↔ `:longest_word`). WIT identifiers never contain `_`, so the rule is a
//! bijection. Atoms are only made from names in the component's type
//! information, never from guest data.

use crate::error::{Error, Result};
use rustler::types::map::MapIterator;
use rustler::types::tuple::{get_tuple, make_tuple};
use rustler::{Atom, Binary, Encoder, Env, NewBinary, Term, TermType};
use std::fmt::Write;
use wasmtime::component::Val;
use wasmtime::component::types::Type;

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
    // Elixir's MapSet module name, accepted for flags.
    mapset = "Elixir.MapSet",
}

/// `longest-word` → `longest_word`.
pub fn kebab_to_snake(name: &str) -> String {
    name.replace('-', "_")
}

/// `longest_word` → `longest-word`.
pub fn snake_to_kebab(name: &str) -> String {
    name.replace('_', "-")
}

/// One step of the path from `args` to the value being converted.
#[derive(Debug, Clone)]
pub enum Seg {
    Arg(usize),
    Field(String),
    Index(usize),
    Elem(usize),
    Case(String),
}

/// Path to the value being converted, rendered only when an error happens.
#[derive(Debug, Default, Clone)]
pub struct Path(Vec<Seg>);

impl Path {
    pub fn arg(i: usize) -> Self {
        Path(vec![Seg::Arg(i)])
    }

    pub fn root(label: &str) -> Self {
        Path(vec![Seg::Field(label.to_string())])
    }

    fn with<T>(&mut self, seg: Seg, f: impl FnOnce(&mut Self) -> T) -> T {
        self.0.push(seg);
        let out = f(self);
        self.0.pop();
        out
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for seg in &self.0 {
            let _ = match seg {
                Seg::Arg(i) => write!(out, "args[{i}]"),
                Seg::Field(f) if out.is_empty() => write!(out, "{f}"),
                Seg::Field(f) => write!(out, ".{f}"),
                Seg::Index(i) => write!(out, "[{i}]"),
                Seg::Elem(i) => write!(out, ".{i}"),
                Seg::Case(c) => write!(out, "({c})"),
            };
        }
        out
    }

    fn error(&self, expected: impl std::fmt::Display, got: Term) -> Error {
        Error::BadArgument(format!(
            "{}: expected {expected}, got {}",
            self.render(),
            render_term(got)
        ))
    }

    fn fail(&self, message: impl std::fmt::Display) -> Error {
        Error::BadArgument(format!("{}: {message}", self.render()))
    }
}

/// A WIT type as written in WIT source, for error messages.
pub fn wit_name(ty: &Type) -> String {
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(l) => format!("list<{}>", wit_name(&l.ty())),
        Type::Tuple(t) => {
            let inner: Vec<String> = t.types().map(|t| wit_name(&t)).collect();
            format!("tuple<{}>", inner.join(", "))
        }
        Type::Record(r) => {
            let fields: Vec<String> = r.fields().map(|f| kebab_to_snake(f.name)).collect();
            format!("record with keys {}", atoms_list(&fields))
        }
        Type::Variant(v) => {
            let cases: Vec<String> = v.cases().map(|c| kebab_to_snake(c.name)).collect();
            format!("variant of {}", atoms_list(&cases))
        }
        Type::Enum(e) => {
            let cases: Vec<String> = e.names().map(kebab_to_snake).collect();
            format!("enum of {}", atoms_list(&cases))
        }
        Type::Flags(f) => {
            let names: Vec<String> = f.names().map(kebab_to_snake).collect();
            format!("flags of {}", atoms_list(&names))
        }
        Type::Option(o) => format!("option<{}>", wit_name(&o.ty())),
        Type::Result(r) => {
            let ok = r.ok().map_or("_".into(), |t| wit_name(&t));
            let err = r.err().map_or("_".into(), |t| wit_name(&t));
            format!("result<{ok}, {err}>")
        }
        Type::Own(_) => "own<resource>".into(),
        Type::Borrow(_) => "borrow<resource>".into(),
        Type::Map(_) => "map".into(),
        Type::Future(_) => "future".into(),
        Type::Stream(_) => "stream".into(),
        Type::ErrorContext => "error-context".into(),
        Type::FixedLengthList(_) => "fixed-length list".into(),
    }
}

fn atoms_list(names: &[String]) -> String {
    let items: Vec<String> = names.iter().map(|n| format!(":{n}")).collect();
    items.join(", ")
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
        TermType::Integer => match term.decode::<i128>() {
            Ok(i) => {
                let _ = write!(out, "{i}");
            }
            Err(_) => out.push_str("<big integer>"),
        },
        TermType::Float => {
            let _ = write!(out, "{:?}", term.decode::<f64>().unwrap_or(f64::NAN));
        }
        TermType::Binary => {
            let bin = Binary::from_term(term).map(|b| b.as_slice()).unwrap_or(&[]);
            match std::str::from_utf8(bin) {
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
            if let Ok(iter) = term.into_list_iterator() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    if i == 8 {
                        out.push_str("...");
                        break;
                    }
                    render_into(item, out, depth - 1);
                }
            }
            out.push(']');
        }
        TermType::Tuple => {
            out.push('{');
            for (i, item) in get_tuple(term).unwrap_or_default().into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_into(item, out, depth - 1);
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

// ---------------------------------------------------------------- term → Val

/// Checks that `value` fits the integer type `ty` and builds the `Val`.
pub fn int_val(ty: &Type, value: i128) -> std::result::Result<Val, String> {
    fn fit<T>(v: i128, name: &str) -> std::result::Result<T, String>
    where
        T: TryFrom<i128> + num_bounds::Bounds,
    {
        T::try_from(v).map_err(|_| format!("expected {name} ({}..{}), got {v}", T::MIN_S, T::MAX_S))
    }
    Ok(match ty {
        Type::S8 => Val::S8(fit(value, "s8")?),
        Type::U8 => Val::U8(fit(value, "u8")?),
        Type::S16 => Val::S16(fit(value, "s16")?),
        Type::U16 => Val::U16(fit(value, "u16")?),
        Type::S32 => Val::S32(fit(value, "s32")?),
        Type::U32 => Val::U32(fit(value, "u32")?),
        Type::S64 => Val::S64(fit(value, "s64")?),
        Type::U64 => Val::U64(fit(value, "u64")?),
        _ => return Err(format!("{} is not an integer type", wit_name(ty))),
    })
}

mod num_bounds {
    /// Printable bounds of each integer width, for range errors.
    pub trait Bounds {
        const MIN_S: &'static str;
        const MAX_S: &'static str;
    }
    macro_rules! bounds {
        ($($t:ty => $min:expr, $max:expr;)*) => {
            $(impl Bounds for $t { const MIN_S: &'static str = $min; const MAX_S: &'static str = $max; })*
        };
    }
    bounds! {
        i8 => "-128", "127";
        u8 => "0", "255";
        i16 => "-32768", "32767";
        u16 => "0", "65535";
        i32 => "-2147483648", "2147483647";
        u32 => "0", "4294967295";
        i64 => "-9223372036854775808", "9223372036854775807";
        u64 => "0", "18446744073709551615";
    }
}

/// A Unicode scalar value from a code point; surrogates and values past
/// U+10FFFF are refused.
pub fn char_val(code_point: i128) -> std::result::Result<char, String> {
    u32::try_from(code_point)
        .ok()
        .and_then(char::from_u32)
        .ok_or_else(|| format!("expected char (a Unicode scalar value), got {code_point}"))
}

/// The float named by one of the special atoms.
pub fn special_float(name: &str) -> Option<f64> {
    match name {
        "nan" => Some(f64::NAN),
        "infinity" => Some(f64::INFINITY),
        "neg_infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

fn atom_name(term: Term) -> Option<String> {
    if term.get_type() == TermType::Atom {
        term.atom_to_string().ok()
    } else {
        None
    }
}

fn float_of(term: Term, ty: &Type, path: &Path) -> Result<f64> {
    match term.get_type() {
        TermType::Float => Ok(term.decode::<f64>().unwrap_or(f64::NAN)),
        TermType::Integer => term
            .decode::<i128>()
            .map(|i| i as f64)
            .map_err(|_| path.error(wit_name(ty), term)),
        TermType::Atom => atom_name(term)
            .and_then(|n| special_float(&n))
            .ok_or_else(|| {
                path.error(
                    format!(
                        "{} (a number, :nan, :infinity or :neg_infinity)",
                        wit_name(ty)
                    ),
                    term,
                )
            }),
        _ => Err(path.error(wit_name(ty), term)),
    }
}

/// Converts an Elixir argument to a `Val` of type `ty`.
pub fn term_to_val(term: Term, ty: &Type, path: &mut Path) -> Result<Val> {
    match ty {
        Type::Bool => match atom_name(term).as_deref() {
            Some("true") => Ok(Val::Bool(true)),
            Some("false") => Ok(Val::Bool(false)),
            _ => Err(path.error("bool", term)),
        },
        Type::S8
        | Type::U8
        | Type::S16
        | Type::U16
        | Type::S32
        | Type::U32
        | Type::S64
        | Type::U64 => {
            if term.get_type() != TermType::Integer {
                return Err(path.error(wit_name(ty), term));
            }
            let value = term.decode::<i128>().map_err(|_| {
                path.fail(format!(
                    "expected {}, got an integer out of range",
                    wit_name(ty)
                ))
            })?;
            int_val(ty, value).map_err(|m| path.fail(m))
        }
        Type::Float32 => Ok(Val::Float32(float_of(term, ty, path)? as f32)),
        Type::Float64 => Ok(Val::Float64(float_of(term, ty, path)?)),
        Type::Char => {
            if term.get_type() != TermType::Integer {
                return Err(path.error("char (an integer code point such as ?a)", term));
            }
            let cp = term.decode::<i128>().unwrap_or(-1);
            char_val(cp).map(Val::Char).map_err(|m| path.fail(m))
        }
        Type::String => {
            let bin = match term.get_type() {
                TermType::Binary => {
                    Binary::from_term(term).map_err(|_| path.error("string", term))?
                }
                _ => return Err(path.error("string (a UTF-8 binary)", term)),
            };
            match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => Ok(Val::String(s.to_string())),
                Err(e) => Err(path.fail(format!(
                    "expected string, got a binary that is not valid UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                ))),
            }
        }
        Type::List(list) => {
            let elem = list.ty();
            if matches!(elem, Type::U8) && term.get_type() == TermType::Binary {
                let bin = Binary::from_term(term).map_err(|_| path.error("list<u8>", term))?;
                return Ok(Val::List(
                    bin.as_slice().iter().map(|b| Val::U8(*b)).collect(),
                ));
            }
            let iter = match term.get_type() {
                TermType::List => term
                    .into_list_iterator()
                    .map_err(|_| path.error(wit_name(ty), term))?,
                _ => {
                    let hint = if matches!(elem, Type::U8) {
                        " (a binary or a list of bytes)"
                    } else {
                        " (a list)"
                    };
                    return Err(path.error(format!("{}{hint}", wit_name(ty)), term));
                }
            };
            let mut out = Vec::new();
            for (i, item) in iter.enumerate() {
                out.push(path.with(Seg::Index(i), |p| term_to_val(item, &elem, p))?);
            }
            Ok(Val::List(out))
        }
        Type::Tuple(tuple) => {
            let types: Vec<Type> = tuple.types().collect();
            let items = match term.get_type() {
                TermType::Tuple => get_tuple(term).map_err(|_| path.error(wit_name(ty), term))?,
                _ => {
                    return Err(path.error(
                        format!("{} (a tuple of {})", wit_name(ty), types.len()),
                        term,
                    ));
                }
            };
            if items.len() != types.len() {
                return Err(path.error(
                    format!("{} (a tuple of {})", wit_name(ty), types.len()),
                    term,
                ));
            }
            let mut out = Vec::with_capacity(types.len());
            for (i, (item, t)) in items.into_iter().zip(types.iter()).enumerate() {
                out.push(path.with(Seg::Elem(i), |p| term_to_val(item, t, p))?);
            }
            Ok(Val::Tuple(out))
        }
        Type::Record(record) => {
            if term.get_type() != TermType::Map {
                return Err(path.error(format!("a map ({})", wit_name(ty)), term));
            }
            let fields: Vec<(String, Type)> = record
                .fields()
                .map(|f| (f.name.to_string(), f.ty))
                .collect();
            let snake: Vec<String> = fields.iter().map(|(n, _)| kebab_to_snake(n)).collect();
            let size = term.map_size().unwrap_or(0);
            let mut out = Vec::with_capacity(fields.len());
            let mut missing = Vec::new();
            for ((name, fty), key) in fields.iter().zip(snake.iter()) {
                let atom = Atom::from_str(term.get_env(), key).map_err(|_| path.fail("bad key"))?;
                match term.map_get(atom) {
                    Ok(v) => out.push((
                        name.clone(),
                        path.with(Seg::Field(key.clone()), |p| term_to_val(v, fty, p))?,
                    )),
                    Err(_) => missing.push(format!(":{key}")),
                }
            }
            if !missing.is_empty() {
                return Err(path.fail(format!(
                    "missing key{} {} (expected {})",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.join(", "),
                    wit_name(ty)
                )));
            }
            if size != fields.len() {
                let unknown: Vec<String> = MapIterator::new(term)
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| atom_name(*k).is_none_or(|n| !snake.contains(&n)))
                    .map(|(k, _)| render_term(k))
                    .collect();
                return Err(path.fail(format!(
                    "unknown key{} {} (expected {})",
                    if unknown.len() > 1 { "s" } else { "" },
                    unknown.join(", "),
                    wit_name(ty)
                )));
            }
            Ok(Val::Record(out))
        }
        Type::Variant(variant) => {
            let (name, payload) = match term.get_type() {
                TermType::Atom => (atom_name(term), None),
                TermType::Tuple => match get_tuple(term).ok().as_deref() {
                    Some([tag, payload]) => (atom_name(*tag), Some(*payload)),
                    _ => (None, None),
                },
                _ => (None, None),
            };
            let Some(name) = name else {
                return Err(path.error(
                    format!("{} as :case or {{:case, payload}}", wit_name(ty)),
                    term,
                ));
            };
            let wit = snake_to_kebab(&name);
            let Some(case) = variant.cases().find(|c| c.name == wit) else {
                return Err(path.fail(format!("unknown case :{name} (expected {})", wit_name(ty))));
            };
            let case_ty = case.ty.clone();
            match (case_ty, payload) {
                (None, None) => Ok(Val::Variant(wit, None)),
                (Some(t), Some(p)) => {
                    let v = path.with(Seg::Case(name.clone()), |path| term_to_val(p, &t, path))?;
                    Ok(Val::Variant(wit, Some(Box::new(v))))
                }
                (None, Some(_)) => Err(path.fail(format!(
                    "case :{name} has no payload; pass the atom :{name}"
                ))),
                (Some(t), None) => Err(path.fail(format!(
                    "case :{name} carries a {}; pass {{:{name}, value}}",
                    wit_name(&t)
                ))),
            }
        }
        Type::Enum(en) => {
            let Some(name) = atom_name(term) else {
                return Err(path.error(wit_name(ty), term));
            };
            let wit = snake_to_kebab(&name);
            if en.names().any(|n| n == wit) {
                Ok(Val::Enum(wit))
            } else {
                Err(path.fail(format!("unknown case :{name} (expected {})", wit_name(ty))))
            }
        }
        Type::Flags(flags) => {
            let items: Vec<Term> = match term.get_type() {
                TermType::List => term
                    .into_list_iterator()
                    .map(|i| i.collect())
                    .unwrap_or_default(),
                TermType::Map if is_mapset(term) => term
                    .map_get(map())
                    .ok()
                    .and_then(MapIterator::new)
                    .map(|it| it.map(|(k, _)| k).collect())
                    .unwrap_or_default(),
                _ => {
                    return Err(path.error(
                        format!("{} (a list of atoms or a MapSet)", wit_name(ty)),
                        term,
                    ));
                }
            };
            let mut set = Vec::new();
            for item in items {
                let Some(name) = atom_name(item) else {
                    return Err(path.error(wit_name(ty), item));
                };
                let wit = snake_to_kebab(&name);
                if !flags.names().any(|n| n == wit) {
                    return Err(
                        path.fail(format!("unknown flag :{name} (expected {})", wit_name(ty)))
                    );
                }
                if !set.contains(&wit) {
                    set.push(wit);
                }
            }
            Ok(Val::Flags(set))
        }
        Type::Option(opt) => {
            let inner = opt.ty();
            if atom_name(term).as_deref() == Some("nil") {
                return Ok(Val::Option(None));
            }
            let value = if matches!(inner, Type::Option(_)) {
                // `option<option<T>>`: the outer `some` must be explicit so
                // that `some(none)` and `none` stay distinguishable.
                match get_tuple(term).ok().as_deref() {
                    Some([tag, v]) if atom_name(*tag).as_deref() == Some("some") => *v,
                    _ => {
                        return Err(path
                            .error(format!("{} as nil or {{:some, value}}", wit_name(ty)), term));
                    }
                }
            } else {
                term
            };
            let v = term_to_val(value, &inner, path)?;
            Ok(Val::Option(Some(Box::new(v))))
        }
        Type::Result(res) => {
            let expected = || {
                let ok = if res.ok().is_some() {
                    "{:ok, value}"
                } else {
                    ":ok"
                };
                let err = if res.err().is_some() {
                    "{:error, value}"
                } else {
                    ":error"
                };
                format!("{} as {ok} or {err}", wit_name(ty))
            };
            let (tag, payload) = match term.get_type() {
                TermType::Atom => (atom_name(term), None),
                TermType::Tuple => match get_tuple(term).ok().as_deref() {
                    Some([t, p]) => (atom_name(*t), Some(*p)),
                    _ => (None, None),
                },
                _ => (None, None),
            };
            let (is_ok, slot_ty) = match tag.as_deref() {
                Some("ok") => (true, res.ok()),
                Some("error") => (false, res.err()),
                _ => return Err(path.error(expected(), term)),
            };
            let label = if is_ok { "ok" } else { "error" };
            let inner = match (slot_ty, payload) {
                (None, None) => None,
                (Some(t), Some(p)) => {
                    Some(Box::new(path.with(Seg::Case(label.into()), |path| {
                        term_to_val(p, &t, path)
                    })?))
                }
                _ => return Err(path.error(expected(), term)),
            };
            Ok(Val::Result(if is_ok { Ok(inner) } else { Err(inner) }))
        }
        Type::Own(_) | Type::Borrow(_) => {
            Err(path.fail("resource handles are not supported by Capsid yet"))
        }
        _ => Err(path.fail(format!(
            "{} values are not supported by Capsid yet",
            wit_name(ty)
        ))),
    }
}

fn is_mapset(term: Term) -> bool {
    term.map_get(__struct__())
        .ok()
        .and_then(|v| v.decode::<Atom>().ok())
        == Some(mapset())
}

// ---------------------------------------------------------------- Val → term

fn name_atom<'a>(env: Env<'a>, wit: &str) -> Term<'a> {
    // Names come from the component's type information (wasmtime lifts
    // enum/variant/flags values by index into it), never from guest data.
    Atom::from_str(env, &kebab_to_snake(wit))
        .map(|a| a.encode(env))
        .unwrap_or_else(|_| nil().encode(env))
}

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

/// Converts a guest value to an Elixir term, shaped by its WIT type.
pub fn val_to_term<'a>(env: Env<'a>, val: &Val, ty: &Type) -> Term<'a> {
    match (val, ty) {
        (Val::Bool(b), _) => b.encode(env),
        (Val::S8(i), _) => i.encode(env),
        (Val::U8(i), _) => i.encode(env),
        (Val::S16(i), _) => i.encode(env),
        (Val::U16(i), _) => i.encode(env),
        (Val::S32(i), _) => i.encode(env),
        (Val::U32(i), _) => i.encode(env),
        (Val::S64(i), _) => i.encode(env),
        (Val::U64(i), _) => i.encode(env),
        (Val::Float32(f), _) => float_term(env, f64::from(*f)),
        (Val::Float64(f), _) => float_term(env, *f),
        (Val::Char(c), _) => (*c as u32).encode(env),
        (Val::String(s), _) => s.as_str().encode(env),
        (Val::List(items), Type::List(list)) => {
            let elem = list.ty();
            if matches!(elem, Type::U8) {
                let mut bin = NewBinary::new(env, items.len());
                for (slot, item) in bin.as_mut_slice().iter_mut().zip(items) {
                    if let Val::U8(b) = item {
                        *slot = *b;
                    }
                }
                return bin.into();
            }
            let terms: Vec<Term> = items.iter().map(|v| val_to_term(env, v, &elem)).collect();
            terms.encode(env)
        }
        (Val::Tuple(items), Type::Tuple(tuple)) => {
            let terms: Vec<Term> = items
                .iter()
                .zip(tuple.types())
                .map(|(v, t)| val_to_term(env, v, &t))
                .collect();
            make_tuple(env, &terms)
        }
        (Val::Record(fields), Type::Record(record)) => {
            let mut keys = Vec::with_capacity(fields.len());
            let mut values = Vec::with_capacity(fields.len());
            for ((name, v), f) in fields.iter().zip(record.fields()) {
                keys.push(name_atom(env, name));
                values.push(val_to_term(env, v, &f.ty));
            }
            Term::map_from_term_arrays(env, &keys, &values).unwrap_or_else(|_| Term::map_new(env))
        }
        (Val::Variant(name, payload), Type::Variant(variant)) => {
            let tag = name_atom(env, name);
            match payload {
                None => tag,
                Some(p) => {
                    let case_ty = variant.cases().find(|c| c.name == name).and_then(|c| c.ty);
                    let inner = match case_ty {
                        Some(t) => val_to_term(env, p, &t),
                        None => nil().encode(env),
                    };
                    make_tuple(env, &[tag, inner])
                }
            }
        }
        (Val::Enum(name), _) => name_atom(env, name),
        (Val::Flags(set), Type::Flags(flags)) => {
            // Declaration order, whatever order the guest produced.
            let terms: Vec<Term> = flags
                .names()
                .filter(|n| set.iter().any(|s| s == n))
                .map(|n| name_atom(env, n))
                .collect();
            terms.encode(env)
        }
        (Val::Option(None), _) => nil().encode(env),
        (Val::Option(Some(v)), Type::Option(opt)) => {
            let inner_ty = opt.ty();
            let inner = val_to_term(env, v, &inner_ty);
            if matches!(inner_ty, Type::Option(_)) {
                make_tuple(env, &[some().encode(env), inner])
            } else {
                inner
            }
        }
        (Val::Result(r), Type::Result(res)) => {
            let (tag, payload, slot_ty) = match r {
                Ok(p) => (ok().encode(env), p, res.ok()),
                Err(p) => (error().encode(env), p, res.err()),
            };
            match (payload, slot_ty) {
                (Some(p), Some(t)) => make_tuple(env, &[tag, val_to_term(env, p, &t)]),
                _ => tag,
            }
        }
        // Shapes that wasmtime never produces for a well-typed value.
        _ => nil().encode(env),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_convert_both_ways() {
        assert_eq!(kebab_to_snake("longest-word"), "longest_word");
        assert_eq!(snake_to_kebab("longest_word"), "longest-word");
        assert_eq!(kebab_to_snake("dark-slate-gray"), "dark_slate_gray");
        assert_eq!(snake_to_kebab(&kebab_to_snake("a-b-c1")), "a-b-c1");
    }

    #[test]
    fn integers_are_range_checked_with_the_bounds_in_the_message() {
        assert!(matches!(int_val(&Type::U8, 255), Ok(Val::U8(255))));
        assert_eq!(
            int_val(&Type::U8, 256).unwrap_err(),
            "expected u8 (0..255), got 256"
        );
        assert_eq!(
            int_val(&Type::U8, -1).unwrap_err(),
            "expected u8 (0..255), got -1"
        );
        assert!(matches!(int_val(&Type::S8, -128), Ok(Val::S8(-128))));
        assert!(int_val(&Type::S8, 128).is_err());
        assert!(matches!(
            int_val(&Type::U64, u64::MAX as i128),
            Ok(Val::U64(u64::MAX))
        ));
        assert!(int_val(&Type::U64, u64::MAX as i128 + 1).is_err());
        assert!(matches!(
            int_val(&Type::S64, i64::MIN as i128),
            Ok(Val::S64(i64::MIN))
        ));
        assert!(int_val(&Type::S64, i64::MIN as i128 - 1).is_err());
        assert!(int_val(&Type::Bool, 1).is_err());
    }

    #[test]
    fn chars_reject_surrogates_and_out_of_range() {
        assert_eq!(char_val('a' as i128), Ok('a'));
        assert_eq!(char_val(0x1F600), Ok('😀'));
        assert!(char_val(0xD800).is_err());
        assert!(char_val(0x110000).is_err());
        assert!(char_val(-1).is_err());
    }

    #[test]
    fn special_floats() {
        assert!(special_float("nan").unwrap().is_nan());
        assert_eq!(special_float("infinity"), Some(f64::INFINITY));
        assert_eq!(special_float("neg_infinity"), Some(f64::NEG_INFINITY));
        assert_eq!(special_float("inf"), None);
    }

    #[test]
    fn paths_render_like_elixir_access() {
        let mut p = Path::arg(0);
        p.0.push(Seg::Field("points".into()));
        p.0.push(Seg::Index(2));
        p.0.push(Seg::Field("x".into()));
        assert_eq!(p.render(), "args[0].points[2].x");
        let mut p = Path::arg(1);
        p.0.push(Seg::Case("polygon".into()));
        p.0.push(Seg::Elem(1));
        assert_eq!(p.render(), "args[1](polygon).1");
        assert_eq!(Path::root("result").render(), "result");
    }
}
