//! A component's API as WIT, with its type names and doc comments, decoded
//! by `wit-parser` (the decoder of `wasm-tools component wit`): the text of
//! `Capsid.Component.describe/1` and the material of `Capsid.Bindings`.
//!
//! wasmtime's own types (see types.rs) are structural: they say what a
//! value looks like, not what the WIT called it. The names live in the
//! component's type exports, its doc comments in the `package-docs` custom
//! section, and wit-parser reads both.
//!
//! Everything here comes from an untrusted component and runs at compile
//! time of an Elixir module or on request: the output is bounded by a node
//! budget (anonymous types are written out where used, and WIT allows a
//! type of 2^18 leaves in a few hundred bytes), and names are returned as
//! strings, never atoms.

use crate::error::Error;
use rustler::types::tuple::make_tuple;
use rustler::{Binary, Encoder, Env, Term};
use std::fmt::Write;
use wit_component::WitPrinter;
use wit_parser::decoding::DecodedWasm;
use wit_parser::{
    Function, FunctionKind, Handle, Resolve, Type, TypeDefKind, TypeId, TypeOwner, WorldItem,
    WorldKey,
};

rustler::atoms! {
    ok,
    wit, world, docs, exports, imports, types, files,
    interface, function, id, name, key, kind, params, result, signature, owner,
    def, freestanding, constructor, method, r#static = "static",
    bool, s8, u8, s16, u16, s32, u32, s64, u64, f32, f64, char, string,
    list, tuple, record, variant, r#enum = "enum", flags, option,
    own, borrow, resource, r#ref = "ref", unsupported, nil,
}

/// Type nodes written out per component, at most.
const NODE_BUDGET: usize = 200_000;

/// Decodes the WIT of the component `bytes`: `{:ok, %{wit, world, docs,
/// exports, imports, types}}`, or an `:invalid_component` error.
#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn component_wit<'a>(env: Env<'a>, bytes: Binary) -> Term<'a> {
    describe(env, bytes.as_slice()).unwrap_or_else(|e| e.encode(env))
}

fn describe<'a>(env: Env<'a>, bytes: &[u8]) -> Result<Term<'a>, Error> {
    // wit-parser applies a `package-docs` section to the component's own
    // `root:component` package and fails the decode when it documents
    // other packages' interfaces: then decode without it, and give its docs
    // to whichever package it fits.
    let decoded = wit_parser::decoding::decode(bytes).or_else(|first| {
        let (stripped, docs) = split_package_docs(bytes);
        if docs.is_empty() {
            return Err(first);
        }
        let mut decoded = wit_parser::decoding::decode(&stripped)?;
        if let DecodedWasm::Component(resolve, _) = &mut decoded {
            // Each try copies the resolve: a few sections are plenty.
            for section in docs.into_iter().take(8) {
                inject_docs(resolve, section);
            }
        }
        Ok(decoded)
    });
    let (resolve, world) = match decoded {
        Ok(DecodedWasm::Component(resolve, world)) => (resolve, world),
        Ok(DecodedWasm::WitPackage(..)) => {
            return Err(Error::InvalidComponent(
                "this is a WIT package, not a component".into(),
            ));
        }
        Err(e) => {
            return Err(Error::InvalidComponent(format!(
                "cannot decode the component's WIT: {e:#}"
            )));
        }
    };
    api(env, &resolve, world, &[])
}

/// Parses the WIT package in directory `dir` (with its `deps/`) and
/// describes `world` of it (nil: its only world) as `component_wit` does,
/// plus `files`, the WIT files read: `Capsid.Bindings`' `wit:` option.
#[cfg_attr(not(test), rustler::nif(schedule = "DirtyIo"))]
fn wit_dir<'a>(env: Env<'a>, dir: String, world: Option<String>) -> Term<'a> {
    let mut resolve = wit_parser::Resolve::default();
    let parsed = resolve
        .push_dir(&dir)
        .and_then(|(pkg, sources)| Ok((resolve.select_world(&[pkg], world.as_deref())?, sources)));
    match parsed {
        Ok((world, sources)) => {
            let files: Vec<String> = sources
                .paths()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            api(env, &resolve, world, &files).unwrap_or_else(|e| e.encode(env))
        }
        Err(e) => {
            Error::InvalidComponent(format!("cannot read the WIT in {dir}: {e:#}")).encode(env)
        }
    }
}

/// `{:ok, %{wit, world, docs, exports, imports, types, files}}` for `world`.
fn api<'a>(
    env: Env<'a>,
    resolve: &wit_parser::Resolve,
    world: wit_parser::WorldId,
    files: &[String],
) -> Result<Term<'a>, Error> {
    let mut enc = Describer {
        env,
        resolve,
        budget: NODE_BUDGET,
        named: Vec::new(),
    };
    let w = &resolve.worlds[world];
    let exports = enc.items(w.exports.iter())?;
    let imports = enc.items(w.imports.iter())?;
    let types = enc.type_table()?;

    let text = print(resolve, world)?;
    let keys = [
        wit(),
        self::world(),
        docs(),
        self::exports(),
        self::imports(),
        self::types(),
        self::files(),
    ]
    .map(|a| a.encode(env));
    let vals = [
        text.encode(env),
        w.name.encode(env),
        w.docs.contents.encode(env),
        exports,
        imports,
        types,
        files.encode(env),
    ];
    let map = Term::map_from_term_arrays(env, &keys, &vals)
        .map_err(|_| Error::Internal("building the WIT description".into()))?;
    Ok(make_tuple(env, &[ok().encode(env), map]))
}

/// The component without its top-level `package-docs` custom sections, and
/// their contents. A top-level section is an id byte, a LEB128 size and its
/// contents; a custom section's contents start with its name.
fn split_package_docs(bytes: &[u8]) -> (Vec<u8>, Vec<&[u8]>) {
    const NAME: &[u8] = b"package-docs";
    let mut kept = bytes[..bytes.len().min(8)].to_vec();
    let mut docs = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let start = at;
        let id = bytes[at];
        let Some((size, after)) = leb_u32(bytes, at + 1) else {
            break;
        };
        let end = after.saturating_add(size as usize).min(bytes.len());
        let contents = &bytes[after..end];
        let named = leb_u32(contents, 0).and_then(|(n, p)| {
            contents
                .get(p..p + n as usize)
                .map(|name| (name, p + n as usize))
        });
        match named {
            Some((name, data)) if id == 0 && name == NAME => docs.push(&contents[data..]),
            _ => kept.extend_from_slice(&bytes[start..end]),
        }
        at = end;
    }
    (kept, docs)
}

fn leb_u32(bytes: &[u8], mut at: usize) -> Option<(u32, usize)> {
    let mut value: u32 = 0;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(at)?;
        at += 1;
        value |= u32::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some((value, at));
        }
    }
    None
}

/// Gives the docs of a `package-docs` section to the first package that
/// has every world and interface it documents (tried on a copy, so that a
/// package it does not fit is left as it was).
fn inject_docs(resolve: &mut Resolve, section: &[u8]) {
    let Ok(meta) = wit_parser::PackageMetadata::decode(section) else {
        return;
    };
    let packages: Vec<_> = resolve.packages.iter().map(|(id, _)| id).collect();
    for pkg in packages {
        let mut attempt = resolve.clone();
        if meta.inject(&mut attempt, pkg).is_ok() {
            *resolve = attempt;
            return;
        }
    }
}

/// The world's package and every package it uses, as `wasm-tools component
/// wit` prints them.
fn print(resolve: &Resolve, world: wit_parser::WorldId) -> Result<String, Error> {
    let pkg = resolve.worlds[world]
        .package
        .ok_or_else(|| Error::InvalidComponent("the component's world has no package".into()))?;
    let nested: Vec<_> = resolve
        .packages
        .iter()
        .map(|(id, _)| id)
        .filter(|id| *id != pkg)
        .collect();
    let mut printer = WitPrinter::default();
    printer
        .print(resolve, pkg, &nested)
        .map_err(|e| Error::InvalidComponent(format!("cannot print the component's WIT: {e:#}")))?;
    Ok(printer.output.to_string())
}

struct Describer<'r, 'a> {
    env: Env<'a>,
    resolve: &'r Resolve,
    budget: usize,
    /// Named types referred to, in order of first reference.
    named: Vec<TypeId>,
}

impl<'r, 'a> Describer<'r, 'a> {
    fn spend(&mut self) -> Result<(), Error> {
        self.budget = self.budget.checked_sub(1).ok_or_else(|| {
            Error::ResourceLimit(format!(
                "the component's types are too large to describe (over {NODE_BUDGET} type nodes)"
            ))
        })?;
        Ok(())
    }

    /// `[{:interface, %{id, key, name, docs, types, function}} | {:function, f} | {:type, ref}]`
    fn items<'i>(
        &mut self,
        items: impl Iterator<Item = (&'i WorldKey, &'i WorldItem)>,
    ) -> Result<Term<'a>, Error> {
        let env = self.env;
        let mut out = Vec::new();
        for (wkey, item) in items {
            let t = match item {
                WorldItem::Interface { id: iid, .. } => {
                    let iface = &self.resolve.interfaces[*iid];
                    let mut tys = Vec::new();
                    for (_, ty) in iface.types.iter() {
                        tys.push(self.reference(*ty)?);
                    }
                    let mut funcs = Vec::new();
                    for (_, f) in iface.functions.iter() {
                        funcs.push(self.function(f)?);
                    }
                    let keys = [self::id(), key(), name(), docs(), types(), function()]
                        .map(|a| a.encode(env));
                    let vals = [
                        iid.index().encode(env),
                        self.resolve.name_world_key(wkey).encode(env),
                        iface.name.encode(env),
                        iface.docs.contents.encode(env),
                        tys.encode(env),
                        funcs.encode(env),
                    ];
                    let map = Term::map_from_term_arrays(env, &keys, &vals)
                        .map_err(|_| Error::Internal("building an interface".into()))?;
                    make_tuple(env, &[interface().encode(env), map])
                }
                WorldItem::Function(f) => {
                    make_tuple(env, &[function().encode(env), self.function(f)?])
                }
                WorldItem::Type { id, .. } => {
                    make_tuple(env, &[types().encode(env), self.reference(*id)?])
                }
            };
            out.push(t);
        }
        Ok(out.encode(env))
    }

    /// `%{name, kind, docs, params, result, signature}`; `kind` is
    /// `:freestanding` or `{:constructor | :method | :static, resource_ref}`.
    fn function(&mut self, f: &Function) -> Result<Term<'a>, Error> {
        let env = self.env;
        let kind_term = match &f.kind {
            FunctionKind::Freestanding | FunctionKind::AsyncFreestanding => {
                freestanding().encode(env)
            }
            FunctionKind::Constructor(r) => {
                make_tuple(env, &[constructor().encode(env), self.reference(*r)?])
            }
            FunctionKind::Method(r) | FunctionKind::AsyncMethod(r) => {
                make_tuple(env, &[method().encode(env), self.reference(*r)?])
            }
            FunctionKind::Static(r) | FunctionKind::AsyncStatic(r) => {
                make_tuple(env, &[r#static().encode(env), self.reference(*r)?])
            }
        };
        let mut ps = Vec::with_capacity(f.params.len());
        for p in &f.params {
            let t = self.ty(&p.ty)?;
            ps.push(make_tuple(env, &[p.name.encode(env), t]));
        }
        let res = match &f.result {
            Some(t) => self.ty(t)?,
            None => nil().encode(env),
        };
        let keys = [name(), kind(), docs(), params(), result(), signature()].map(|a| a.encode(env));
        let vals = [
            f.name.encode(env),
            kind_term,
            f.docs.contents.encode(env),
            ps.encode(env),
            res,
            self.signature(f)?.encode(env),
        ];
        Term::map_from_term_arrays(env, &keys, &vals)
            .map_err(|_| Error::Internal("building a function".into()))
    }

    /// `func(a: s32, p: point) -> result<point, string>`, with type names.
    fn signature(&mut self, f: &Function) -> Result<String, Error> {
        let mut s = String::from("func(");
        for (i, p) in f.params.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{}: {}", p.name, self.type_name(&p.ty)?);
        }
        s.push(')');
        if let Some(t) = &f.result {
            let _ = write!(s, " -> {}", self.type_name(t)?);
        }
        Ok(s)
    }

    fn type_name(&mut self, t: &Type) -> Result<String, Error> {
        let mut printer = WitPrinter::default();
        printer
            .print_type_name(self.resolve, t)
            .map_err(|e| Error::Internal(format!("printing a type: {e:#}")))?;
        let s = printer.output.to_string();
        // A type name is printed in full down to its named parts: bound it.
        self.budget = self.budget.checked_sub(s.len() / 16).ok_or_else(|| {
            Error::ResourceLimit("the component's type names are too long to describe".into())
        })?;
        Ok(s)
    }

    /// `{:ref, id}` for a named type (its definition is in the type table),
    /// the type written out for an anonymous one.
    fn reference(&mut self, id: TypeId) -> Result<Term<'a>, Error> {
        let env = self.env;
        if self.resolve.types[id].name.is_some() {
            if !self.named.contains(&id) {
                self.named.push(id);
            }
            return Ok(make_tuple(
                env,
                &[r#ref().encode(env), id.index().encode(env)],
            ));
        }
        self.def(id)
    }

    fn ty(&mut self, t: &Type) -> Result<Term<'a>, Error> {
        self.spend()?;
        let env = self.env;
        Ok(match t {
            Type::Bool => bool().encode(env),
            Type::U8 => u8().encode(env),
            Type::U16 => u16().encode(env),
            Type::U32 => u32().encode(env),
            Type::U64 => u64().encode(env),
            Type::S8 => s8().encode(env),
            Type::S16 => s16().encode(env),
            Type::S32 => s32().encode(env),
            Type::S64 => s64().encode(env),
            Type::F32 => f32().encode(env),
            Type::F64 => f64().encode(env),
            Type::Char => char().encode(env),
            Type::String => string().encode(env),
            Type::ErrorContext => make_tuple(
                env,
                &[unsupported().encode(env), "error-context".encode(env)],
            ),
            Type::Id(id) => return self.reference(*id),
        })
    }

    fn opt(&mut self, t: &Option<Type>) -> Result<Term<'a>, Error> {
        match t {
            Some(t) => self.ty(t),
            None => Ok(nil().encode(self.env)),
        }
    }

    /// A type definition, as `Capsid.Types` writes types, with `{:ref, id}`
    /// for named parts, `{:resource}` for a resource and `{:own | :borrow,
    /// ref}` for handles.
    fn def(&mut self, id: TypeId) -> Result<Term<'a>, Error> {
        self.spend()?;
        let env = self.env;
        let tag = |a: rustler::Atom, rest: &[Term<'a>]| {
            let mut all = vec![a.encode(env)];
            all.extend_from_slice(rest);
            make_tuple(env, &all)
        };
        let resolve = self.resolve;
        Ok(match &resolve.types[id].kind {
            TypeDefKind::Record(r) => {
                let mut fs = Vec::with_capacity(r.fields.len());
                for f in &r.fields {
                    let t = self.ty(&f.ty)?;
                    fs.push(make_tuple(env, &[f.name.encode(env), t]));
                }
                tag(record(), &[fs.encode(env)])
            }
            TypeDefKind::Resource => tag(resource(), &[]),
            TypeDefKind::Handle(Handle::Own(r)) => {
                let r = self.reference(*r)?;
                tag(own(), &[r])
            }
            TypeDefKind::Handle(Handle::Borrow(r)) => {
                let r = self.reference(*r)?;
                tag(borrow(), &[r])
            }
            TypeDefKind::Flags(f) => {
                let names: Vec<&str> = f.flags.iter().map(|f| f.name.as_str()).collect();
                self.budget = self.budget.saturating_sub(names.len());
                tag(flags(), &[names.encode(env)])
            }
            TypeDefKind::Tuple(t) => {
                let mut ts = Vec::with_capacity(t.types.len());
                for t in &t.types {
                    ts.push(self.ty(t)?);
                }
                tag(tuple(), &[ts.encode(env)])
            }
            TypeDefKind::Variant(v) => {
                let mut cs = Vec::with_capacity(v.cases.len());
                for c in &v.cases {
                    let t = self.opt(&c.ty)?;
                    cs.push(make_tuple(env, &[c.name.encode(env), t]));
                }
                tag(variant(), &[cs.encode(env)])
            }
            TypeDefKind::Enum(e) => {
                let names: Vec<&str> = e.cases.iter().map(|c| c.name.as_str()).collect();
                self.budget = self.budget.saturating_sub(names.len());
                tag(r#enum(), &[names.encode(env)])
            }
            TypeDefKind::Option(t) => {
                let t = self.ty(t)?;
                tag(option(), &[t])
            }
            TypeDefKind::Result(r) => {
                let ok_t = self.opt(&r.ok)?;
                let err_t = self.opt(&r.err)?;
                tag(result(), &[ok_t, err_t])
            }
            TypeDefKind::List(t) => {
                let t = self.ty(t)?;
                tag(list(), &[t])
            }
            TypeDefKind::Type(t) => return self.ty(t),
            TypeDefKind::Map(..) => tag(unsupported(), &["map".encode(env)]),
            TypeDefKind::FixedLengthList(..) => {
                tag(unsupported(), &["fixed-length list".encode(env)])
            }
            TypeDefKind::Future(_) => tag(unsupported(), &["future".encode(env)]),
            TypeDefKind::Stream(_) => tag(unsupported(), &["stream".encode(env)]),
            TypeDefKind::Unknown => tag(unsupported(), &["unknown".encode(env)]),
        })
    }

    /// `%{id => %{name, docs, owner, def}}` for every named type referred
    /// to (and those their definitions refer to); `owner` is the `id` of
    /// the interface that defines it, `:world`, or `nil`.
    fn type_table(&mut self) -> Result<Term<'a>, Error> {
        let env = self.env;
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        let mut i = 0;
        // `def` may add more named types: walk until none is left.
        while i < self.named.len() {
            let id = self.named[i];
            i += 1;
            let t = &self.resolve.types[id];
            let owner_term = match t.owner {
                TypeOwner::Interface(iface) => iface.index().encode(env),
                TypeOwner::World(_) => self::world().encode(env),
                TypeOwner::None => nil().encode(env),
            };
            let d = self.def(id)?;
            let ks = [name(), docs(), owner(), def()].map(|a| a.encode(env));
            let vs = [
                t.name.encode(env),
                t.docs.contents.encode(env),
                owner_term,
                d,
            ];
            keys.push(id.index().encode(env));
            vals.push(
                Term::map_from_term_arrays(env, &ks, &vs)
                    .map_err(|_| Error::Internal("building a type".into()))?,
            );
        }
        Term::map_from_term_arrays(env, &keys, &vals)
            .map_err(|_| Error::Internal("building the type table".into()))
    }
}
