//! Tries WASI capabilities for Capsid's tests (world `capsid:probe/probe`):
//! each function does one thing through Rust's std (which calls WASI) and
//! reports what happened.

use std::io::{Read, Write};

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/probe",
        world: "capsid:probe/probe",
        generate_all,
    });
}

use bindings::exports::capsid::probe::io;

fn text<T>(r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

struct Component;

impl io::Guest for Component {
    fn read_file(path: String) -> Result<String, String> {
        text(std::fs::read_to_string(path))
    }

    fn write_file(path: String, data: String) -> Result<(), String> {
        text(std::fs::write(path, data))
    }

    fn remove_file(path: String) -> Result<(), String> {
        text(std::fs::remove_file(path))
    }

    fn rename(from: String, to: String) -> Result<(), String> {
        text(std::fs::rename(from, to))
    }

    fn make_dir(path: String) -> Result<(), String> {
        text(std::fs::create_dir(path))
    }

    fn list_dir(path: String) -> Result<Vec<String>, String> {
        let mut names = text(std::fs::read_dir(path))?
            .map(|e| text(e).map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        names.sort();
        Ok(names)
    }

    fn env() -> Vec<(String, String)> {
        std::env::vars().collect()
    }

    fn args() -> Vec<String> {
        std::env::args().collect()
    }

    fn read_stdin() -> String {
        let mut s = String::new();
        let _ = std::io::stdin().read_to_string(&mut s);
        s
    }

    fn say(out: String, err: String) {
        let _ = std::io::stdout().write_all(out.as_bytes());
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(err.as_bytes());
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn random() -> (u64, u64) {
        (
            bindings::wasi::random::random::get_random_u64(),
            bindings::wasi::random::insecure::get_insecure_random_u64(),
        )
    }

    fn quit(code: u32) {
        std::process::exit(code as i32)
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Component, bindings};
    bindings::export!(Component with_types_in bindings);
}
