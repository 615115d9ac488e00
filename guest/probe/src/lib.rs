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

    fn connect(addr: String) -> Result<(), String> {
        text(std::net::TcpStream::connect(addr)).map(drop)
    }

    fn fetch(authority: String, path: String) -> Result<(u16, Vec<u8>), String> {
        use bindings::wasi::http::outgoing_handler;
        use bindings::wasi::http::types::{Fields, OutgoingRequest, Scheme};
        use bindings::wasi::io::streams::StreamError;

        let request = OutgoingRequest::new(Fields::new());
        let refused = |what: &str| format!("the request refused its {what}");
        request
            .set_scheme(Some(&Scheme::Http))
            .map_err(|()| refused("scheme"))?;
        request
            .set_authority(Some(&authority))
            .map_err(|()| refused("authority"))?;
        request
            .set_path_with_query(Some(&path))
            .map_err(|()| refused("path"))?;
        let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
        future.subscribe().block();
        let response = future
            .get()
            .ok_or("no response after the wait")?
            .map_err(|()| "the response was already taken")?
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let body = response
            .consume()
            .map_err(|()| "the body was already taken")?;
        let stream = body.stream().map_err(|()| "the stream was already taken")?;
        let mut out = Vec::new();
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(match bindings::wasi::http::types::http_error_code(&e) {
                        Some(code) => format!("{code:?}"),
                        None => e.to_debug_string(),
                    });
                }
            }
        }
        Ok((status, out))
    }

    fn quit(code: u32) {
        std::process::exit(code as i32)
    }

    fn hoard_files(path: String, n: u32) -> (u32, String) {
        FILES.with(|files| {
            let mut files = files.borrow_mut();
            let mut last = String::new();
            for _ in 0..n {
                match std::fs::File::open(&path) {
                    Ok(f) => files.push(f),
                    Err(e) => {
                        last = e.to_string();
                        break;
                    }
                }
            }
            (files.len() as u32, last)
        })
    }

    fn release_files() -> u32 {
        FILES.with(|files| std::mem::take(&mut *files.borrow_mut()).len() as u32)
    }

    fn random_seed() -> (u64, u64) {
        bindings::wasi::random::insecure_seed::insecure_seed()
    }

    fn symlink(target: String, path: String) -> Result<(), String> {
        // Rust's std has no stable symlink for WASI: wasi:filesystem itself,
        // on the preopen whose guest path starts `path`.
        use bindings::wasi::filesystem::preopens::get_directories;
        for (dir, at) in get_directories() {
            let prefix = format!("{}/", at.trim_end_matches('/'));
            if let Some(rest) = path.strip_prefix(&prefix) {
                // In a subdirectory: through a descriptor of that directory
                // (not the preopen's), as a guest that opened it would.
                let err = |e: bindings::wasi::filesystem::types::ErrorCode| e.name().to_string();
                return match rest.rsplit_once('/') {
                    None => dir.symlink_at(&target, rest).map_err(err),
                    Some((parent, name)) => {
                        use bindings::wasi::filesystem::types::{
                            DescriptorFlags, OpenFlags, PathFlags,
                        };
                        let sub = dir
                            .open_at(
                                PathFlags::empty(),
                                parent,
                                OpenFlags::DIRECTORY,
                                DescriptorFlags::READ | DescriptorFlags::MUTATE_DIRECTORY,
                            )
                            .map_err(err)?;
                        sub.symlink_at(&target, name).map_err(err)
                    }
                };
            }
        }
        Err(format!("no preopen holds {path}"))
    }

    fn hard_link(from: String, to: String) -> Result<(), String> {
        text(std::fs::hard_link(from, to))
    }
}

thread_local! {
    /// Descriptors kept across calls by `hoard-files`.
    static FILES: std::cell::RefCell<Vec<std::fs::File>> = const { std::cell::RefCell::new(Vec::new()) };
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Component, bindings};
    bindings::export!(Component with_types_in bindings);
}
