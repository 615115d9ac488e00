//! Linear memories with guard regions, for components loaded with
//! `guard_pages: true` (the guarded engine, see `engine.rs`).
//!
//! Each memory is its own mapping: the whole reservation a wasm32 memory can
//! address (4 GiB) plus a guard region, inaccessible, of which the first
//! `byte_size` bytes are made read/write. The compiled code then needs no
//! bounds check: an access past the accessible bytes faults and wasmtime
//! turns the fault into a `memory_out_of_bounds` trap. Compute-heavy guests
//! run markedly faster (see BENCHMARKS.md); the price is two kernel mappings
//! and 4 GiB of address space per memory, accounted against the same
//! address-space budget as the arenas (`:address_space_limit`).
//!
//! Memories join their store's list like arena memories (see
//! `arena::take_claim`), so a state-preserving call (a hot swap's snapshot)
//! copies them out and back the same way.
#![allow(unsafe_code)]

use crate::arena::{self, Cell, Exhausted, MARKER, page_round};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

struct GuardedMemory {
    addr: usize,
    /// The whole mapping: reservation plus guard.
    mapped: usize,
    /// Bytes that may become accessible without moving.
    capacity: usize,
    /// Accessible bytes, as wasm sees them.
    size: usize,
    /// Bytes made read/write (`size` rounded up to OS pages).
    writable: usize,
    cell: Arc<Cell>,
}

impl GuardedMemory {
    /// Makes the first `bytes` of the memory read/write.
    fn open_up_to(&mut self, bytes: usize) -> Result<(), Exhausted> {
        let target = page_round(bytes);
        if target <= self.writable {
            return Ok(());
        }
        // SAFETY: the range lies inside our own mapping (target ≤ capacity
        // is checked by the callers), which nobody else uses.
        let rc = unsafe {
            libc::mprotect(
                (self.addr + self.writable) as *mut libc::c_void,
                target - self.writable,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Exhausted(format!(
                "the OS refused to make {target} bytes of a guarded linear memory accessible \
                 ({err}); see vm.max_map_count, or load the component without guard_pages"
            )));
        }
        self.writable = target;
        Ok(())
    }
}

// SAFETY: `as_ptr` points at a mapping of `byte_capacity()` bytes plus the
// guard the engine asked for, owned by this object alone until it is
// dropped; the first `byte_size()` bytes are read/write and everything past
// them faults; a fresh anonymous mapping reads as zero.
unsafe impl LinearMemory for GuardedMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        // The limiter's claim was for a growth, not a new memory.
        arena::unclaim();
        if new_size > self.capacity {
            return Err(wasmtime::Error::msg(format!(
                "a guarded linear memory cannot grow past {} bytes",
                self.capacity
            )));
        }
        // An `Exhausted` error is a `:resource_limit` (`error::refusal`).
        self.open_up_to(new_size)?;
        self.size = new_size;
        self.cell.publish(self.addr, self.size);
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
}

impl Drop for GuardedMemory {
    fn drop(&mut self) {
        arena::unmap(self.addr, self.mapped);
        arena::LIVE_MEMORIES.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Memories;

// SAFETY: see `GuardedMemory`: the reservation and guard the engine asks
// for are honoured exactly, so its compiled code may skip bounds checks.
unsafe impl MemoryCreator for Memories {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let memory = create(
            minimum,
            reserved_size_in_bytes,
            guard_size_in_bytes,
            arena::address_space_limit(),
        )?;
        Ok(Box::new(memory))
    }
}

fn create(
    minimum: usize,
    reserved: Option<usize>,
    guard: usize,
    limit: u64,
) -> Result<GuardedMemory, String> {
    let (size, list) = arena::take_claim(minimum);
    // Without a reservation (a 64-bit memory) the code bounds-checks; the
    // memory still gets the usual 4 GiB and cannot move.
    let capacity = page_round(reserved.unwrap_or(crate::engine::GUARDED_RESERVATION as usize));
    if size > capacity {
        return Err(format!(
            "a guarded linear memory cannot start at {size} bytes (at most {capacity})"
        ));
    }
    let mapped = capacity + page_round(guard);
    let addr =
        arena::map_with(mapped, limit, libc::PROT_NONE).map_err(|e| format!("{MARKER}{e}"))?;
    arena::LIVE_MEMORIES.fetch_add(1, Ordering::Relaxed);
    let mut memory = GuardedMemory {
        addr,
        mapped,
        capacity,
        size,
        writable: 0,
        cell: Arc::default(),
    };
    // On failure the drop unmaps it again.
    memory
        .open_up_to(size)
        .map_err(|e| format!("{MARKER}{e}"))?;
    memory.cell.publish(addr, size);
    arena::join(list, &memory.cell);
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(minimum: usize) -> Box<dyn LinearMemory> {
        let ty = MemoryType::new(0, None);
        Memories
            .new_memory(ty, minimum, None, Some(4 << 30), 32 << 20)
            .unwrap()
    }

    /// The protection of the page at `addr`, from the kernel's view
    /// (touching a protected page would kill the test process).
    fn protection_at(addr: usize) -> String {
        arena::mapping_at(addr).map_or("unmapped".to_string(), |(perms, _)| perms[..3].to_string())
    }

    #[test]
    fn only_the_accessible_bytes_are_read_write_and_growth_opens_more() {
        let mut m = memory(65536);
        let base = m.as_ptr() as usize;
        assert_eq!(m.byte_capacity(), 4 << 30);
        // SAFETY: the first 64 KiB are accessible.
        unsafe { std::ptr::write_bytes(m.as_ptr(), 7, 65536) };
        assert_eq!(protection_at(base), "rw-");
        assert_eq!(protection_at(base + 65536), "---");
        assert_eq!(protection_at(base + (4 << 30) + (32 << 20) - 1), "---");
        m.grow_to(3 * 65536).unwrap();
        assert_eq!(m.as_ptr() as usize, base, "guarded memories never move");
        assert_eq!(protection_at(base + 2 * 65536), "rw-");
        assert_eq!(protection_at(base + 3 * 65536), "---");
        // SAFETY: the grown bytes are accessible and start zeroed.
        let grown = unsafe { std::slice::from_raw_parts(m.as_ptr().add(65536), 2 * 65536) };
        assert!(grown.iter().all(|b| *b == 0));
        assert!(m.grow_to((4 << 30) + 65536).is_err());
        drop(m);
        assert_eq!(protection_at(base), "unmapped");
    }

    #[test]
    fn a_memory_is_refused_beyond_the_address_space_budget() {
        // A budget smaller than one reservation, whatever else is mapped.
        let refused = create(0, Some(4 << 30), 0, (4 << 30) - 1);
        let message = refused.err().expect("over the budget");
        assert!(message.starts_with(MARKER), "{message}");
        assert!(message.contains("address_space_limit"), "{message}");
    }
}
