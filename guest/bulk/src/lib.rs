//! Large values in every position of a signature (world `capsid:bulk/bulk`):
//! results, records, several parameters, import arguments and answers.

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/bulk",
        world: "bulk",
    });
}

use bindings::{Blob, Guest, fetch, send};

struct Bulk;

fn options(n: u32) -> Vec<Option<u8>> {
    (0..n)
        .map(|i| (i % 7 != 6).then_some((i % 256) as u8))
        .collect()
}

fn sum(items: &[Option<u8>]) -> u64 {
    items.iter().flatten().map(|b| u64::from(*b)).sum()
}

impl Guest for Bulk {
    fn options(n: u32) -> Vec<Option<u8>> {
        options(n)
    }

    fn sum_options(items: Vec<Option<u8>>) -> u64 {
        sum(&items)
    }

    fn make_blob(name: String, size: u32) -> Blob {
        Blob {
            name,
            data: (0..size).map(|i| (i % 251) as u8).collect(),
            tags: vec!["bulk".into(), "fixture".into()],
        }
    }

    fn blob_digest(b: Blob) -> u64 {
        b.data.iter().map(|x| u64::from(*x)).sum::<u64>() + b.tags.len() as u64
    }

    fn echo_blob(b: Blob) -> Blob {
        b
    }

    fn bytes_and_more(a: u32, data: Vec<u8>, b: String) -> u64 {
        u64::from(a) + b.len() as u64 + data.iter().map(|x| u64::from(*x)).sum::<u64>()
    }

    fn call_fetch(n: u32) -> u64 {
        sum(&fetch(n))
    }

    fn call_send(n: u32) -> u32 {
        send(&options(n))
    }
}

#[allow(unsafe_code)]
mod export {
    use super::{Bulk, bindings};
    bindings::export!(Bulk with_types_in bindings);
}
