//! Sandbox limits: the instance's ceilings, the per-call values (which may
//! only narrow them), and the `ResourceLimiter` that enforces memory/table caps.

use crate::arena::MemoryList;
use crate::error::{HostTrap, TrapKind};
use rustler::NifMap;

/// Limits as they cross the boundary (`Capsid.Instance` validates and fills
/// defaults; the NIF trusts the shape, not the caller's intent).
#[derive(NifMap, Debug, Clone, Copy)]
pub struct Limits {
    /// Fuel (≈ wasm instructions) per call.
    pub fuel: u64,
    /// Wall-clock budget per call, in milliseconds.
    pub timeout: u64,
    /// Bytes of linear memory, summed over the instance's memories.
    pub max_memory: u64,
    /// Elements per table.
    pub max_table_elements: u64,
    /// Core instances, tables and memories a component may create.
    pub max_instances: u64,
    pub max_tables: u64,
    pub max_memories: u64,
    /// Resource handles (own and borrow, guest and host resources) alive in
    /// the store at once.
    pub max_handles: u64,
    /// OS descriptors (files, directories, connections) held for the guest.
    pub max_descriptors: u64,
    /// Bytes of Elixir terms the host keeps for the guest's host resources.
    pub max_host_bytes: u64,
}

impl Limits {
    /// The per-call limits: each given value narrows the ceiling, never raises it.
    pub fn narrow(&self, fuel: Option<u64>, timeout: Option<u64>, max_memory: Option<u64>) -> Self {
        let pick = |ceiling: u64, wanted: Option<u64>| wanted.map_or(ceiling, |w| w.min(ceiling));
        Limits {
            fuel: pick(self.fuel, fuel),
            timeout: pick(self.timeout, timeout),
            max_memory: pick(self.max_memory, max_memory),
            ..*self
        }
    }
}

/// Host bytes per table element (a function reference), counted against
/// `max_memory` so that tables cannot hold memory outside the limit.
pub const TABLE_ELEMENT_BYTES: u64 = 8;

/// Tracks memory and table growth of one store against its limits, and
/// keeps the list of its linear memories.
pub struct Limiter {
    pub limits: Limits,
    /// The memory cap in force for the current call (≤ `limits.max_memory`).
    pub call_max_memory: u64,
    /// Bytes of linear memory and tables currently allocated.
    pub memory_in_use: u64,
    pub memories: MemoryList,
    /// Sizes the store's memories must start with: a transplant of an
    /// earlier store's memories (see `instance.rs`).
    pub transplant: Option<Vec<usize>>,
    /// The instance's record of node budgets refused (`Shared::refused`).
    pub refused: std::sync::Arc<crate::budget::Refused>,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Limiter {
            limits,
            call_max_memory: limits.max_memory,
            memory_in_use: 0,
            memories: MemoryList::default(),
            transplant: None,
            refused: Default::default(),
        }
    }
}

impl Limiter {
    /// Growth counts against the node's memory budget too: many instances
    /// each within `max_memory` can still add up to more than the machine
    /// has. A refusal fails the call with `:resource_limit` (as an
    /// exhausted address space does), not the guest's `memory_limit`.
    fn take_from_node(&self, growth: u64) -> wasmtime::Result<()> {
        crate::budget::MEMORY
            .take_for(growth, &self.refused, "bytes of linear memory and tables")
            .map_err(|m| wasmtime::Error::new(crate::arena::Exhausted(m)))
    }
}

/// A store's memories and tables go when it does: their bytes go back to
/// the node's budget.
impl Drop for Limiter {
    fn drop(&mut self) {
        crate::budget::MEMORY.give(self.memory_in_use);
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A new memory (current 0) belongs to this store; a transplant makes
        // it start as large as the memory it replaces.
        let start = match (current, &self.transplant) {
            (0, Some(sizes)) => {
                let index = crate::error::lock(&self.memories).len();
                sizes.get(index).copied().unwrap_or(0).max(desired)
            }
            _ => desired,
        };
        let growth = to_u64(start.saturating_sub(current));
        let total = self.memory_in_use.saturating_add(growth);
        if total > self.call_max_memory {
            // A trap, not a failed `memory.grow`: guests rarely handle -1
            // well, and the caller deserves to know which limit was hit.
            return Err(wasmtime::Error::new(HostTrap {
                kind: TrapKind::MemoryLimit,
                message: format!(
                    "memory limit exceeded: the guest asked for {total} bytes of linear memory, \
                     the limit is {} bytes (max_memory)",
                    self.call_max_memory
                ),
            }));
        }
        self.take_from_node(growth)?;
        self.memory_in_use = total;
        if current == 0 {
            crate::arena::claim(&self.memories, start);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = to_u64(desired.saturating_sub(current)).saturating_mul(TABLE_ELEMENT_BYTES);
        let total = self.memory_in_use.saturating_add(growth);
        if total > self.call_max_memory {
            return Err(wasmtime::Error::new(HostTrap {
                kind: TrapKind::MemoryLimit,
                message: format!(
                    "memory limit exceeded: a table of {desired} elements would bring the \
                     instance to {total} bytes of memory and tables, the limit is {} bytes \
                     (max_memory; each table element counts {TABLE_ELEMENT_BYTES} bytes)",
                    self.call_max_memory
                ),
            }));
        }
        if to_u64(desired) > self.limits.max_table_elements {
            return Err(wasmtime::Error::new(HostTrap {
                kind: TrapKind::MemoryLimit,
                message: format!(
                    "table limit exceeded: the guest asked for {desired} table elements, \
                     the limit is {} (max_table_elements)",
                    self.limits.max_table_elements
                ),
            }));
        }
        self.take_from_node(growth)?;
        self.memory_in_use = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // The address-space budget or the OS refused the growth: the call
        // fails with `:resource_limit` naming it, rather than the guest
        // seeing -1 (a Rust guest would abort as if out of memory).
        // Growth past what a memory can hold stays a plain -1.
        if crate::error::refusal(&error).is_some() {
            return Err(error);
        }
        Ok(())
    }

    fn instances(&self) -> usize {
        usize::try_from(self.limits.max_instances).unwrap_or(usize::MAX)
    }

    fn tables(&self) -> usize {
        usize::try_from(self.limits.max_tables).unwrap_or(usize::MAX)
    }

    fn memories(&self) -> usize {
        usize::try_from(self.limits.max_memories).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    fn limits() -> Limits {
        Limits {
            fuel: 1_000,
            timeout: 100,
            max_memory: 1 << 20,
            max_table_elements: 10,
            max_instances: 5,
            max_tables: 5,
            max_memories: 5,
            max_handles: 100,
            max_descriptors: 10,
            max_host_bytes: 1 << 20,
        }
    }

    #[test]
    fn per_call_values_only_narrow() {
        let n = limits().narrow(Some(10), Some(1_000_000), None);
        assert_eq!(n.fuel, 10);
        assert_eq!(
            n.timeout, 100,
            "a per-call timeout cannot raise the ceiling"
        );
        assert_eq!(n.max_memory, 1 << 20);
    }

    #[test]
    fn memory_growth_is_summed_and_capped() {
        let mut l = Limiter::new(limits());
        assert!(l.memory_growing(0, 512 * 1024, None).unwrap());
        assert!(l.memory_growing(0, 512 * 1024, None).unwrap());
        let err = l
            .memory_growing(512 * 1024, 512 * 1024 + 1, None)
            .unwrap_err();
        let trap = err.downcast_ref::<HostTrap>().unwrap();
        assert_eq!(trap.kind, TrapKind::MemoryLimit);
        assert!(trap.message.contains("max_memory"), "{}", trap.message);
    }

    #[test]
    fn table_growth_is_capped() {
        let mut l = Limiter::new(limits());
        assert!(l.table_growing(0, 10, None).unwrap());
        assert!(l.table_growing(0, 11, None).is_err());
    }

    #[test]
    fn tables_count_against_max_memory() {
        let mut l = Limiter::new(Limits {
            max_table_elements: u64::MAX,
            ..limits()
        });
        let elements = (1usize << 20) / TABLE_ELEMENT_BYTES as usize;
        assert!(l.table_growing(0, elements, None).unwrap());
        let err = l.memory_growing(0, 1, None).unwrap_err();
        assert!(err.to_string().contains("max_memory"), "{err}");
    }
}
