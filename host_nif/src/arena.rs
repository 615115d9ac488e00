//! Linear memories and fiber stacks carved out of a few large shared
//! mappings, so that an instance costs no memory mapping of its own.
//!
//! Why: wasmtime's default allocator gives every linear memory its own
//! mapping (4 GiB reserved plus guard pages) and every fiber stack two (the
//! stack and its guard page). At ~7 mappings per instance the kernel's
//! default `vm.max_map_count` (65,530) ran out at ~9,300 instances, and the
//! BEAM then aborted on its next allocation. Here every slot lives inside a
//! 1 GiB chunk mapped once, read/write, `MAP_NORESERVE`: tens of thousands of
//! instances share a few hundred mappings, and only touched pages use RAM.
//!
//! The price: no guard pages. Linear memories are bounds-checked by the
//! compiled code instead (the engine is configured with no reservation and
//! no guard), and fiber stacks are separated by an unused gap: wasm frames
//! are limited by `max_wasm_stack`, and host code on the fiber has 1 MiB of
//! headroom it never comes close to using (measured: a few KiB).
//!
//! Every chunk is accounted against a process-wide address-space budget
//! (`set_address_space_limit`); running out is `ResourceLimit`, never a
//! failed allocation inside the VM.
#![allow(unsafe_code)]

use crate::error::lock;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType, StackCreator, StackMemory};

/// Size of one mapping. Big slots (a memory grown past 1 GiB) get a mapping
/// of their own size.
const CHUNK: usize = 1 << 30;
/// The smallest memory slot: 64 KiB, one wasm page.
const MIN_SLOT_LOG2: u32 = 16;
/// wasm32 memories are at most 4 GiB.
const MAX_SLOT_LOG2: u32 = 32;
/// Size of each fiber stack: the guest's wasm stack (`engine::MAX_WASM_STACK`)
/// plus 1 MiB for host code (WASI, lifting and lowering) running on it.
pub const STACK_SIZE: usize = 2 * 1024 * 1024;
/// Unused bytes below each fiber stack: a host-code overrun lands here
/// instead of in the next stack.
const STACK_GAP: usize = 64 * 1024;

/// Address space all chunks may reserve together (default 16 TiB of the
/// 128 TiB a Linux process has): see `set_address_space_limit`.
static ADDRESS_SPACE_LIMIT: AtomicU64 = AtomicU64::new(16 << 40);
static RESERVED: AtomicU64 = AtomicU64::new(0);
static CHUNKS: AtomicUsize = AtomicUsize::new(0);
pub(crate) static LIVE_MEMORIES: AtomicUsize = AtomicUsize::new(0);
static LIVE_STACKS: AtomicUsize = AtomicUsize::new(0);

pub fn set_address_space_limit(bytes: u64) {
    ADDRESS_SPACE_LIMIT.store(bytes, Ordering::Relaxed);
}

/// `(reserved bytes, chunks, live memories, live stacks)`, for `info`.
pub fn usage() -> (u64, usize, usize, usize) {
    (
        RESERVED.load(Ordering::Relaxed),
        CHUNKS.load(Ordering::Relaxed),
        LIVE_MEMORIES.load(Ordering::Relaxed),
        LIVE_STACKS.load(Ordering::Relaxed),
    )
}

/// Prefix of the messages that cross wasmtime as plain strings (a memory
/// creator can only return a `String`), so `error::refusal` knows them.
pub const MARKER: &str = "[capsid:resource_limit] ";

/// Why a slot could not be had: the message names the limit.
#[derive(Debug)]
pub struct Exhausted(pub String);

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Exhausted {}

/// Maps `len` bytes read/write, reserving address space only.
fn map(len: usize) -> Result<usize, Exhausted> {
    map_within(len, address_space_limit())
}

fn map_within(len: usize, limit: u64) -> Result<usize, Exhausted> {
    map_with(len, limit, libc::PROT_READ | libc::PROT_WRITE)
}

/// Maps `len` bytes with protection `prot` (address space only, no RAM),
/// accounted against the address-space budget as one more mapping.
/// `unmap` undoes it.
pub(crate) fn map_with(len: usize, limit: u64, prot: libc::c_int) -> Result<usize, Exhausted> {
    let len64 = len as u64;
    let before = RESERVED.fetch_add(len64, Ordering::Relaxed);
    if before.saturating_add(len64) > limit {
        RESERVED.fetch_sub(len64, Ordering::Relaxed);
        return Err(Exhausted(format!(
            "address space exhausted: Capsid has reserved {before} bytes for linear memories \
             and stacks, the limit is {limit} bytes (config :capsid, :address_space_limit)"
        )));
    }
    // SAFETY: an anonymous private mapping at an address the kernel picks;
    // nothing else refers to it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        RESERVED.fetch_sub(len64, Ordering::Relaxed);
        let err = std::io::Error::last_os_error();
        return Err(Exhausted(format!(
            "the OS refused a {len}-byte mapping ({err}); mappings in use by Capsid: {} \
             (see vm.max_map_count and ulimit -v)",
            CHUNKS.load(Ordering::Relaxed)
        )));
    }
    // Small pages only, whatever the system's transparent-huge-page
    // setting: with `always`, an instance's first touch of its slot would
    // fault in 2 MiB (RSS per instance, and warm slots never warm). Fails
    // harmlessly on kernels without THP.
    // SAFETY: the mapping we just made.
    unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
    CHUNKS.fetch_add(1, Ordering::Relaxed);
    Ok(ptr as usize)
}

/// The address-space budget in force (`set_address_space_limit`).
pub(crate) fn address_space_limit() -> u64 {
    ADDRESS_SPACE_LIMIT.load(Ordering::Relaxed)
}

/// Unmaps a mapping made by `map_with` and gives back its budget.
pub(crate) fn unmap(addr: usize, len: usize) {
    // SAFETY: a whole mapping made by `map_with`, no longer used by anyone.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    RESERVED.fetch_sub(len as u64, Ordering::Relaxed);
    CHUNKS.fetch_sub(1, Ordering::Relaxed);
}

/// Gives the pages of `[addr, addr + len)` back to the OS; they read as
/// zero afterwards. The mapping itself stays (no VMA split).
fn discard(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the range lies inside a chunk we mapped and own exclusively
    // (the slot was just released by its only user).
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED);
    }
}

/// Slots of one size: free slots (warm ones first: see `WARM_MEMORY_BYTES`),
/// and the unused rest of the newest chunk.
struct Class {
    size: usize,
    /// Zeroed slots whose touched pages stay resident: `(addr, resident bytes)`.
    warm: Vec<(usize, usize)>,
    free: Vec<usize>,
    bump: Range<usize>,
}

impl Class {
    fn take(&mut self) -> Result<usize, Exhausted> {
        if let Some((addr, bytes)) = self.warm.pop() {
            WARM_BYTES.fetch_sub(bytes, Ordering::Relaxed);
            return Ok(addr);
        }
        if let Some(addr) = self.free.pop() {
            return Ok(addr);
        }
        if self.bump.len() < self.size {
            let len = self.size.max(CHUNK);
            let base = map(len)?;
            self.bump = base..base + len;
        }
        let addr = self.bump.start;
        self.bump.start += self.size;
        Ok(addr)
    }
}

struct Pool {
    classes: Vec<Mutex<Class>>,
}

impl Pool {
    fn new(sizes: impl Iterator<Item = usize>) -> Self {
        Pool {
            classes: sizes
                .map(|size| {
                    Mutex::new(Class {
                        size,
                        warm: Vec::new(),
                        free: Vec::new(),
                        bump: 0..0,
                    })
                })
                .collect(),
        }
    }

    fn class(&self, i: usize) -> std::sync::MutexGuard<'_, Class> {
        self.classes[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn memory_pool() -> &'static Pool {
    static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Pool::new((MIN_SLOT_LOG2..=MAX_SLOT_LOG2).map(|l| 1usize << l)))
}

fn stack_pool() -> &'static Pool {
    static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Pool::new(std::iter::once(STACK_SIZE + STACK_GAP)))
}

/// The class index of the smallest slot that holds `bytes`.
fn class_for(bytes: usize) -> Option<usize> {
    let log2 = bytes
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_SLOT_LOG2);
    (log2 <= MAX_SLOT_LOG2).then(|| (log2 - MIN_SLOT_LOG2) as usize)
}

/// Where a linear memory is right now, shared with its store's list so
/// that the instance can copy its memories out and back (see
/// `MemoryList`).
#[derive(Default)]
pub struct Cell {
    addr: AtomicUsize,
    size: AtomicUsize,
}

impl Cell {
    /// Records where the memory is and how many bytes are accessible.
    pub(crate) fn publish(&self, addr: usize, size: usize) {
        self.addr.store(addr, Ordering::Release);
        self.size.store(size, Ordering::Release);
    }
}

/// The linear memories of one store, in creation order.
pub type MemoryList = Arc<Mutex<Vec<Arc<Cell>>>>;

/// Who owns the memory wasmtime is about to create on this thread. The
/// store's limiter is asked first (`claim`), then the memory creator runs,
/// synchronously, on the same thread; a growth of an existing memory clears
/// the claim.
struct Claim {
    list: MemoryList,
    /// Bytes the memory must start with (a transplant), if more than asked.
    size: usize,
}

thread_local! {
    static CLAIM: RefCell<Option<Claim>> = const { RefCell::new(None) };
}

/// The next memory created on this thread belongs to `list`, with at least
/// `size` bytes.
pub fn claim(list: &MemoryList, size: usize) {
    CLAIM.with(|c| {
        *c.borrow_mut() = Some(Claim {
            list: list.clone(),
            size,
        })
    });
}

pub fn unclaim() {
    CLAIM.with(|c| c.borrow_mut().take());
}

/// For a memory creator: takes this thread's claim, if any, and returns
/// the size the new memory must start with (at least `minimum`) and the
/// list it joins (`join` once it has a cell).
pub(crate) fn take_claim(minimum: usize) -> (usize, Option<MemoryList>) {
    match CLAIM.with(|c| c.borrow_mut().take()) {
        Some(claim) => (claim.size.max(minimum), Some(claim.list)),
        None => (minimum, None),
    }
}

/// Adds a new memory's cell to its store's list (from `take_claim`).
pub(crate) fn join(list: Option<MemoryList>, cell: &Arc<Cell>) {
    if let Some(list) = list {
        lock(&list).push(cell.clone());
    }
}

/// Copies of the memories in `list` (the store must be idle).
pub fn copy_out(list: &MemoryList) -> Vec<Vec<u8>> {
    lock(list)
        .iter()
        .map(|cell| {
            let (addr, size) = (
                cell.addr.load(Ordering::Acquire),
                cell.size.load(Ordering::Acquire),
            );
            // SAFETY: the cell describes a live memory of at least `size`
            // bytes, and its store is idle (the caller holds its turn).
            unsafe { std::slice::from_raw_parts(addr as *const u8, size) }.to_vec()
        })
        .collect()
}

/// Writes `data[i]` over memory `i` of `list` (created at least that large
/// by a transplant claim). Returns false if the memories do not match.
pub fn copy_in(list: &MemoryList, data: &[Vec<u8>]) -> bool {
    let cells = lock(list);
    if cells.len() != data.len() {
        return false;
    }
    for (cell, bytes) in cells.iter().zip(data) {
        if cell.size.load(Ordering::Acquire) < bytes.len() {
            return false;
        }
        let addr = cell.addr.load(Ordering::Acquire);
        // SAFETY: the memory has at least `bytes.len()` bytes (checked) and
        // its store is idle (just instantiated, inside the caller's turn).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
    }
    true
}

/// A linear memory in an arena slot. It grows in place up to the slot's
/// size, then moves to a bigger slot (wasmtime reloads the base pointer).
struct ArenaMemory {
    addr: usize,
    class: usize,
    /// Accessible bytes.
    size: usize,
    /// Bytes that may have been written: discarded when the slot is freed.
    high_water: usize,
    cell: Arc<Cell>,
}

impl ArenaMemory {
    fn publish(&self) {
        self.cell.publish(self.addr, self.size);
    }
}

impl ArenaMemory {
    fn slot_size(&self) -> usize {
        1usize << (self.class as u32 + MIN_SLOT_LOG2)
    }
}

// SAFETY: `as_ptr` points at a slot of `byte_capacity()` bytes that this
// object alone owns until it is dropped; the first `byte_size()` bytes are
// read/write; bytes up to the capacity are zero (fresh or discarded pages).
unsafe impl LinearMemory for ArenaMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.slot_size()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        // The limiter's claim was for a growth, not a new memory.
        unclaim();
        if new_size <= self.slot_size() {
            self.size = new_size;
            self.high_water = self.high_water.max(new_size);
            self.publish();
            return Ok(());
        }
        let class = class_for(new_size)
            .ok_or_else(|| wasmtime::Error::msg("linear memory larger than 4 GiB"))?;
        let addr = memory_pool().class(class).take()?;
        // SAFETY: both ranges are slots we own, of at least `self.size`
        // bytes, and distinct slots never overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr as *const u8, addr as *mut u8, self.size);
        }
        release_memory(self.addr, self.class, self.high_water);
        self.addr = addr;
        self.class = class;
        self.size = new_size;
        self.high_water = new_size;
        self.publish();
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
}

/// Resident bytes all warm memory slots may keep together: a slot reused
/// soon (instances started and stopped in a loop) then takes no page fault
/// for the pages it touches again, and its release costs no TLB shootdown.
/// Past this budget a freed slot's pages go back to the OS, so a node that
/// once ran 100,000 instances does not keep their RAM.
const WARM_MEMORY_BYTES: usize = 16 << 20;
/// A slot that touched more than this is discarded, not kept warm: zeroing
/// it by hand would cost more than the page faults it saves.
const WARM_SLOT_BYTES: usize = 256 << 10;
/// Slots with more accessible bytes than this are never scanned.
const WARM_SCAN_BYTES: usize = 64 << 20;
static WARM_BYTES: AtomicUsize = AtomicUsize::new(0);

fn release_memory(addr: usize, class: usize, high_water: usize) {
    let len = page_round(high_water);
    match zero_for_reuse(addr, len) {
        Some(bytes) => memory_pool().class(class).warm.push((addr, bytes)),
        None => {
            discard(addr, len);
            memory_pool().class(class).free.push(addr);
        }
    }
}

/// Zeroes the slot `[addr, addr + len)` keeping its resident pages, if they
/// fit the warm budgets: resident pages are cleared by hand, the rest are
/// discarded (a page the kernel swapped out reads as non-resident but still
/// holds the old guest's bytes). Returns the resident bytes kept, or None
/// (nothing done) when the slot is better discarded whole.
fn zero_for_reuse(addr: usize, len: usize) -> Option<usize> {
    const PAGE: usize = 4096;
    let pages = len / PAGE;
    // A big slot's residency map alone would cost more than discarding it.
    if pages == 0
        || len > WARM_SCAN_BYTES
        || WARM_BYTES.load(Ordering::Relaxed) >= WARM_MEMORY_BYTES
    {
        return None;
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is page-aligned and lies inside a chunk we mapped;
    // `vec` has one byte per page.
    if unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
        return None;
    }
    let resident = vec.iter().filter(|b| *b & 1 == 1).count() * PAGE;
    if resident > WARM_SLOT_BYTES {
        return None;
    }
    if WARM_BYTES.fetch_add(resident, Ordering::Relaxed) + resident > WARM_MEMORY_BYTES {
        WARM_BYTES.fetch_sub(resident, Ordering::Relaxed);
        return None;
    }
    // Runs of pages with the same residency: zero or discard each run.
    let mut start = 0;
    while start < pages {
        let here = vec[start] & 1;
        let end = (start..pages)
            .find(|&i| vec[i] & 1 != here)
            .unwrap_or(pages);
        let (from, bytes) = (addr + start * PAGE, (end - start) * PAGE);
        if here == 1 {
            // SAFETY: a range of the slot, which we own exclusively.
            unsafe { std::ptr::write_bytes(from as *mut u8, 0, bytes) };
        } else {
            discard(from, bytes);
        }
        start = end;
    }
    Some(resident)
}

/// `n` rounded up to whole OS pages.
pub(crate) fn page_round(n: usize) -> usize {
    n.div_ceil(4096) * 4096
}

impl Drop for ArenaMemory {
    fn drop(&mut self) {
        release_memory(self.addr, self.class, self.high_water);
        LIVE_MEMORIES.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Memories;

// SAFETY: memories are handed out zero-filled and exclusively owned; the
// engine is configured with no reservation and no guard region, so compiled
// code bounds-checks every access against `byte_size`.
unsafe impl MemoryCreator for Memories {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if reserved_size_in_bytes.is_some_and(|r| r > 0) || guard_size_in_bytes > 0 {
            return Err(
                "Capsid's arena memories need an engine without reservations or guards".into(),
            );
        }
        let (size, list) = take_claim(minimum);
        let class = class_for(size).ok_or("linear memory larger than 4 GiB")?;
        let addr = memory_pool()
            .class(class)
            .take()
            .map_err(|e| format!("{MARKER}{e}"))?;
        LIVE_MEMORIES.fetch_add(1, Ordering::Relaxed);
        let memory = ArenaMemory {
            addr,
            class,
            size,
            high_water: size,
            cell: Arc::default(),
        };
        memory.publish();
        join(list, &memory.cell);
        Ok(Box::new(memory))
    }
}

/// A fiber stack in an arena slot: `[gap][stack]`, the stack growing down
/// from the slot's end.
struct ArenaStack {
    slot: usize,
}

impl ArenaStack {
    fn range(&self) -> Range<usize> {
        let base = self.slot + STACK_GAP;
        base..base + STACK_SIZE
    }
}

// SAFETY: the range is page-aligned, read/write, and exclusively ours until
// drop. There is no guard page (see the module comment): `guard_range` is
// empty, so a fault there is never mistaken for a stack overflow.
unsafe impl StackMemory for ArenaStack {
    fn top(&self) -> *mut u8 {
        self.range().end as *mut u8
    }

    fn range(&self) -> Range<usize> {
        ArenaStack::range(self)
    }

    fn guard_range(&self) -> Range<*mut u8> {
        let base = self.range().start as *mut u8;
        base..base
    }
}

/// Free stacks that keep their touched pages (a few KiB each): reused soon
/// (LIFO), without page faults. Beyond them, a freed stack's pages go back
/// to the OS, so a node that once ran 100,000 instances does not keep their
/// stacks' RAM.
const WARM_STACKS: usize = 256;

impl Drop for ArenaStack {
    fn drop(&mut self) {
        // A guest can never read a host stack, so warm pages need no zeroing.
        let warm = stack_pool().class(0).free.len() < WARM_STACKS;
        if !warm {
            let range = ArenaStack::range(self);
            discard(range.start, range.len());
        }
        stack_pool().class(0).free.push(self.slot);
        LIVE_STACKS.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Stacks;

// SAFETY: see `ArenaStack`.
unsafe impl StackCreator for Stacks {
    fn new_stack(&self, size: usize, _zeroed: bool) -> wasmtime::Result<Box<dyn StackMemory>> {
        if size != STACK_SIZE {
            return Err(wasmtime::Error::msg(format!(
                "unexpected fiber stack size {size}"
            )));
        }
        let slot = stack_pool().class(0).take()?;
        LIVE_STACKS.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(ArenaStack { slot }))
    }
}

/// For tests: the permissions (`rw-p`, `---p`, …) and the `VmFlags` of
/// the mapping that holds `addr`, read from `/proc/self/smaps`; None when
/// nothing is mapped there.
#[cfg(test)]
pub(crate) fn mapping_at(addr: usize) -> Option<(String, Vec<String>)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut found: Option<(String, Vec<String>)> = None;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(range), Some(perms)) = (parts.next(), parts.next())
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            // A mapping's header line; its fields follow until the next.
            if found.is_some() {
                break;
            }
            if (lo..hi).contains(&addr) {
                found = Some((perms.to_string(), Vec::new()));
            }
        } else if let Some((_, flags)) = found.as_mut()
            && let Some(f) = line.strip_prefix("VmFlags:")
        {
            *flags = f.split_whitespace().map(String::from).collect();
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two_from_64k() {
        assert_eq!(class_for(0), Some(0));
        assert_eq!(class_for(65_536), Some(0));
        assert_eq!(class_for(65_537), Some(1));
        assert_eq!(class_for(17 * 65_536), Some(5)); // 1.06 MiB -> 2 MiB
        assert_eq!(class_for(1 << 32), Some(16));
        assert_eq!(class_for((1 << 32) + 1), None);
    }

    #[test]
    fn memories_grow_in_place_then_move_keeping_their_bytes() {
        let creator = Memories;
        let ty = MemoryType::new(1, None);
        let mut m = creator
            .new_memory(ty.clone(), 65_536, None, None, 0)
            .unwrap();
        assert_eq!(m.byte_capacity(), 65_536);
        // SAFETY: within the memory's accessible size.
        unsafe { *m.as_ptr().add(100) = 42 };
        m.grow_to(100_000).unwrap();
        assert_eq!(m.byte_capacity(), 131_072);
        // SAFETY: as above.
        unsafe {
            assert_eq!(*m.as_ptr().add(100), 42);
            assert_eq!(*m.as_ptr().add(99_999), 0);
        }
    }

    #[test]
    fn freed_slots_come_back_zeroed() {
        let creator = Memories;
        let ty = MemoryType::new(1, None);
        let m = creator
            .new_memory(ty.clone(), 3 << 20, None, None, 0)
            .unwrap();
        let addr = m.as_ptr() as usize;
        // SAFETY: within the accessible size.
        unsafe { *m.as_ptr().add(4096) = 7 };
        drop(m);
        let m = creator
            .new_memory(ty.clone(), 3 << 20, None, None, 0)
            .unwrap();
        assert_eq!(m.as_ptr() as usize, addr, "the slot is reused");
        // SAFETY: as above.
        unsafe { assert_eq!(*m.as_ptr().add(4096), 0) };
    }

    #[test]
    fn warm_slots_come_back_zeroed_and_keep_only_touched_pages() {
        let creator = Memories;
        let ty = MemoryType::new(1, None);
        // 5 MiB (an 8 MiB slot): a class no other test uses.
        let size = 5 << 20;
        let m = creator.new_memory(ty.clone(), size, None, None, 0).unwrap();
        let addr = m.as_ptr() as usize;
        let touched = [0, 4096 * 3, 4096 * 3 + 17, (1 << 20) + 5, size - 1];
        for &at in &touched {
            // SAFETY: within the accessible size.
            unsafe { *m.as_ptr().add(at) = 0xAB };
        }
        let class = class_for(size).unwrap();
        drop(m);
        // Four touched pages (two writes share one) stay resident, zeroed.
        assert_eq!(
            memory_pool().class(class).warm.last(),
            Some(&(addr, 4 * 4096))
        );
        let m = creator.new_memory(ty.clone(), size, None, None, 0).unwrap();
        assert_eq!(m.as_ptr() as usize, addr, "the warm slot is reused");
        // SAFETY: the whole accessible size.
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), size) };
        assert!(bytes.iter().all(|b| *b == 0), "a warm slot reads as zero");
    }

    #[test]
    fn a_slot_that_touched_much_is_discarded_not_kept() {
        let creator = Memories;
        let ty = MemoryType::new(1, None);
        // 12 MiB: its own class; touches 1 MiB, past `WARM_SLOT_BYTES`.
        let size = 12 << 20;
        let m = creator.new_memory(ty.clone(), size, None, None, 0).unwrap();
        // SAFETY: within the accessible size.
        unsafe { std::ptr::write_bytes(m.as_ptr(), 0xCD, 1 << 20) };
        let class = class_for(size).unwrap();
        drop(m);
        assert!(memory_pool().class(class).warm.is_empty());
        let m = creator.new_memory(ty.clone(), size, None, None, 0).unwrap();
        // SAFETY: within the accessible size.
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), 1 << 20) };
        assert!(bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn warm_slots_stay_within_their_budget() {
        let creator = Memories;
        // 24 MiB (a 32 MiB slot): a class no other test uses. 100 slots
        // touching 256 KiB each would keep 25 MiB warm without the budget.
        let size = 24 << 20;
        let class = class_for(size).unwrap();
        let memories: Vec<_> = (0..100)
            .map(|_| {
                let m = creator
                    .new_memory(MemoryType::new(1, None), size, None, None, 0)
                    .unwrap();
                // SAFETY: within the accessible size.
                unsafe { std::ptr::write_bytes(m.as_ptr(), 0xEE, WARM_SLOT_BYTES) };
                m
            })
            .collect();
        drop(memories);
        assert!(WARM_BYTES.load(Ordering::Relaxed) <= WARM_MEMORY_BYTES);
        let pool = memory_pool().class(class);
        assert!(pool.warm.len() <= WARM_MEMORY_BYTES / WARM_SLOT_BYTES);
        assert_eq!(pool.warm.len() + pool.free.len(), 100);
        assert!(
            !pool.free.is_empty(),
            "past the budget, slots are discarded"
        );
    }

    #[test]
    fn chunks_never_use_transparent_huge_pages() {
        let creator = Memories;
        let m = creator
            .new_memory(MemoryType::new(1, None), 65_536, None, None, 0)
            .unwrap();
        let addr = m.as_ptr() as usize;
        // The VmFlags of the chunk's mapping carry `nh`.
        let (_, flags) = mapping_at(addr).expect("the chunk's mapping is in /proc/self/smaps");
        assert!(flags.iter().any(|f| f == "nh"), "{flags:?}");
    }

    #[test]
    fn the_address_space_limit_is_enforced_with_a_clear_message() {
        let err = map_within(CHUNK, 0).unwrap_err().to_string();
        assert!(err.contains("address_space_limit"), "{err}");
    }
}
