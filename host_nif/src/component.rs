//! Compiled components: compilation off the normal schedulers, the table of
//! exported functions with their WIT types, and function-name resolution.

use crate::cache::{self, Cache};
use crate::engine::engine;
use crate::error::{Error, Result, root_message};
use crate::types::encode_func;
use rustler::types::tuple::make_tuple;
use rustler::{Binary, Encoder, Env, Resource, ResourceArc, Term};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::{Component, ComponentExportIndex};

/// Native stack for compiling: parsing and validating deeply nested input
/// must not depend on the size of a dirty scheduler's stack.
const COMPILE_STACK: usize = 16 * 1024 * 1024;

/// One function of the component's interface, exported or imported.
pub struct FuncInfo {
    /// Callable name: `"add"` or `"acme:calc/math@1.0.0#add"`.
    pub name: String,
    /// `"acme:calc/math@1.0.0"` for interface functions.
    pub interface: Option<String>,
    /// The function's own name, `"add"`.
    pub short: String,
    pub ty: ComponentFunc,
}

pub struct Export {
    pub info: FuncInfo,
    pub index: ComponentExportIndex,
    /// Parameter types and the result type, resolved once at load (deriving
    /// them per call costs more than a trivial call itself).
    pub params: Vec<Type>,
    pub result: Option<Type>,
    /// Set when the function can take wasmtime's typed path (see `Fast`).
    pub fast: Option<Fast>,
}

/// A binary-like WIT type with a typed, memcpy-based representation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blob {
    /// `list<u8>`
    Bytes,
    /// `string`
    Str,
}

/// Signature of a unary binary function, `(list<u8> | string) -> (list<u8> |
/// string)?`. wasmtime's dynamic `Val` API moves a `list<u8>` one `Val` per
/// byte (measured: ~60 ns per byte); its typed API copies the bytes in one
/// go. These signatures are the ones that move bulk data, so they take the
/// typed path; everything else goes through `Val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fast {
    pub arg: Blob,
    pub result: Option<Blob>,
}

fn blob(ty: &Type) -> Option<Blob> {
    match ty {
        Type::String => Some(Blob::Str),
        Type::List(l) if matches!(l.ty(), Type::U8) => Some(Blob::Bytes),
        _ => None,
    }
}

impl Export {
    fn new(info: FuncInfo, index: ComponentExportIndex) -> Self {
        let params: Vec<Type> = info.ty.params().map(|(_, t)| t).collect();
        let result = info.ty.results().next();
        let fast = match (params.as_slice(), &result) {
            ([p], None) => blob(p).map(|arg| Fast { arg, result: None }),
            ([p], Some(r)) => match (blob(p), blob(r)) {
                (Some(arg), Some(r)) => Some(Fast {
                    arg,
                    result: Some(r),
                }),
                _ => None,
            },
            _ => None,
        };
        Export {
            info,
            index,
            params,
            result,
            fast,
        }
    }
}

enum Lookup {
    One(usize),
    Ambiguous(Vec<usize>),
}

pub struct ComponentResource {
    pub component: Component,
    pub hash: String,
    pub exports: Vec<Export>,
    lookup: HashMap<String, Lookup>,
    pub imports: Vec<FuncInfo>,
}

#[cfg_attr(not(test), rustler::resource_impl)]
impl Resource for ComponentResource {}

/// `"acme:calc/math@1.0.0"` → `"acme:calc/math"`.
pub fn strip_version(interface: &str) -> &str {
    interface
        .split_once('@')
        .map_or(interface, |(base, _)| base)
}

impl ComponentResource {
    pub fn new(component: Component, hash: String) -> Result<Self> {
        let engine = engine();
        let ty = component.component_type();
        let mut exports = Vec::new();
        for (name, item) in ty.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(func) => {
                    let index = component
                        .get_export_index(None, name)
                        .ok_or_else(|| Error::Internal(format!("export {name} has no index")))?;
                    exports.push(Export::new(
                        FuncInfo {
                            name: name.to_string(),
                            interface: None,
                            short: name.to_string(),
                            ty: func,
                        },
                        index,
                    ));
                }
                ComponentItem::ComponentInstance(inst) => {
                    let Some(inst_index) = component.get_export_index(None, name) else {
                        continue;
                    };
                    for (fname, fitem) in inst.exports(engine) {
                        if let ComponentItem::ComponentFunc(func) = fitem.ty {
                            let Some(index) = component.get_export_index(Some(&inst_index), fname)
                            else {
                                continue;
                            };
                            exports.push(Export::new(
                                FuncInfo {
                                    name: format!("{name}#{fname}"),
                                    interface: Some(name.to_string()),
                                    short: fname.to_string(),
                                    ty: func,
                                },
                                index,
                            ));
                        }
                    }
                }
                _ => {}
            }
        }

        let mut imports = Vec::new();
        for (name, item) in ty.imports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(func) => imports.push(FuncInfo {
                    name: name.to_string(),
                    interface: None,
                    short: name.to_string(),
                    ty: func,
                }),
                ComponentItem::ComponentInstance(inst) => {
                    for (fname, fitem) in inst.exports(engine) {
                        if let ComponentItem::ComponentFunc(func) = fitem.ty {
                            imports.push(FuncInfo {
                                name: format!("{name}#{fname}"),
                                interface: Some(name.to_string()),
                                short: fname.to_string(),
                                ty: func,
                            });
                        }
                    }
                }
                _ => {}
            }
        }

        let lookup = build_lookup(&exports);
        Ok(ComponentResource {
            component,
            hash,
            exports,
            lookup,
            imports,
        })
    }

    /// Finds an export by root name, unique short name, or qualified name
    /// with or without the interface version.
    pub fn resolve(&self, name: &str) -> Result<usize> {
        match self.lookup.get(name) {
            Some(Lookup::One(i)) => Ok(*i),
            Some(Lookup::Ambiguous(candidates)) => {
                let names: Vec<&str> = candidates
                    .iter()
                    .map(|i| self.exports[*i].info.name.as_str())
                    .collect();
                Err(Error::UnknownFunction(format!(
                    "function name {name:?} is ambiguous: it matches {}; call it by its qualified name",
                    names.join(", ")
                )))
            }
            None => {
                let names: Vec<&str> = self.exports.iter().map(|e| e.info.name.as_str()).collect();
                Err(Error::UnknownFunction(format!(
                    "no exported function {name:?}; the component exports: {}",
                    if names.is_empty() {
                        "nothing".into()
                    } else {
                        names.join(", ")
                    }
                )))
            }
        }
    }
}

fn build_lookup(exports: &[Export]) -> HashMap<String, Lookup> {
    let mut lookup: HashMap<String, Lookup> = HashMap::new();
    let mut add = |key: String, i: usize| match lookup.get_mut(&key) {
        None => {
            lookup.insert(key, Lookup::One(i));
        }
        Some(Lookup::One(j)) if *j == i => {}
        Some(Lookup::One(j)) => {
            let j = *j;
            lookup.insert(key, Lookup::Ambiguous(vec![j, i]));
        }
        Some(Lookup::Ambiguous(v)) => v.push(i),
    };
    // Qualified names are always unique; add them first so nothing shadows them.
    for (i, e) in exports.iter().enumerate() {
        add(e.info.name.clone(), i);
    }
    for (i, e) in exports.iter().enumerate() {
        if let Some(iface) = &e.info.interface {
            add(format!("{}#{}", strip_version(iface), e.info.short), i);
        }
    }
    // A root export owns its short name; otherwise a short name resolves only
    // when exactly one interface function carries it.
    let roots: Vec<&str> = exports
        .iter()
        .filter(|e| e.info.interface.is_none())
        .map(|e| e.info.short.as_str())
        .collect();
    for (i, e) in exports.iter().enumerate() {
        if e.info.interface.is_some() && !roots.contains(&e.info.short.as_str()) {
            add(e.info.short.clone(), i);
        }
    }
    lookup
}

/// Why `bytes` cannot be a component, judged from its header.
pub fn check_header(bytes: &[u8]) -> Result<()> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(Error::InvalidComponent(if bytes.starts_with(MAGIC) {
            "truncated WebAssembly binary: the 8-byte header is incomplete".into()
        } else {
            "not a WebAssembly binary: expected the magic bytes \"\\0asm\" at the start".into()
        }));
    }
    match &bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(Error::InvalidComponent(
            "this is a core WebAssembly module, not a component; Capsid runs components \
             (build for wasm32-wasip2, or wrap the module with `wasm-tools component new`)"
                .into(),
        )),
        other => Err(Error::InvalidComponent(format!(
            "unsupported WebAssembly binary version/layer {other:02x?}; expected a component (0d 00 01 00)"
        ))),
    }
}

/// Compiles `bytes`, or loads them from `cache` when it holds a verified
/// artifact for them.
pub fn compile(bytes: &[u8], cache: Option<&Cache>) -> Result<(ComponentResource, cache::Outcome)> {
    check_header(bytes)?;
    let hash = format!("{:x}", Sha256::digest(bytes));
    let mut outcome = cache::Outcome::Disabled;
    if let Some(cache) = cache {
        match cache.load(&hash) {
            Ok(Some(component)) => {
                return Ok((
                    ComponentResource::new(component, hash)?,
                    cache::Outcome::Hit,
                ));
            }
            Ok(None) => outcome = cache::Outcome::Miss,
            Err(()) => outcome = cache::Outcome::Rejected,
        }
    }
    let owned = bytes.to_vec();
    let handle = std::thread::Builder::new()
        .name("capsid-compile".into())
        .stack_size(COMPILE_STACK)
        .spawn(move || Component::from_binary(engine(), &owned))
        .map_err(|e| Error::Internal(format!("could not start the compile thread: {e}")))?;
    let component = handle
        .join()
        .map_err(|_| Error::Internal("the compiler panicked".into()))?
        .map_err(|e| Error::InvalidComponent(format!("invalid component: {}", root_message(&e))))?;
    if let Some(cache) = cache {
        cache.store(&hash, &component);
    }
    Ok((ComponentResource::new(component, hash)?, outcome))
}

fn encode_funcs<'a, 'b>(env: Env<'a>, funcs: impl Iterator<Item = &'b FuncInfo>) -> Term<'a> {
    let items: Vec<Term> = funcs
        .map(|f| {
            let (params, result) = encode_func(env, &f.ty);
            make_tuple(
                env,
                &[
                    f.name.encode(env),
                    f.interface.encode(env),
                    f.short.encode(env),
                    params,
                    result,
                ],
            )
        })
        .collect();
    items.encode(env)
}

rustler::atoms! {
    hit,
    miss,
    rejected,
    disabled,
}

/// Compiles a component, through the cache in `cache_dir` unless nil.
/// Returns `{:ok, {ref, sha256_hex, exports, imports, cache}}`, each function
/// as `{name, interface | nil, short_name, params, result}` and `cache` one of
/// `:hit`, `:miss`, `:rejected` (a corrupt artifact was replaced), `:disabled`.
#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn component_compile<'a>(env: Env<'a>, bytes: Binary<'a>, cache_dir: Option<String>) -> Term<'a> {
    let cache = match cache_dir {
        None => None,
        Some(dir) => match Cache::open(std::path::Path::new(&dir)) {
            Ok(c) => Some(c),
            Err(e) => {
                return Error::InvalidComponent(format!(
                    "cannot use the cache directory {dir}: {e}"
                ))
                .encode(env);
            }
        },
    };
    match compile(bytes.as_slice(), cache.as_ref()) {
        Ok((res, outcome)) => {
            let exports = encode_funcs(env, res.exports.iter().map(|e| &e.info));
            let imports = encode_funcs(env, res.imports.iter());
            let hash = res.hash.clone();
            let resource = ResourceArc::new(res);
            let outcome = match outcome {
                cache::Outcome::Hit => hit(),
                cache::Outcome::Miss => miss(),
                cache::Outcome::Rejected => rejected(),
                cache::Outcome::Disabled => disabled(),
            };
            (
                rustler::types::atom::ok(),
                (resource, hash, exports, imports, outcome),
            )
                .encode(env)
        }
        Err(e) => e.encode(env),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_judged_with_clear_reasons() {
        assert!(check_header(b"\0asm\x0d\0\x01\0rest").is_ok());
        let core = check_header(b"\0asm\x01\0\0\0").unwrap_err().to_string();
        assert!(core.contains("core WebAssembly module"), "{core}");
        let garbage = check_header(b"hello world!").unwrap_err().to_string();
        assert!(garbage.contains("not a WebAssembly binary"), "{garbage}");
        let short = check_header(b"\0asm\x0d").unwrap_err().to_string();
        assert!(short.contains("truncated"), "{short}");
    }

    #[test]
    fn truncated_components_fail_to_compile() {
        let err = compile(b"\0asm\x0d\0\x01\0\x01\x05", None).err().unwrap();
        assert!(matches!(err, Error::InvalidComponent(_)), "{err}");
    }

    #[test]
    fn versions_are_stripped_from_interface_names() {
        assert_eq!(strip_version("acme:calc/math@1.0.0"), "acme:calc/math");
        assert_eq!(strip_version("acme:calc/math"), "acme:calc/math");
    }
}
