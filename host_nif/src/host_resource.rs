//! Host resources: resources a component imports, implemented in Elixir.
//!
//! Each imported (non-WASI) resource type is defined in the link as
//! `ResourceType::host_dynamic(id)`, `id` being its index among the
//! component's resource names. A host resource's state is an Elixir term,
//! kept in the store's `Table` under a rep that only wasmtime's per-store
//! handle tables hand to the guest: the guest holds handles to reps, never
//! reps, so it cannot forge or reuse one.
//!
//! A term enters the table when it goes into the guest (`enter`: an import's
//! answer, such as a constructor's, or an export's argument) and leaves it
//! when it comes back out as `own` (`leave`: an import's argument or an
//! export's result; Elixir has it again) or when the guest drops its handle
//! (the resource's destructor, `drop_rep`, which runs the optional
//! `[resource-drop]R` import with it). A `borrow` leaves it in place.

use crate::budget::{HOST_BYTES, Refused};
use crate::error::{HostTrap, TrapKind};
use crate::host::{Host, ImportCall};
use crate::value::{HostTerm, Stored, Value};
use std::sync::Arc;
use wasmtime::StoreContextMut;
use wasmtime::component::ResourceDynamic;

/// The host resources of one store: the state of each rep.
pub struct Table {
    entries: Vec<Option<Arc<Stored>>>,
    free: Vec<u32>,
    live: usize,
    /// Reps lent to the running export as `borrow` arguments: removed when
    /// the call ends.
    lent: Vec<u32>,
    max: usize,
    /// Bytes of the terms in the table (`Stored::bytes`), and their ceiling.
    bytes: u64,
    max_bytes: u64,
    refused: Arc<Refused>,
}

impl Table {
    pub fn new(max: u64, max_bytes: u64, refused: Arc<Refused>) -> Self {
        Table {
            entries: Vec::new(),
            free: Vec::new(),
            live: 0,
            lent: Vec::new(),
            max: usize::try_from(max).unwrap_or(usize::MAX),
            bytes: 0,
            max_bytes,
            refused,
        }
    }

    fn insert(&mut self, stored: Arc<Stored>) -> wasmtime::Result<u32> {
        if self.live >= self.max {
            return Err(wasmtime::Error::new(HostTrap {
                kind: TrapKind::MemoryLimit,
                message: format!(
                    "the guest holds {} host resources, as many as the instance allows \
                     (max_handles); it must drop some before it gets more",
                    self.live
                ),
            }));
        }
        // What a guest makes the host keep is bounded like its own memory:
        // a term of a few bytes per handle from the guest's point of view
        // may be megabytes of the host's.
        let total = self.bytes.saturating_add(stored.bytes);
        if total > self.max_bytes {
            return Err(wasmtime::Error::new(HostTrap {
                kind: TrapKind::MemoryLimit,
                message: format!(
                    "host resource state limit exceeded: the host would keep {total} bytes of \
                     terms for the guest's {} host resources, the limit is {} bytes \
                     (max_host_bytes)",
                    self.live + 1,
                    self.max_bytes
                ),
            }));
        }
        HOST_BYTES
            .take_for(stored.bytes, &self.refused, "bytes of host resource state")
            .map_err(|m| wasmtime::Error::new(crate::arena::Exhausted(m)))?;
        self.bytes = total;
        self.live += 1;
        match self.free.pop() {
            Some(rep) => {
                self.entries[rep as usize] = Some(stored);
                Ok(rep)
            }
            None => {
                self.entries.push(Some(stored));
                Ok(u32::try_from(self.entries.len() - 1)?)
            }
        }
    }

    fn get(&self, rep: u32) -> Option<Arc<Stored>> {
        self.entries.get(rep as usize).and_then(Clone::clone)
    }

    fn remove(&mut self, rep: u32) -> Option<Arc<Stored>> {
        let taken = self.entries.get_mut(rep as usize).and_then(Option::take);
        if let Some(stored) = &taken {
            self.live -= 1;
            self.free.push(rep);
            self.bytes = self.bytes.saturating_sub(stored.bytes);
            HOST_BYTES.give(stored.bytes);
        }
        taken
    }

    /// Ends the borrows lent to a call that has returned.
    pub fn end_loans(&mut self) {
        for rep in std::mem::take(&mut self.lent) {
            self.remove(rep);
        }
    }
}

/// The store's terms go with it: their bytes go back to the node.
impl Drop for Table {
    fn drop(&mut self) {
        HOST_BYTES.give(self.bytes);
    }
}

/// Gives every host term in `values` a rep in `table`, for the guest.
pub fn enter(values: &mut [Value], table: &mut Table) -> wasmtime::Result<()> {
    for v in values {
        enter_one(v, table)?;
    }
    Ok(())
}

fn enter_one(v: &mut Value, table: &mut Table) -> wasmtime::Result<()> {
    match v {
        Value::HostTerm(h) => {
            let rep = table.insert(h.stored.clone())?;
            if !h.own {
                table.lent.push(rep);
            }
            *v = Value::HostRep(rep, h.resource);
        }
        Value::List(items) | Value::Fields(items) => enter(items, table)?,
        Value::Case(_, Some(payload)) => enter_one(payload, table)?,
        _ => {}
    }
    Ok(())
}

/// Turns every host resource handle the guest gave in `values` back into
/// its term: an `own` one leaves the table (Elixir has it now), a `borrow`
/// one stays.
pub fn leave(values: &mut [Value], store: &mut StoreContextMut<'_, Host>) -> wasmtime::Result<()> {
    for v in values {
        leave_one(v, store)?;
    }
    Ok(())
}

fn leave_one(v: &mut Value, store: &mut StoreContextMut<'_, Host>) -> wasmtime::Result<()> {
    match v {
        Value::Resource(r) => {
            // Fails, touching nothing, for anything but a host resource.
            if let Ok(d) = ResourceDynamic::try_from_resource_any(*r, &mut *store) {
                let table = &mut store.data_mut().host_resources;
                let stored = if d.owned() {
                    table.remove(d.rep())
                } else {
                    table.get(d.rep())
                };
                let stored = stored.ok_or_else(|| {
                    wasmtime::Error::msg("internal: a host resource with no state")
                })?;
                *v = Value::HostTerm(HostTerm {
                    stored,
                    resource: d.ty(),
                    own: d.owned(),
                });
            }
        }
        Value::List(items) | Value::Fields(items) => leave(items, store)?,
        Value::Case(_, Some(payload)) => leave_one(payload, store)?,
        _ => {}
    }
    Ok(())
}

/// The destructor of host resource type `resource`: the guest dropped its
/// handle of `rep`. Runs the `[resource-drop]` import (bound slot
/// `drop_import`) with the state, if Elixir gave one.
pub async fn drop_rep(
    mut store: StoreContextMut<'_, Host>,
    rep: u32,
    resource: u32,
    drop_import: Option<usize>,
) -> wasmtime::Result<()> {
    let Some(stored) = store.data_mut().host_resources.remove(rep) else {
        return Ok(());
    };
    let Some(import) = drop_import else {
        return Ok(());
    };
    let shared = store.data().shared.clone();
    let args = vec![Value::HostTerm(HostTerm {
        stored,
        resource,
        own: true,
    })];
    match shared.imports.ask(ImportCall { import, args }).await {
        Ok(_) => Ok(()),
        Err(message) => Err(wasmtime::Error::new(HostTrap {
            kind: TrapKind::ImportFailed,
            message,
        })),
    }
}
