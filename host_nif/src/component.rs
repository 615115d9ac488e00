//! Compiled components: compilation off the normal schedulers and within
//! limits, the table of exported and imported functions with their compiled
//! types, function-name resolution, and the per-import-set link cache.

use crate::abi::{MAX_FLAT_PARAMS, shape_flat_count};
use crate::cache::{self, Cache};
use crate::engine::{Flavor, engine_of};
use crate::error::{Error, Result, root_message};
use crate::host::Host;
use crate::shape::{Budget, Builder, Names, Shape, snake_to_kebab};
use rustler::{Encoder, Env, LocalPid, OwnedEnv, Resource, ResourceArc, Term};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::component::types::{ComponentFunc, ComponentItem};
use wasmtime::component::{Component, ComponentExportIndex, InstancePre};

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
    pub params: Vec<(String, Shape)>,
    pub result: Option<Shape>,
    /// Its parameters or result can hold host resources (see
    /// `host_resource`): their values are walked on the way in and out.
    pub host: bool,
}

impl FuncInfo {
    fn new(
        builder: &mut Builder,
        name: String,
        interface: Option<String>,
        short: String,
        ty: &ComponentFunc,
    ) -> Result<Self> {
        builder.node()?;
        let mut params = Vec::new();
        for (pname, t) in ty.params() {
            params.push((pname.to_string(), builder.shape(&t)?));
        }
        let result = match ty.results().next() {
            Some(t) => Some(builder.shape(&t)?),
            None => None,
        };
        let pick = |id| builder.is_host(id);
        let host = params.iter().any(|(_, s)| s.mentions(&pick))
            || result.as_ref().is_some_and(|s| s.mentions(&pick));
        Ok(FuncInfo {
            name,
            interface,
            short,
            params,
            result,
            host,
        })
    }

    /// The optional import `[resource-drop]R` that a host resource `R`
    /// (type `id`) offers Elixir: run with the state when the guest drops it.
    fn resource_drop(interface: Option<&str>, name: &str, id: u32) -> Self {
        let short = format!("[resource-drop]{name}");
        FuncInfo {
            name: match interface {
                Some(i) => format!("{i}#{short}"),
                None => short.clone(),
            },
            interface: interface.map(str::to_string),
            short,
            params: vec![("self".to_string(), Shape::Own(id))],
            result: None,
            host: true,
        }
    }

    /// An import Elixir may leave out (a host resource's drop function).
    pub fn is_optional(&self) -> bool {
        self.short.starts_with("[resource-drop]")
    }

    /// Core values the parameters flatten to: the `N` of `abi::Lowered<N>`
    /// (1, a pointer, when they go through memory).
    pub fn flat_params(&self) -> usize {
        let n: usize = self.params.iter().map(|(_, s)| shape_flat_count(s)).sum();
        if n > MAX_FLAT_PARAMS { 1 } else { n }
    }

    pub fn heavy_params(&self) -> bool {
        self.params.iter().any(|(_, s)| s.is_heavy())
    }
}

pub struct Export {
    pub info: FuncInfo,
    pub index: ComponentExportIndex,
    pub flat_params: usize,
    pub heavy_result: bool,
}

/// A resource the component imports from the host (not WASI), implemented
/// in Elixir.
pub struct HostResource {
    pub interface: Option<String>,
    pub name: String,
    /// Its resource type: an index into the component's resource names,
    /// and its `ResourceType::host_dynamic` payload.
    pub id: u32,
}

/// An import implemented in Elixir: which component import it is and which
/// key of the user's `imports:` map implements it.
pub struct Bound {
    pub key: String,
    /// Index into `ComponentResource::imports`.
    pub import: usize,
}

/// The component linked with one set of Elixir imports (plus WASI),
/// pre-instantiated: shared by every instance started with that set.
pub struct Link {
    pub pre: InstancePre<Host>,
    pub bound: Vec<Bound>,
    /// Some Elixir import takes a list or a string: lifting its arguments
    /// may take long, so guests pause before host calls.
    pub heavy_imports: bool,
}

enum Lookup {
    One(usize),
    Ambiguous(Vec<usize>),
}

pub struct ComponentResource {
    pub component: Component,
    pub hash: String,
    pub exports: Vec<Export>,
    lookup: HashMap<String, Lookup, foldhash::fast::RandomState>,
    pub imports: Vec<FuncInfo>,
    /// The resources the component imports from Elixir; each also has a
    /// `[resource-drop]` entry at the end of `imports`.
    pub host_resources: Vec<HostResource>,
    pub names: Names,
    pub links: Mutex<HashMap<Vec<String>, Arc<Link>>>,
    /// The export `wasi:http/incoming-handler#handle`, if it has one: served
    /// with `Capsid.HTTP`, not called with values.
    pub http_handler: Option<usize>,
    /// Compiled with fuel metering (`fuel_metering`, the default): without
    /// it a call's `fuel:` limit cannot be honoured and is refused.
    pub fuel_metering: bool,
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
    pub fn new(env: Env, component: Component, hash: String, budget: Budget) -> Result<Self> {
        let engine = component.engine();
        let ty = component.component_type();
        let mut builder = Builder::new(budget);
        // Resource types first: functions refer to them. Imported ones
        // first, so that a type an exported interface re-uses stays the
        // host's; those of WASI are wasmtime-wasi's own.
        let mut host_resources = Vec::new();
        for (name, item) in ty.imports(engine) {
            match item.ty {
                // A type seen before is an alias (`use`): defined where it
                // was first imported, and only there.
                ComponentItem::Resource(r) => {
                    if let Some(id) = builder.resource_type(name, r, true)? {
                        host_resources.push(HostResource {
                            interface: None,
                            name: name.to_string(),
                            id,
                        });
                    }
                }
                ComponentItem::ComponentInstance(inst) => {
                    let wasi = name.starts_with("wasi:");
                    for (rname, ritem) in inst.exports(engine) {
                        if let ComponentItem::Resource(r) = ritem.ty
                            && let Some(id) = builder.resource_type(rname, r, !wasi)?
                            && !wasi
                        {
                            host_resources.push(HostResource {
                                interface: Some(name.to_string()),
                                name: rname.to_string(),
                                id,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        for (name, item) in ty.exports(engine) {
            match item.ty {
                ComponentItem::Resource(r) => {
                    builder.resource_type(name, r, false)?;
                }
                ComponentItem::ComponentInstance(inst) => {
                    for (rname, ritem) in inst.exports(engine) {
                        if let ComponentItem::Resource(r) = ritem.ty {
                            builder.resource_type(rname, r, false)?;
                        }
                    }
                }
                _ => {}
            }
        }
        let mut exports = Vec::new();
        for (name, item) in ty.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(func) => {
                    let index = component
                        .get_export_index(None, name)
                        .ok_or_else(|| Error::Internal(format!("export {name} has no index")))?;
                    let info = FuncInfo::new(
                        &mut builder,
                        name.to_string(),
                        None,
                        name.to_string(),
                        &func,
                    )?;
                    exports.push(export(info, index));
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
                            let info = FuncInfo::new(
                                &mut builder,
                                format!("{name}#{fname}"),
                                Some(name.to_string()),
                                fname.to_string(),
                                &func,
                            )?;
                            exports.push(export(info, index));
                        }
                    }
                }
                _ => {}
            }
        }

        let mut imports = Vec::new();
        for (name, item) in ty.imports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(func) => {
                    imports.push(FuncInfo::new(
                        &mut builder,
                        name.to_string(),
                        None,
                        name.to_string(),
                        &func,
                    )?);
                }
                ComponentItem::ComponentInstance(inst) => {
                    for (fname, fitem) in inst.exports(engine) {
                        if let ComponentItem::ComponentFunc(func) = fitem.ty {
                            imports.push(FuncInfo::new(
                                &mut builder,
                                format!("{name}#{fname}"),
                                Some(name.to_string()),
                                fname.to_string(),
                                &func,
                            )?);
                        }
                    }
                }
                _ => {}
            }
        }
        for r in &host_resources {
            imports.push(FuncInfo::resource_drop(
                r.interface.as_deref(),
                &r.name,
                r.id,
            ));
        }

        let names = builder.finish(env)?;
        let lookup = build_lookup(&exports);
        let fuel_metering = crate::engine::meters_fuel(engine);
        let http_handler = exports
            .iter()
            .position(|e| crate::http::is_handler(e.info.interface.as_deref(), &e.info.short));
        Ok(ComponentResource {
            component,
            hash,
            exports,
            lookup,
            imports,
            host_resources,
            names,
            links: Mutex::new(HashMap::new()),
            http_handler,
            fuel_metering,
        })
    }

    /// Finds an export by root name, unique short name, or qualified name
    /// with or without the interface version; snake_case spellings of
    /// kebab-case names are accepted.
    pub fn resolve(&self, name: &str) -> Result<usize> {
        let found = self.lookup.get(name).or_else(|| {
            name.contains('_')
                .then(|| self.lookup.get(&snake_to_kebab(name)))
                .flatten()
        });
        match found {
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
            None => Err(Error::UnknownFunction(self.unknown(name))),
        }
    }

    /// "no exported function ...; did you mean ...?" with a short list.
    fn unknown(&self, name: &str) -> String {
        if self.exports.is_empty() {
            return format!("no exported function {name:?}; the component exports no functions");
        }
        let wanted = snake_to_kebab(name);
        let mut scored: Vec<(f64, &str)> = self
            .lookup
            .keys()
            .map(|k| (similarity(&wanted, k), k.as_str()))
            .filter(|(s, _)| *s > 0.7)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.len().cmp(&b.1.len())));
        let mut suggestions: Vec<&str> = Vec::new();
        for (_, k) in scored {
            if !suggestions.contains(&k) {
                suggestions.push(k);
            }
            if suggestions.len() == 2 {
                break;
            }
        }
        // Names only, each as short as a call may spell it.
        let mut listed: Vec<&str> = self
            .exports
            .iter()
            .map(|e| match self.lookup.get(&e.info.short) {
                Some(Lookup::One(_)) => e.info.short.as_str(),
                _ => e.info.name.as_str(),
            })
            .collect();
        let total = listed.len();
        listed.truncate(12);
        let more = if total > 12 {
            format!(" and {} more", total - 12)
        } else {
            String::new()
        };
        let hint = match suggestions.as_slice() {
            [] => String::new(),
            [one] => format!("; did you mean {one:?}"),
            [a, b, ..] => format!("; did you mean {a:?} or {b:?}"),
        };
        format!(
            "no exported function {name:?}{hint}; the component exports: {}{more}",
            listed.join(", ")
        )
    }
}

fn export(info: FuncInfo, index: ComponentExportIndex) -> Export {
    let flat_params = info.flat_params();
    let heavy_result = info.result.as_ref().is_some_and(Shape::is_heavy);
    Export {
        info,
        index,
        flat_params,
        heavy_result,
    }
}

/// Jaro-Winkler similarity in 0..=1, for "did you mean".
fn similarity(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let window = (a.len().max(b.len()) / 2).saturating_sub(1);
    let mut b_used = vec![false; b.len()];
    let mut a_matches = Vec::new();
    for (i, ca) in a.iter().enumerate() {
        let lo = i.saturating_sub(window);
        let hi = (i + window + 1).min(b.len());
        if let Some(j) = (lo..hi).find(|&j| !b_used[j] && b[j] == *ca) {
            b_used[j] = true;
            a_matches.push(*ca);
        }
    }
    let m = a_matches.len() as f64;
    if m == 0.0 {
        return 0.0;
    }
    let b_matches: Vec<char> = b
        .iter()
        .zip(&b_used)
        .filter(|(_, u)| **u)
        .map(|(c, _)| *c)
        .collect();
    let transpositions = a_matches
        .iter()
        .zip(&b_matches)
        .filter(|(x, y)| x != y)
        .count() as f64
        / 2.0;
    let jaro = (m / a.len() as f64 + m / b.len() as f64 + (m - transpositions) / m) / 3.0;
    let prefix = a.iter().zip(&b).take(4).take_while(|(x, y)| x == y).count() as f64;
    jaro + prefix * 0.1 * (1.0 - jaro)
}

fn build_lookup(exports: &[Export]) -> HashMap<String, Lookup, foldhash::fast::RandomState> {
    let mut lookup: HashMap<String, Lookup, foldhash::fast::RandomState> = HashMap::default();
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

/// Limits on compilation: the component's size and how many compile at once.
#[derive(Clone, Copy, Debug)]
pub struct CompileLimits {
    pub max_bytes: usize,
    pub max_concurrent: usize,
}

static COMPILING: AtomicUsize = AtomicUsize::new(0);

/// Compilations running right now.
pub fn compiling() -> usize {
    COMPILING.load(Ordering::SeqCst)
}

/// A slot among the compilations allowed at once, released on drop.
struct Slot;

impl Slot {
    fn take(max: usize) -> Option<Slot> {
        COMPILING
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        COMPILING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What `compile` can answer besides a component.
pub enum Refusal {
    Error(Error),
    /// All compile slots are taken: try again shortly.
    Saturated,
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Error(e)
    }
}

/// What `compile` answers when it does not refuse.
pub enum Compiled {
    /// Loaded from the cache in this call.
    Ready(Box<ComponentResource>, cache::Outcome),
    /// Compiling on a thread of its own, which sends the outcome to the
    /// caller as `{:capsid_compiled, tag, reply}` (see `component_compile`).
    Started,
}

/// Loads `bytes`, compiled for `flavor`'s engine, from `cache` when it holds
/// a verified artifact for them; otherwise starts compiling them on a
/// thread of its own that answers
/// `pid` with `tag`. Compiling takes seconds for a large component: a dirty
/// scheduler waiting for it would be one fewer for everything that needs
/// one meanwhile (large values of calls that hold an instance, garbage
/// collections), so none waits.
pub fn compile(
    env: Env,
    bytes: &[u8],
    cache: Option<Cache>,
    flavor: Flavor,
    limits: CompileLimits,
    budget: Budget,
    reply_to: (LocalPid, Term, Option<String>),
) -> std::result::Result<Compiled, Refusal> {
    if bytes.len() > limits.max_bytes {
        return Err(Error::ResourceLimit(format!(
            "the component is {} bytes, the limit is {} bytes (config :capsid, :max_component_bytes)",
            bytes.len(),
            limits.max_bytes
        ))
        .into());
    }
    check_header(bytes)?;
    let hash = format!("{:x}", Sha256::digest(bytes));
    // Artifacts of the engine this compile is for, and only those.
    let cache = cache.map(|c| c.for_engine(flavor));
    let mut outcome = cache::Outcome::Disabled;
    if let Some(cache) = &cache {
        match cache.load(&hash, limits.max_bytes) {
            Ok(Some(component)) => {
                return Ok(Compiled::Ready(
                    Box::new(ComponentResource::new(env, component, hash, budget)?),
                    cache::Outcome::Hit,
                ));
            }
            Ok(None) => outcome = cache::Outcome::Miss,
            Err(()) => outcome = cache::Outcome::Rejected,
        }
    }
    let Some(slot) = Slot::take(limits.max_concurrent.max(1)) else {
        return Err(Refusal::Saturated);
    };
    if let (Some(cache), cache::Outcome::Rejected) = (&cache, &outcome) {
        cache.discard(&hash);
    }
    let owned = bytes.to_vec();
    let (pid, tag, warning) = reply_to;
    let mut msg_env = OwnedEnv::new();
    let tag = msg_env.save(tag);
    std::thread::Builder::new()
        .name("capsid-compile".into())
        .stack_size(COMPILE_STACK)
        .spawn(move || {
            let compiled = Component::from_binary(engine_of(flavor), &owned);
            drop(slot);
            // The caller may be gone; then nobody needs the answer.
            let _ = msg_env.send_and_clear(&pid, |env| {
                let reply = match compiled {
                    Err(e) => {
                        Error::InvalidComponent(format!("invalid component: {}", root_message(&e)))
                            .encode(env)
                    }
                    Ok(component) => match ComponentResource::new(env, component, hash, budget) {
                        Err(e) => e.encode(env),
                        Ok(res) => {
                            if let Some(cache) = &cache {
                                cache.store(&res.hash, &res.component);
                            }
                            encode_compiled(env, res, outcome, warning.as_deref())
                        }
                    },
                };
                (capsid_compiled(), tag.load(env), reply)
            });
        })
        .map_err(|e| Error::Internal(format!("could not start the compile thread: {e}")))?;
    Ok(Compiled::Started)
}

/// `{:ok, {ref, sha256_hex, exports, imports, cache, warning}}`.
fn encode_compiled<'a>(
    env: Env<'a>,
    res: ComponentResource,
    outcome: cache::Outcome,
    warning: Option<&str>,
) -> Term<'a> {
    let exports = crate::types::encode_funcs(env, res.exports.iter().map(|e| &e.info), &res.names);
    let imports = crate::types::encode_funcs(env, res.imports.iter(), &res.names);
    let hash = res.hash.clone();
    let outcome = match outcome {
        cache::Outcome::Hit => hit(),
        cache::Outcome::Miss => miss(),
        cache::Outcome::Rejected => rejected(),
        cache::Outcome::Disabled => disabled(),
    };
    let resource = ResourceArc::new(res);
    (
        rustler::types::atom::ok(),
        (resource, hash, exports, imports, outcome, warning),
    )
        .encode(env)
}

rustler::atoms! {
    hit,
    miss,
    rejected,
    disabled,
    saturated,
    started = "compiling",
    capsid_compiled,
}

/// Compiles a component, through the cache in `cache` (`{dir, max_bytes}`)
/// unless nil. Returns `{:ok, {ref, sha256_hex, exports, imports, cache,
/// warning}}`, each function as `{name, interface | nil, short_name, params,
/// result}`, `cache` one of `:hit`, `:miss`, `:rejected` (a corrupt artifact
/// was replaced), `:disabled`, and `warning` nil or why the cache directory
/// could not be used; `:saturated` when all compile slots are taken; or
/// `:compiling` when it compiles, and the caller gets that answer later as
/// `{:capsid_compiled, tag, answer}`.
#[cfg_attr(not(test), rustler::nif(schedule = "DirtyCpu"))]
fn component_compile<'a>(
    env: Env<'a>,
    bytes: rustler::Binary<'a>,
    cache: Option<(String, u64)>,
    flavor: (bool, bool),
    limits: (usize, usize),
    budget: (usize, usize, usize, usize),
    tag: Term<'a>,
) -> Term<'a> {
    let flavor = Flavor {
        guard_pages: flavor.0,
        fuel: flavor.1,
    };
    let (cache, warning) = match cache {
        None => (None, None),
        Some((dir, max_bytes)) => match Cache::open(std::path::Path::new(&dir), max_bytes) {
            Ok(c) => (Some(c), None),
            Err(why) => (None, Some(why)),
        },
    };
    let limits = CompileLimits {
        max_bytes: limits.0,
        max_concurrent: limits.1,
    };
    let budget = Budget {
        atoms_per_component: budget.0,
        atoms_total: budget.1,
        vm_headroom: budget.2,
        type_nodes: budget.3,
    };
    let reply_to = (env.pid(), tag, warning.clone());
    match compile(
        env,
        bytes.as_slice(),
        cache,
        flavor,
        limits,
        budget,
        reply_to,
    ) {
        Ok(Compiled::Ready(res, outcome)) => {
            encode_compiled(env, *res, outcome, warning.as_deref())
        }
        Ok(Compiled::Started) => started().encode(env),
        Err(Refusal::Error(e)) => e.encode(env),
        Err(Refusal::Saturated) => saturated().encode(env),
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
    fn versions_are_stripped_from_interface_names() {
        assert_eq!(strip_version("acme:calc/math@1.0.0"), "acme:calc/math");
        assert_eq!(strip_version("acme:calc/math"), "acme:calc/math");
    }

    #[test]
    fn similarity_prefers_close_names() {
        assert!(similarity("evaluate-batch", "evaluate-batches") > 0.9);
        assert!(similarity("slugfy", "slugify") > 0.9);
        assert!(similarity("add", "word-frequencies") < 0.7);
    }

    #[test]
    fn compile_slots_are_bounded_and_released() {
        let a = Slot::take(1).expect("a free slot");
        assert!(Slot::take(1).is_none());
        drop(a);
        assert!(Slot::take(1).is_some());
    }
}
