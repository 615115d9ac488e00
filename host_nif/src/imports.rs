//! Linking: WASI p2 (deny-by-default) plus component imports implemented by
//! Elixir functions. An Elixir import is a host function whose future parks
//! the guest (its fiber stays suspended) until the calling Erlang process has
//! run the Elixir function and handed the answer back through `call_resume`.
//! No thread blocks and nothing waits on a scheduler.
//!
//! A link (linker + pre-instantiation) depends only on the component and on
//! which imports Elixir provides, so it is made once per such pair and shared
//! by every instance: starting an instance does no linking.

use crate::abi::{Lifted, Lowered, MAX_FLAT_PARAMS, MAX_FLAT_RESULTS, shape_flat_count};
use crate::component::{Bound, ComponentResource, FuncInfo, Link, strip_version};
use crate::error::lock;
use crate::error::{Error, HostTrap, Result, TrapKind, root_message};
use crate::host::{Host, ImportCall};
use crate::shape::Shape;
use crate::value::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use wasmtime::component::{Linker, LinkerInstance, ResourceType};

/// The user's key for `import`: exact name, or the version-less qualified name.
fn provided_key(import: &FuncInfo, provided: &HashSet<&str>) -> Option<String> {
    let candidates = [
        Some(import.name.clone()),
        import
            .interface
            .as_ref()
            .map(|i| format!("{}#{}", strip_version(i), import.short)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|c| provided.contains(c.as_str()))
}

/// At most `n` items of a list for an error message, and how many more.
fn some_of(items: &[String], n: usize) -> String {
    let mut out = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        out.push_str(&format!(" and {} more", items.len() - n));
    }
    out
}

fn is_wasi(import: &FuncInfo) -> bool {
    import
        .interface
        .as_deref()
        .is_some_and(|i| i.starts_with("wasi:"))
}

/// The link of `component` with the Elixir imports named in `provided`
/// (sorted, deduplicated by the caller), made on first use. Missing imports
/// are a `:link` error that names every one of them.
pub fn link(component: &ComponentResource, provided: &[String]) -> Result<Arc<Link>> {
    if let Some(link) = lock(&component.links).get(provided) {
        return Ok(link.clone());
    }
    let link = Arc::new(make_link(component, provided)?);
    lock(&component.links).insert(provided.to_vec(), link.clone());
    Ok(link)
}

fn make_link(component: &ComponentResource, provided: &[String]) -> Result<Link> {
    // The component's own engine (the `Flavor` it was compiled for).
    let mut linker: Linker<Host> = Linker::new(component.component.engine());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| Error::Internal(format!("linking WASI: {}", root_message(&e))))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| Error::Internal(format!("linking wasi:http: {}", root_message(&e))))?;
    crate::descriptors::add_to_linker(&mut linker)
        .map_err(|e| Error::Internal(format!("linking descriptors: {}", root_message(&e))))?;
    crate::symlinks::add_to_linker(&mut linker)
        .map_err(|e| Error::Internal(format!("linking symlink guards: {}", root_message(&e))))?;

    let provided: HashSet<&str> = provided.iter().map(String::as_str).collect();
    let mut bound = Vec::new();
    let mut missing = Vec::new();
    let mut by_interface: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, import) in component.imports.iter().enumerate() {
        if is_wasi(import) {
            continue;
        }
        match provided_key(import, &provided) {
            Some(key) => {
                by_interface
                    .entry(import.interface.as_deref())
                    .or_default()
                    .push(bound.len());
                bound.push(Bound { key, import: i });
            }
            None if import.is_optional() => {}
            None => missing.push(import.name.clone()),
        }
    }
    for r in &component.host_resources {
        by_interface.entry(r.interface.as_deref()).or_default();
    }
    if !missing.is_empty() {
        let hints: Vec<String> = missing
            .iter()
            .map(|m| format!("{m:?} => fn ... end"))
            .collect();
        return Err(Error::Link(format!(
            "the component imports {} that the host does not provide; pass {} in `imports:`",
            some_of(&missing, 10),
            some_of(&hints, 3)
        )));
    }

    for (interface, slots) in by_interface {
        let mut inst = match interface {
            None => linker.root(),
            Some(name) => linker
                .instance(name)
                .map_err(|e| Error::Link(format!("import {name}: {}", root_message(&e))))?,
        };
        for r in component
            .host_resources
            .iter()
            .filter(|r| r.interface.as_deref() == interface)
        {
            let drop_slot = slots.iter().copied().find(|s| {
                let info = &component.imports[bound[*s].import];
                info.is_optional()
                    && matches!(info.params.first(), Some((_, Shape::Own(id))) if *id == r.id)
            });
            define_resource(&mut inst, &r.name, r.id, drop_slot)
                .map_err(|e| Error::Link(format!("resource {}: {}", r.name, root_message(&e))))?;
        }
        for slot in slots {
            let info = &component.imports[bound[slot].import];
            if info.is_optional() {
                continue;
            }
            define(&mut inst, info, slot)
                .map_err(|e| Error::Link(format!("import {}: {}", info.name, root_message(&e))))?;
        }
    }

    let heavy_imports = bound
        .iter()
        .any(|b| component.imports[b.import].heavy_params());
    let pre = linker
        .instantiate_pre(&component.component)
        .map_err(|e| Error::Link(format!("cannot link the component: {}", root_message(&e))))?;
    Ok(Link {
        pre,
        bound,
        heavy_imports,
    })
}

/// Defines host resource type `id` (named `name` in its interface); its
/// destructor runs the `[resource-drop]` import in slot `drop_slot`, if any.
fn define_resource(
    inst: &mut LinkerInstance<'_, Host>,
    name: &str,
    id: u32,
    drop_slot: Option<usize>,
) -> wasmtime::Result<()> {
    inst.resource_async(name, ResourceType::host_dynamic(id), move |store, rep| {
        Box::new(crate::host_resource::drop_rep(store, rep, id, drop_slot))
    })
}

/// Defines the host function for Elixir import number `slot`, typed by its
/// parameters' and results' flat counts (see `abi`).
fn define(
    inst: &mut LinkerInstance<'_, Host>,
    info: &FuncInfo,
    slot: usize,
) -> wasmtime::Result<()> {
    let n: usize = info.params.iter().map(|(_, s)| shape_flat_count(s)).sum();
    let n = if n > MAX_FLAT_PARAMS { 1 } else { n };
    let m = match &info.result {
        Some(s) if shape_flat_count(s) <= MAX_FLAT_RESULTS => shape_flat_count(s),
        _ => 0,
    };
    let host = info.host;
    macro_rules! arms {
        ($($n:literal)*) => {
            match (n, m) {
                $(
                    ($n, 0) => inst.func_wrap_async(&info.short, move |store, params: Lifted<$n>| {
                        Box::new(call_elixir::<0>(store, slot, params.0, host))
                    }),
                    ($n, 1) => inst.func_wrap_async(&info.short, move |store, params: Lifted<$n>| {
                        Box::new(call_elixir::<1>(store, slot, params.0, host))
                    }),
                )*
                _ => Err(wasmtime::Error::msg("unsupported import signature")),
            }
        };
    }
    arms!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// The body of every Elixir-implemented import: post the request, park until
/// the answer arrives, then hand the result to the guest. With `host`, its
/// values can hold host resources: terms on the way out, reps on the way in.
async fn call_elixir<const M: usize>(
    mut store: wasmtime::StoreContextMut<'_, Host>,
    slot: usize,
    mut args: Vec<Value>,
    host: bool,
) -> wasmtime::Result<Lowered<M>> {
    if host {
        crate::host_resource::leave(&mut args, &mut store)?;
    }
    let shared = store.data().shared.clone();
    match shared.imports.ask(ImportCall { import: slot, args }).await {
        Ok(value) => {
            let mut values: Vec<Value> = value.into_iter().collect();
            if host {
                crate::host_resource::enter(&mut values, &mut store.data_mut().host_resources)?;
            }
            Ok(Lowered(values))
        }
        Err(message) => Err(wasmtime::Error::new(HostTrap {
            kind: TrapKind::ImportFailed,
            message,
        })),
    }
}
