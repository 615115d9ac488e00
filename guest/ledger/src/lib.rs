//! Host resources for Capsid's tests (world `capsid:ledger/ledgers`): a guest
//! that uses a `ledger` the host implements in every way the component
//! model allows — made by its constructor or a static, borrowed, owned,
//! given back, in lists, options and records, held across calls, leaked.

use std::cell::RefCell;

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/ledger",
        world: "capsid:ledger/ledgers",
    });
}

use bindings::capsid::ledger::books::{self, Ledger};
use bindings::exports::capsid::ledger::desk::{self, Pair};

thread_local! {
    static HELD: RefCell<Vec<Ledger>> = const { RefCell::new(Vec::new()) };
}

struct Component;

impl desk::Guest for Component {
    fn scratch(name: String, entries: Vec<String>) -> u32 {
        let ledger = Ledger::new(&name);
        entries.iter().map(|e| ledger.record(e)).last().unwrap_or(0)
    }

    fn keep(name: String) -> Ledger {
        Ledger::open(&name)
    }

    fn audit(l: &Ledger, entry: String) -> u32 {
        l.record(&entry)
    }

    fn adopt(l: Ledger) -> String {
        l.name()
    }

    fn names(ls: Vec<Ledger>) -> Vec<String> {
        ls.iter().map(|l| l.name()).collect()
    }

    fn make_and_archive(name: String) -> String {
        let ledger = Ledger::new(&name);
        let name = ledger.name();
        books::archive(ledger);
        name
    }

    fn lookup(name: String) -> Option<String> {
        books::find(&name).map(|l| l.name())
    }

    fn label(l: Ledger, label: String) -> Pair {
        Pair { label, book: l }
    }

    fn unlabel(labelled: Pair) -> String {
        format!("{}: {}", labelled.label, labelled.book.name())
    }

    fn hold(l: Ledger) {
        HELD.with(|h| h.borrow_mut().push(l));
    }

    fn release() -> u32 {
        HELD.with(|h| h.borrow_mut().drain(..).count() as u32)
    }

    fn hoard(n: u32) -> u32 {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            for i in 0..n {
                h.push(Ledger::new(&format!("hoard-{i}")));
            }
            h.len() as u32
        })
    }

    fn held() -> u32 {
        HELD.with(|h| h.borrow().len() as u32)
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Component, bindings};
    bindings::export!(Component with_types_in bindings);
}
