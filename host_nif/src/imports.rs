//! Linking: WASI p2 (deny-by-default) plus component imports implemented by
//! Elixir functions. An Elixir import is a host function whose future parks
//! the guest (its fiber stays suspended) until the calling Erlang process has
//! run the Elixir function and handed the answer back through `call_resume`.
//! No thread blocks and nothing waits on a scheduler.

use crate::component::{ComponentResource, FuncInfo, strip_version};
use crate::engine::engine;
use crate::error::{Error, HostTrap, Result, TrapKind, root_message};
use crate::instance::Host;
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use wasmtime::component::types::ComponentFunc;
use wasmtime::component::{InstancePre, Linker, Val};

/// One pending call from the guest into Elixir.
pub struct ImportCall {
    /// Index into `Bridge::bound`.
    pub import: usize,
    pub args: Vec<Val>,
}

#[derive(Default)]
enum Exchange {
    #[default]
    Idle,
    /// The guest asked; the NIF has not yet handed the request to Elixir.
    Requested(ImportCall),
    /// Elixir is running the import.
    Running,
    /// Elixir answered: the result value, or why the import failed.
    Answered(std::result::Result<Option<Val>, String>),
}

/// Where a guest's import request meets Elixir's answer. One per store.
#[derive(Default)]
pub struct ImportChannel(Mutex<Exchange>);

impl ImportChannel {
    fn lock(&self) -> std::sync::MutexGuard<'_, Exchange> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request the guest is parked on, if it has not been handed out yet.
    pub fn take_request(&self) -> Option<ImportCall> {
        let mut ex = self.lock();
        match std::mem::take(&mut *ex) {
            Exchange::Requested(call) => {
                *ex = Exchange::Running;
                Some(call)
            }
            other => {
                *ex = other;
                None
            }
        }
    }

    pub fn answer(&self, answer: std::result::Result<Option<Val>, String>) {
        *self.lock() = Exchange::Answered(answer);
    }

    pub fn reset(&self) {
        *self.lock() = Exchange::Idle;
    }
}

/// An import implemented in Elixir: which component import it is and which
/// key of the user's `imports:` map implements it.
pub struct Bound {
    pub key: String,
    pub ty: ComponentFunc,
}

/// What an instance needs to run calls: the pre-instantiated component and
/// the Elixir-implemented imports it was linked with.
pub struct Bridge {
    pub pre: InstancePre<Host>,
    pub bound: Vec<Bound>,
}

/// The user's key for `import`: exact name, or the version-less qualified name.
fn provided_key(import: &FuncInfo, provided: &[String]) -> Option<String> {
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
        .find(|c| provided.contains(c))
}

fn is_wasi(interface: &str) -> bool {
    interface.starts_with("wasi:")
}

/// Builds the linker for `component` with the Elixir imports named in
/// `provided`, and pre-instantiates. Missing imports are a `:link` error that
/// names every one of them.
pub fn link(component: &ComponentResource, provided: &[String]) -> Result<Bridge> {
    let mut linker: Linker<Host> = Linker::new(engine());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| Error::Internal(format!("linking WASI: {}", root_message(&e))))?;

    let mut bound = Vec::new();
    let mut missing = Vec::new();
    let mut by_interface: BTreeMap<Option<&str>, Vec<(usize, &FuncInfo)>> = BTreeMap::new();
    for import in &component.imports {
        if import.interface.as_deref().is_some_and(is_wasi) {
            continue;
        }
        match provided_key(import, provided) {
            Some(key) => {
                by_interface
                    .entry(import.interface.as_deref())
                    .or_default()
                    .push((bound.len(), import));
                bound.push(Bound {
                    key,
                    ty: import.ty.clone(),
                });
            }
            None => missing.push(import.name.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::Link(format!(
            "the component imports {} that the host does not provide; pass {} in `imports:`",
            missing.join(", "),
            missing
                .iter()
                .map(|m| format!("{m:?} => fn ... end"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    for (interface, funcs) in by_interface {
        let mut inst = match interface {
            None => linker.root(),
            Some(name) => linker
                .instance(name)
                .map_err(|e| Error::Link(format!("import {name}: {}", root_message(&e))))?,
        };
        for (index, info) in funcs {
            inst.func_new_async(&info.short, move |store, _ty, params, results| {
                Box::new(call_elixir(store, index, params, results))
            })
            .map_err(|e| Error::Link(format!("import {}: {}", info.name, root_message(&e))))?;
        }
    }

    let pre = linker
        .instantiate_pre(&component.component)
        .map_err(|e| Error::Link(format!("cannot link the component: {}", root_message(&e))))?;
    Ok(Bridge { pre, bound })
}

/// The body of every Elixir-implemented import: post the request, park until
/// the answer arrives, then hand the result to the guest.
async fn call_elixir(
    store: wasmtime::StoreContextMut<'_, Host>,
    index: usize,
    params: &[Val],
    results: &mut [Val],
) -> wasmtime::Result<()> {
    let channel: Arc<ImportChannel> = store.data().imports.clone();
    *channel.lock() = Exchange::Requested(ImportCall {
        import: index,
        args: params.to_vec(),
    });
    // Woken by nobody: the NIF polls again when Elixir answers.
    let answer = poll_fn(|_| {
        let mut ex = channel.lock();
        match std::mem::take(&mut *ex) {
            Exchange::Answered(a) => Poll::Ready(a),
            other => {
                *ex = other;
                Poll::Pending
            }
        }
    })
    .await;
    match answer {
        Ok(value) => {
            if let (Some(slot), Some(v)) = (results.first_mut(), value) {
                *slot = v;
            }
            Ok(())
        }
        Err(message) => Err(wasmtime::Error::new(HostTrap {
            kind: TrapKind::ImportFailed,
            message,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_hands_each_request_out_once() {
        let ch = ImportChannel::default();
        assert!(ch.take_request().is_none());
        *ch.lock() = Exchange::Requested(ImportCall {
            import: 3,
            args: vec![Val::U32(7)],
        });
        let call = ch.take_request().unwrap();
        assert_eq!(call.import, 3);
        assert!(matches!(*ch.lock(), Exchange::Running));
        assert!(ch.take_request().is_none());
        ch.answer(Ok(None));
        assert!(matches!(*ch.lock(), Exchange::Answered(Ok(None))));
    }
}
