//! The Port baseline of the benchmarks: a native OS process the VM talks to
//! through an Erlang Port opened with `{:packet, 4}`.
//!
//! Every message is a 4-byte big-endian length, then that many bytes. A
//! request is one op byte and its payload:
//!
//! | op | payload | reply |
//! |---|---|---|
//! | 1 (add) | two big-endian `i32` | their wrapping sum, one big-endian `i32` |
//! | 2 (echo) | any bytes | the same bytes |
//!
//! The process exits with status 0 when stdin closes (the port is closed or
//! the VM exits), and with status 2 on a malformed request.

use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Write};
use std::process::ExitCode;

const OP_ADD: u8 = 1;
const OP_ECHO: u8 = 2;

fn main() -> ExitCode {
    match serve(
        BufReader::with_capacity(1 << 16, io::stdin().lock()),
        BufWriter::with_capacity(1 << 16, io::stdout().lock()),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsid_bench_port: {e}");
            ExitCode::from(2)
        }
    }
}

/// Answers requests until `input` ends.
fn serve(mut input: impl Read, mut output: impl Write) -> io::Result<()> {
    let mut request = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        request.resize(u32::from_be_bytes(len) as usize, 0);
        input.read_exact(&mut request)?;

        match request.split_first() {
            Some((&OP_ADD, args)) if args.len() == 8 => {
                let a = i32::from_be_bytes([args[0], args[1], args[2], args[3]]);
                let b = i32::from_be_bytes([args[4], args[5], args[6], args[7]]);
                output.write_all(&4u32.to_be_bytes())?;
                output.write_all(&a.wrapping_add(b).to_be_bytes())?;
            }
            Some((&OP_ECHO, payload)) => {
                let n = u32::try_from(payload.len())
                    .map_err(|_| io::Error::new(ErrorKind::InvalidData, "reply too large"))?;
                output.write_all(&n.to_be_bytes())?;
                output.write_all(payload)?;
            }
            _ => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("malformed request of {} bytes", request.len()),
                ));
            }
        }
        // The caller waits for this reply before sending the next request.
        output.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::serve;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn add_and_echo_then_eof() {
        let mut input = frame(&[1, 0, 0, 0, 40, 0xff, 0xff, 0xff, 0xfe]);
        input.extend(frame(&[2, b'h', b'i']));
        input.extend(frame(&[2]));
        let mut output = Vec::new();
        serve(input.as_slice(), &mut output).unwrap();

        let mut expected = frame(&38i32.to_be_bytes());
        expected.extend(frame(b"hi"));
        expected.extend(frame(b""));
        assert_eq!(output, expected);
    }

    #[test]
    fn malformed_request_is_an_error() {
        let input = frame(&[1, 0, 0]);
        assert!(serve(input.as_slice(), &mut Vec::new()).is_err());
        let input = frame(&[]);
        assert!(serve(input.as_slice(), &mut Vec::new()).is_err());
    }
}
