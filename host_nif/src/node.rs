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
    budgets,
    in_use,
    limit,
    refused,
    descriptor_limit,
    dirty_conversions,
}

/// Node-wide settings from the application environment (checked by
/// `Capsid.Application`): `address_space_limit` (bytes Capsid's arenas may
/// reserve; `nil` leaves it), and each budget of `budget.rs` by its key
/// (`nil`: its default).
#[cfg_attr(not(test), rustler::nif)]
fn node_configure(settings: Vec<(String, Option<u64>)>) -> Result<rustler::Atom, String> {
    for (key, value) in settings {
        if key == "address_space_limit" {
            if let Some(bytes) = value {
                crate::arena::set_address_space_limit(bytes);
            }
        } else if key == crate::budget::DIRTY.key {
            crate::budget::DIRTY.set_limit(value.map(|n| n.max(1)));
        } else if let Some(budget) = crate::budget::ALL.iter().find(|b| b.key == key) {
            budget.set_limit(value);
        } else {
            return Err(format!("unknown node setting {key}"));
        }
    }
    Ok(ok())
}

/// `%{in_use, limit, refused}` of `budget`.
fn usage<'a>(env: Env<'a>, b: &crate::budget::Budget) -> Term<'a> {
    let k = [in_use(), limit(), refused()].map(|a| a.encode(env));
    let v = [b.in_use(), b.limit(), b.refused()].map(|n| n.encode(env));
    Term::map_from_term_arrays(env, &k, &v).unwrap_or_else(|_| Term::map_new(env))
}

/// `%{name => %{in_use, limit, refused}}` for each node budget.
fn budgets_info(env: Env) -> Term {
    let keys = crate::budget::ALL.map(|b| b.atom(env));
    let vals = crate::budget::ALL.map(|b| usage(env, b));
    Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
}

/// `%{address_space_reserved, mappings, memories, stacks, atoms_created,
/// ticker_parked, ticker_wakes, compiling, budgets, descriptor_limit,
/// dirty_conversions}`.
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
        budgets(),
        descriptor_limit(),
        dirty_conversions(),
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
        budgets_info(env),
        crate::budget::descriptor_limit().encode(env),
        usage(env, &crate::budget::DIRTY),
    ];
    Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
}
