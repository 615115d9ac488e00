//! Node-wide settings and what Capsid holds on this node.

use rustler::{Encoder, Env, Term};

rustler::atoms! {
    ok,
    address_space_reserved,
    mappings,
    memories,
    stacks,
    atoms_created,
    ticker_parked,
    ticker_wakes,
    compiling,
}

/// Sets the address space Capsid's arenas may reserve, in bytes.
#[cfg_attr(not(test), rustler::nif)]
fn node_configure(address_space_limit: u64) -> rustler::Atom {
    crate::arena::set_address_space_limit(address_space_limit);
    ok()
}

/// `%{address_space_reserved, mappings, memories, stacks, atoms_created,
/// ticker_parked, ticker_wakes, compiling}`.
#[cfg_attr(not(test), rustler::nif)]
fn node_info(env: Env) -> Term {
    let (reserved, chunks, live_memories, live_stacks) = crate::arena::usage();
    let keys = [
        address_space_reserved(),
        mappings(),
        memories(),
        stacks(),
        atoms_created(),
        ticker_parked(),
        ticker_wakes(),
        compiling(),
    ]
    .map(|a| a.encode(env));
    let vals = [
        reserved.encode(env),
        chunks.encode(env),
        live_memories.encode(env),
        live_stacks.encode(env),
        crate::shape::atoms_created().encode(env),
        crate::engine::ticker_parked().encode(env),
        crate::engine::ticker_wakes().encode(env),
        crate::component::compiling().encode(env),
    ];
    Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
}
