//! WIT types as readable Elixir terms, for `Capsid.Component.exports/1` and
//! `imports/1`: `:u8`, `{:list, :u8}`, `{:record, [{"x", :s32}]}`, ...

use rustler::types::tuple::make_tuple;
use rustler::{Atom, Encoder, Env, Term};
use wasmtime::component::types::{ComponentFunc, Type};

rustler::atoms! {
    bool, s8, u8, s16, u16, s32, u32, s64, u64, f32, f64, char, string,
    list, tuple, record, variant, r#enum = "enum", flags, option, result,
    own, borrow, map, future, stream, error_context, unsupported, nil,
}

fn tagged<'a>(env: Env<'a>, tag: Atom, items: &[Term<'a>]) -> Term<'a> {
    let mut all = Vec::with_capacity(items.len() + 1);
    all.push(tag.encode(env));
    all.extend_from_slice(items);
    make_tuple(env, &all)
}

fn opt<'a>(env: Env<'a>, ty: Option<Type>) -> Term<'a> {
    ty.map_or_else(|| nil().encode(env), |t| encode_type(env, &t))
}

pub fn encode_type<'a>(env: Env<'a>, ty: &Type) -> Term<'a> {
    match ty {
        Type::Bool => bool().encode(env),
        Type::S8 => s8().encode(env),
        Type::U8 => u8().encode(env),
        Type::S16 => s16().encode(env),
        Type::U16 => u16().encode(env),
        Type::S32 => s32().encode(env),
        Type::U32 => u32().encode(env),
        Type::S64 => s64().encode(env),
        Type::U64 => u64().encode(env),
        Type::Float32 => f32().encode(env),
        Type::Float64 => f64().encode(env),
        Type::Char => char().encode(env),
        Type::String => string().encode(env),
        Type::List(l) => tagged(env, list(), &[encode_type(env, &l.ty())]),
        Type::Tuple(t) => {
            let items: Vec<Term> = t.types().map(|t| encode_type(env, &t)).collect();
            tagged(env, tuple(), &[items.encode(env)])
        }
        Type::Record(r) => {
            let fields: Vec<Term> = r
                .fields()
                .map(|f| make_tuple(env, &[f.name.encode(env), encode_type(env, &f.ty)]))
                .collect();
            tagged(env, record(), &[fields.encode(env)])
        }
        Type::Variant(v) => {
            let cases: Vec<Term> = v
                .cases()
                .map(|c| make_tuple(env, &[c.name.encode(env), opt(env, c.ty)]))
                .collect();
            tagged(env, variant(), &[cases.encode(env)])
        }
        Type::Enum(e) => tagged(env, r#enum(), &[e.names().collect::<Vec<_>>().encode(env)]),
        Type::Flags(f) => tagged(env, flags(), &[f.names().collect::<Vec<_>>().encode(env)]),
        Type::Option(o) => tagged(env, option(), &[encode_type(env, &o.ty())]),
        Type::Result(r) => tagged(env, result(), &[opt(env, r.ok()), opt(env, r.err())]),
        Type::Own(_) => tagged(env, own(), &[]),
        Type::Borrow(_) => tagged(env, borrow(), &[]),
        Type::Map(_) => map().encode(env),
        Type::Future(_) => future().encode(env),
        Type::Stream(_) => stream().encode(env),
        Type::ErrorContext => error_context().encode(env),
        Type::FixedLengthList(_) => unsupported().encode(env),
    }
}

/// `{params, result}`: params as `[{"name", type}]`, result a type or `nil`.
pub fn encode_func<'a>(env: Env<'a>, func: &ComponentFunc) -> (Term<'a>, Term<'a>) {
    let params: Vec<Term> = func
        .params()
        .map(|(name, t)| make_tuple(env, &[name.encode(env), encode_type(env, &t)]))
        .collect();
    (params.encode(env), opt(env, func.results().next()))
}
