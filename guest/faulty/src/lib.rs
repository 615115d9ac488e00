//! The deliberately faulty component (world `capsid:faulty/faulty`) used by
//! the sandbox tests. Every export misbehaves in exactly one way, as its WIT
//! doc comment says; `ok` is the good call that proves the instance (or its
//! replacement) still works.
//!
//! Several exports must defeat the optimiser (an endless loop, deep
//! recursion, a busy loop): `core::hint::black_box` is what keeps them real.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

// The generated canonical-ABI glue (lifting/lowering, `export_name`
// attributes, the import shim) is necessarily `unsafe`.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/faulty",
        world: "faulty",
    });
}

use bindings::{Guest, hook};

struct Faulty;

const MIB: usize = 1024 * 1024;
/// Size of the array each `recurse-big` frame keeps on the shadow stack.
const BIG_FRAME: usize = 64 * 1024;

/// `bump`'s counter: lives in linear memory, so it resets with the instance.
static BUMPS: AtomicU32 = AtomicU32::new(0);
/// `flaky`'s call counter.
static FLAKY_CALLS: AtomicU32 = AtomicU32::new(0);

impl Guest for Faulty {
    fn ok(x: u32) -> u32 {
        x.wrapping_add(1)
    }

    fn bump() -> u32 {
        BUMPS.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    fn spin() {
        spin_forever()
    }

    fn recurse(depth: u64) -> u64 {
        recurse(depth)
    }

    fn recurse_big(depth: u64) -> u64 {
        recurse_big(depth)
    }

    fn alloc_bomb() -> u64 {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        let mut total: u64 = 0;
        // Only ends if the address space were unbounded; in practice the
        // allocator fails first and `handle_alloc_error` aborts (a trap).
        while let Some(next) = total.checked_add(MIB as u64) {
            // A non-zero fill writes every byte, so the pages are really used.
            let chunk = vec![0xA5_u8; MIB];
            hoard.push(chunk);
            black_box(&hoard);
            total = next;
        }
        total
    }

    fn panic_with(msg: String) {
        panic!("{msg}");
    }

    fn hit_unreachable() {
        #[cfg(target_arch = "wasm32")]
        core::arch::wasm32::unreachable();
        // Natively (only for `cargo clippy --workspace`) the nearest thing.
        #[cfg(not(target_arch = "wasm32"))]
        std::process::abort();
    }

    fn read_oob() -> u32 {
        // Near the top of the 4 GiB wasm32 address space: far beyond any
        // memory this instance may grow to, so the load traps.
        let far = core::ptr::without_provenance::<u32>(0xFFFF_FFF0);
        // SAFETY: none; this read is the deliberate fault. In wasm it is an
        // out-of-bounds load, which traps instead of being undefined.
        #[allow(unsafe_code)]
        unsafe {
            core::ptr::read_volatile(far)
        }
    }

    fn raw_div(a: i32, b: i32) -> i32 {
        raw_div(a, b)
    }

    fn big_string(mib: u32) -> String {
        let len = usize::try_from(mib)
            .ok()
            .and_then(|mib| mib.checked_mul(MIB))
            .unwrap_or_else(|| panic!("big-string: {mib} MiB does not fit in memory"));
        "x".repeat(len)
    }

    fn call_hook(x: u32) -> u32 {
        hook(x)
    }

    fn flaky(n: u32) -> u32 {
        let calls = FLAKY_CALLS.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if calls >= n {
            spin_forever();
        }
        calls
    }

    fn burn(iterations: u64) -> u64 {
        // xorshift64 mixed with the step number: no closed form, so the
        // work is linear in `iterations`.
        let mut state: u64 = black_box(0x9E37_79B9_7F4A_7C15);
        for step in 0..black_box(iterations) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state = black_box(state.wrapping_add(step));
        }
        state
    }

    fn chatty(msg: String) {
        println!("{msg}");
        eprintln!("{msg}");
    }

    fn chatty_hook(msg: String, x: u32) -> u32 {
        eprintln!("{msg}");
        hook(x)
    }
}

/// Loops forever without calling the host; `black_box` keeps the loop from
/// being optimised away (an empty infinite loop would still be a loop, but
/// this makes it unambiguous and burns real instructions).
fn spin_forever() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Non-tail recursion with tiny frames: the result of the recursive call is
/// mixed non-linearly, so LLVM can neither turn it into a loop nor find a
/// closed form, and nothing is spilled to the shadow stack. With
/// `depth = u64::MAX` it exhausts the *wasm* call stack.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    let below = recurse(depth - 1);
    below ^ (below >> 3) ^ depth
}

/// Recursion whose every frame keeps a 64 KiB array on the linear-memory
/// (shadow) stack: the 1 MiB stack runs out after ~16 frames and the next
/// frame lands outside memory.
#[inline(never)]
fn recurse_big(depth: u64) -> u64 {
    let mut frame = [0_u8; BIG_FRAME];
    // Truncating casts are fine: any index/byte will do.
    let slot = (depth as usize) % BIG_FRAME;
    frame[slot] = depth.to_le_bytes()[0];
    let frame = black_box(&frame);
    if depth == 0 {
        return u64::from(frame[slot]);
    }
    let below = recurse_big(depth - 1);
    below.wrapping_add(u64::from(frame[slot]))
}

/// `a / b` compiled to a bare `i32.div_s`, so bad inputs hit the wasm trap
/// instead of a Rust panic. Promising LLVM that `checked_div` never fails
/// turns its "None" branches into unreachable code, which it deletes along
/// with both checks. (`assert_unchecked(b != 0 && !(a == MIN && b == -1))`
/// is not enough: LLVM drops the zero check but keeps the overflow check.)
#[inline(never)]
fn raw_div(a: i32, b: i32) -> i32 {
    // SAFETY: deliberately violated for b = 0 and MIN / -1. In wasm32 those
    // are not undefined at the machine level: the `i32.div_s` instruction
    // traps, which is exactly what the tests want.
    #[allow(unsafe_code)]
    unsafe {
        a.checked_div(b).unwrap_unchecked()
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Faulty, bindings};
    bindings::export!(Faulty with_types_in bindings);
}
