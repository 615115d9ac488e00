//! Guest stdout/stderr capture. WASI output goes into a bounded in-memory
//! buffer per stream (never to the VM's terminal); each call drains it, so a
//! trap carries exactly what the guest wrote during that call.

use crate::budget::HOST_BYTES;
use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes kept per stream per call; the rest is counted and dropped so a
/// chatty guest cannot grow host memory without bound.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
}

#[derive(Default)]
struct Inner {
    buffer: Mutex<Buffer>,
    /// Lets `take` skip the lock on the common path: nothing was written.
    written: AtomicBool,
}

#[derive(Clone, Default)]
pub struct Capture(Arc<Inner>);

/// What an instance kept and nobody took goes back to the budget with it.
impl Drop for Inner {
    fn drop(&mut self) {
        let buf = self.buffer.get_mut().unwrap_or_else(|p| p.into_inner());
        HOST_BYTES.give(buf.bytes.len() as u64);
    }
}

impl Capture {
    fn push(&self, data: &[u8]) {
        self.0.written.store(true, Ordering::Release);
        let mut buf = self.0.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let room = CAPTURE_LIMIT.saturating_sub(buf.bytes.len());
        let mut keep = data.len().min(room);
        // Kept output is host memory a guest fills: 128 KiB an instance,
        // gigabytes over many. It counts against the node's host-bytes
        // budget; past it, output is dropped (and said so), never an error.
        if keep > 0 && HOST_BYTES.take(keep as u64).is_err() {
            keep = 0;
        }
        buf.bytes.extend_from_slice(&data[..keep]);
        buf.dropped += data.len() - keep;
    }

    /// Everything written since the last `take`, with a note if some was dropped.
    pub fn take(&self) -> Vec<u8> {
        // A plain load first: the common case (nothing written) then costs
        // no locked instruction.
        if !self.0.written.load(Ordering::Acquire) || !self.0.written.swap(false, Ordering::AcqRel)
        {
            return Vec::new();
        }
        let mut buf = self.0.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = std::mem::take(&mut buf.bytes);
        HOST_BYTES.give(out.len() as u64);
        if buf.dropped > 0 {
            out.extend_from_slice(
                format!("\n[capsid: {} more bytes dropped]", buf.dropped).as_bytes(),
            );
            buf.dropped = 0;
        }
        out
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: excess is dropped in `push`, not refused, so a
        // guest never blocks or fails on output.
        Ok(1024 * 1024)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node budget is one counter for the whole test binary.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn kept_output_counts_against_the_host_bytes_budget() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let before = HOST_BYTES.in_use();
        let c = Capture::default();
        c.push(&[b'y'; 1000]);
        assert_eq!(HOST_BYTES.in_use(), before + 1000);
        assert_eq!(c.take().len(), 1000);
        assert_eq!(HOST_BYTES.in_use(), before);
        c.push(&[b'z'; 10]);
        drop(c);
        assert_eq!(HOST_BYTES.in_use(), before, "dropped with what it kept");
    }

    #[test]
    fn take_drains_and_reports_dropped_bytes() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let c = Capture::default();
        c.push(b"hello");
        assert_eq!(c.take(), b"hello");
        assert!(c.take().is_empty());
        c.push(&vec![b'x'; CAPTURE_LIMIT + 10]);
        let out = c.take();
        assert!(out.starts_with(&vec![b'x'; CAPTURE_LIMIT]));
        assert!(String::from_utf8_lossy(&out).contains("10 more bytes dropped"));
    }
}
