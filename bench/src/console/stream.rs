//! The test stream (printable ASCII in a known pattern, every byte checked) and the TCP
//! client's reader and writer.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::STALL;
use crate::report::Result;

/// The data pattern: byte `i` of a stream is `33 + i % PERIOD` (printable ASCII).
const PERIOD: usize = 89;

/// Byte `i` of the test stream.
pub(super) fn pattern_byte(i: u64) -> u8 {
    33 + (i % PERIOD as u64) as u8
}

/// `len` bytes of the stream from `offset`, taken from a precomputed `pattern`.
pub(super) fn pattern_at(pattern: &[u8], offset: u64, len: usize) -> &[u8] {
    let start = (offset % PERIOD as u64) as usize;
    &pattern[start..start + len]
}

pub(super) fn make_pattern(len: usize) -> Vec<u8> {
    (0..(len + PERIOD) as u64).map(pattern_byte).collect()
}

/// Checks `data` against the stream at `offset`.
pub(super) fn check(pattern: &[u8], offset: u64, data: &[u8]) -> Result<()> {
    if data == pattern_at(pattern, offset, data.len()) {
        return Ok(());
    }
    let at = data
        .iter()
        .enumerate()
        .position(|(i, &b)| b != pattern_byte(offset + i as u64))
        .unwrap_or(0);
    Err(format!(
        "data corrupted at stream byte {}: got {:#04x}, expected {:#04x}",
        offset + at as u64,
        data.get(at).copied().unwrap_or(0),
        pattern_byte(offset + at as u64)
    )
    .into())
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads the stream from the client side and checks it, until `target` bytes arrived (or
/// nothing comes for a while once the target is known).
pub(super) fn read_and_check(
    mut stream: TcpStream,
    pattern: &[u8],
    received: &AtomicU64,
    target: &AtomicU64,
) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    let mut quiet_since: Option<Instant> = None;
    loop {
        let goal = target.load(Ordering::Relaxed);
        if offset >= goal {
            return Ok(());
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err("the TCP endpoint closed".into()),
            Ok(n) => {
                let mut done = 0;
                while done < n {
                    let part = (n - done).min(pattern.len() - PERIOD);
                    check(pattern, offset, &buf[done..done + part])?;
                    offset += part as u64;
                    done += part;
                }
                received.store(offset, Ordering::Relaxed);
                quiet_since = None;
            }
            Err(e) if is_timeout(&e) => {
                if goal != u64::MAX {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL {
                        return Err(format!(
                            "the client got {offset} of the {goal} bytes the guest sent"
                        )
                        .into());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes the stream into the endpoint until `stop`.
pub(super) fn write_stream(
    mut stream: TcpStream,
    pattern: &[u8],
    stop: &AtomicBool,
    written: &AtomicU64,
) -> Result<()> {
    let mut offset = 0u64;
    let chunk = pattern.len() - PERIOD;
    while !stop.load(Ordering::Relaxed) {
        match stream.write(pattern_at(pattern, offset, chunk)) {
            Ok(0) => return Err("the TCP endpoint closed".into()),
            Ok(n) => {
                offset += n as u64;
                written.store(offset, Ordering::Relaxed);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_slices_follow_the_stream() {
        let p = make_pattern(1000);
        for offset in [0u64, 1, 88, 89, 12345] {
            let slice = pattern_at(&p, offset, 1000);
            for (i, &b) in slice.iter().enumerate() {
                assert_eq!(b, pattern_byte(offset + i as u64));
            }
            assert!(check(&p, offset, slice).is_ok());
        }
        assert!(check(&p, 5, &p[..10]).is_err());
        assert!(p.iter().all(|b| b.is_ascii_graphic()));
    }
}
