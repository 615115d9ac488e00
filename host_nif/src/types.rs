//! WIT types as readable Elixir terms, for `Capsid.Component.exports/1` and
//! `imports/1`: `:u8`, `{:list, :u8}`, `{:record, [{"x", :s32}]}`, ...

use crate::component::FuncInfo;
use crate::shape::{Names, Shape};
use rustler::types::tuple::make_tuple;
use rustler::{Atom, Encoder, Env, Term};

rustler::atoms! {
    bool, s8, u8, s16, u16, s32, u32, s64, u64, f32, f64, char, string,
    list, tuple, record, variant, r#enum = "enum", flags, option, result,
    own, borrow, unsupported, nil,
}

fn tagged<'a>(env: Env<'a>, tag: Atom, items: &[Term<'a>]) -> Term<'a> {
    let mut all = Vec::with_capacity(items.len() + 1);
    all.push(tag.encode(env));
    all.extend_from_slice(items);
    make_tuple(env, &all)
}

fn opt<'a>(env: Env<'a>, shape: Option<&Shape>, names: &Names) -> Term<'a> {
    shape.map_or_else(|| nil().encode(env), |s| encode_shape(env, s, names))
}

pub fn encode_shape<'a>(env: Env<'a>, shape: &Shape, names: &Names) -> Term<'a> {
    match shape {
        Shape::Bool => bool().encode(env),
        Shape::S8 => s8().encode(env),
        Shape::U8 => u8().encode(env),
        Shape::S16 => s16().encode(env),
        Shape::U16 => u16().encode(env),
        Shape::S32 => s32().encode(env),
        Shape::U32 => u32().encode(env),
        Shape::S64 => s64().encode(env),
        Shape::U64 => u64().encode(env),
        Shape::F32 => f32().encode(env),
        Shape::F64 => f64().encode(env),
        Shape::Char => char().encode(env),
        Shape::String => string().encode(env),
        Shape::Bytes => tagged(env, list(), &[u8().encode(env)]),
        Shape::List(e) => tagged(env, list(), &[encode_shape(env, e, names)]),
        Shape::Tuple(items) => {
            let items: Vec<Term> = items.iter().map(|t| encode_shape(env, t, names)).collect();
            tagged(env, tuple(), &[items.encode(env)])
        }
        Shape::Record(fields) => {
            let fields: Vec<Term> = fields
                .iter()
                .map(|(id, s)| {
                    make_tuple(
                        env,
                        &[names.wit(*id).encode(env), encode_shape(env, s, names)],
                    )
                })
                .collect();
            tagged(env, record(), &[fields.encode(env)])
        }
        Shape::Variant(cases) => {
            let cases: Vec<Term> = cases
                .iter()
                .map(|(id, s)| {
                    make_tuple(
                        env,
                        &[names.wit(*id).encode(env), opt(env, s.as_ref(), names)],
                    )
                })
                .collect();
            tagged(env, variant(), &[cases.encode(env)])
        }
        Shape::Enum(cases) => {
            let cases: Vec<&str> = cases.iter().map(|id| names.wit(*id)).collect();
            tagged(env, r#enum(), &[cases.encode(env)])
        }
        Shape::Flags(fl) => {
            let fl: Vec<&str> = fl.iter().map(|id| names.wit(*id)).collect();
            tagged(env, flags(), &[fl.encode(env)])
        }
        Shape::Option(s) => tagged(env, option(), &[encode_shape(env, s, names)]),
        Shape::Result(ok, err) => tagged(
            env,
            result(),
            &[
                opt(env, ok.as_deref(), names),
                opt(env, err.as_deref(), names),
            ],
        ),
        Shape::Own(r) => tagged(env, own(), &[names.resource(*r).encode(env)]),
        Shape::Borrow(r) => tagged(env, borrow(), &[names.resource(*r).encode(env)]),
        Shape::Unsupported(what) => tagged(env, unsupported(), &[what.encode(env)]),
    }
}

/// Functions as `{name, interface | nil, short_name, params, result}`,
/// params as `[{"name", type}]`, result a type or `nil`.
pub fn encode_funcs<'a, 'b>(
    env: Env<'a>,
    funcs: impl Iterator<Item = &'b FuncInfo>,
    names: &Names,
) -> Term<'a> {
    let items: Vec<Term> = funcs
        .map(|f| {
            let params: Vec<Term> = f
                .params
                .iter()
                .map(|(n, s)| make_tuple(env, &[n.encode(env), encode_shape(env, s, names)]))
                .collect();
            make_tuple(
                env,
                &[
                    f.name.encode(env),
                    f.interface.encode(env),
                    f.short.encode(env),
                    params.encode(env),
                    opt(env, f.result.as_ref(), names),
                ],
            )
        })
        .collect();
    items.encode(env)
}
