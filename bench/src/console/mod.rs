//! console benchmark: vhost-user-console against rust-vmm's vhost-device-console, both with a
//! TCP endpoint, driven by the same frontend: this program, acting as the VMM and the guest's
//! virtio-console driver (one port, no MULTIPORT, EVENT_IDX) over the daemon's socket, and as
//! the TCP client on the host side.
//!
//! Cases:
//!
//! - **guest-to-host**: the guest keeps `depth` 64 KiB transmit chains in flight; the TCP client
//!   reads and checks every byte. Throughput is what reached the client.
//! - **host-to-guest**: the client writes as fast as the endpoint takes it; the guest keeps
//!   `depth` 32 KiB receive buffers posted and checks every byte it gets. (32 KiB, not 64 KiB:
//!   vhost-device-console adds one used entry per byte, and 65536 entries would wrap the 16-bit
//!   used index back to where it was.)
//! - **ping-pong**: the guest sends 1 byte, the client answers 1 byte, the guest posts a receive
//!   buffer and waits for the answer in it; p50 / p99 of the round trip.
//!
//! In the throughput rows one op is 1 KB (1000 bytes) moved, so "backend CPU µs/op" × 1000 is
//! the backend's CPU µs per MB. The data is printable ASCII (vhost-device-console turns guest
//! output into a `String` and panics on anything else) following a known pattern, so every
//! byte is checked: a mismatch from our daemon is an error, from the peer a note.

mod peer;
mod ring;
mod session;
mod stream;

use std::path::PathBuf;
use std::time::Duration;

use peer::find_peer;
use session::Session;

use crate::report::{Names, Result, Subject, Table};
use crate::Options;

const OURS: &str = "vhost-user-console";
const PEER: &str = "vhost-device-console";
const NAMES: Names = Names {
    ours: OURS,
    peer: PEER,
};
const RAM: u64 = 64 << 20;
/// vhost-device-console's largest queue; used for both.
const QUEUE_SIZE: u16 = 128;
const RX: usize = 0;
const TX: usize = 1;
const TX_BASE: u64 = 16 << 20;
const RX_BASE: u64 = 40 << 20;
const TX_CHUNK: usize = 64 * 1024;
const RX_CHUNK: usize = 32 * 1024;
const STALL: Duration = Duration::from_secs(5);

/// Options of `vhost-user-bench console`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsoleArgs {
    /// Chains (guest-to-host) and receive buffers (host-to-guest) the guest keeps in flight.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub depth: u16,

    /// The vhost-device-console binary [default: from PATH, then ~/.cargo/bin].
    #[arg(long, value_name = "PATH")]
    pub peer_bin: Option<PathBuf>,

    /// Measure our daemon only.
    #[arg(long)]
    pub no_peer: bool,
}

impl Default for ConsoleArgs {
    fn default() -> Self {
        ConsoleArgs {
            depth: 8,
            peer_bin: None,
            no_peer: false,
        }
    }
}

pub fn run(opts: &Options, args: &ConsoleArgs) -> Result<()> {
    if !(1..=QUEUE_SIZE / 2).contains(&args.depth) {
        return Err(format!("--depth {}: must be 1 to {}", args.depth, QUEUE_SIZE / 2).into());
    }
    let ours_bin = opts.daemon(OURS);
    if !ours_bin.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release) or pass --bin-dir",
            ours_bin.display()
        )
        .into());
    }
    let mut subjects = vec![(Subject::Ours, ours_bin)];
    if args.no_peer {
        eprintln!("console: --no-peer: measuring {OURS} only");
    } else {
        match find_peer(args.peer_bin.as_deref()) {
            Some(bin) => subjects.push((Subject::Peer, bin)),
            None => eprintln!(
                "console: {PEER} not found (cargo install --locked vhost-device-console, or \
                 --peer-bin): measuring {OURS} only"
            ),
        }
    }
    let duration = opts.case_duration();
    let warmup = if opts.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let dir = tempfile::Builder::new().prefix("vub-console-").tempdir()?;
    let mut table = Table::new(
        "console: vhost-user-console vs vhost-device-console, TCP endpoint, frontend in-process \
         (throughput rows: 1 op = 1 KB, so CPU µs/op x 1000 = backend CPU µs per MB)",
        OURS,
    );
    let mut notes = Vec::new();
    let cases = [
        format!("guest-to-host {}KiB x{}", TX_CHUNK / 1024, args.depth),
        format!("host-to-guest {}KiB x{}", RX_CHUNK / 1024, args.depth),
        "ping-pong 1B".to_string(),
    ];
    // Subjects take turns case by case, each on a fresh daemon, so that slow drifts of a
    // shared machine hit both alike.
    for (i, case) in cases.iter().enumerate() {
        if !opts.selected(case) {
            continue;
        }
        for (subject, bin) in &subjects {
            let mut session = Session::start(*subject, bin, dir.path())?;
            // Every case starts with a little guest output, which also makes
            // vhost-device-console start passing host input to the guest (it waits for the
            // first transmit kick).
            session.prime()?;
            let outcome = match i {
                0 => session.guest_to_host(args.depth, warmup, duration),
                1 => session.host_to_guest(args.depth, warmup, duration),
                _ => session.ping_pong(warmup, duration),
            };
            match outcome {
                Ok(m) => {
                    session.check_alive()?;
                    if session.lost_rx > 0 {
                        notes.push(format!(
                            "{case}, {}: the device took {} receive buffer(s) and never gave \
                             them back (the guest posted more to go on; a real driver would have \
                             lost them)",
                            subject.name(NAMES),
                            session.lost_rx
                        ));
                    }
                    if let (Some(cpu), true) = (m.backend_cpu, m.bytes >= 1_000_000 && i < 2) {
                        notes.push(format!(
                            "{case}, {}: backend CPU {:.0} µs per MB",
                            subject.name(NAMES),
                            cpu.as_secs_f64() * 1e6 / (m.bytes as f64 / 1e6)
                        ));
                    }
                    table.push(case, subject.name(NAMES), m);
                }
                Err(e) => {
                    session.check_alive()?;
                    if *subject == Subject::Ours {
                        return Err(format!("{case}, {OURS}: {e}").into());
                    }
                    eprintln!(
                        "  {case}, {PEER}: failed: {e}; its log ends with:\n{}",
                        session.daemon.log_tail(8)
                    );
                    notes.push(format!("{case}, {PEER}: failed: {e}"));
                }
            }
            session.finish()?;
        }
    }
    table.print();
    if !notes.is_empty() {
        println!("Notes:");
        for note in &notes {
            println!("- {note}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_args_match_the_command_line_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ConsoleArgs,
        }
        let parsed = Cli::parse_from(["console"]).args;
        assert_eq!(parsed.depth, ConsoleArgs::default().depth);
        assert_eq!(parsed.no_peer, ConsoleArgs::default().no_peer);
    }
}
