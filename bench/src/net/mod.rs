//! net benchmark: vhost-user-net against DPDK's vhost PMD, both driven by the same frontend,
//! DPDK's virtio_user in a `dpdk-testpmd`.
//!
//! Each subject runs in a network namespace of its own, with a tap of its own:
//!
//! - ours: `vhost-user-net --tap TAP --up`, which creates the tap;
//! - the peer: a second testpmd with `--vdev net_vhost0,iface=SOCK` and `--vdev net_tap0,iface=TAP`
//!   forwarding between the two ports (`set fwd io`), its forwarding lcore on a core of its own
//!   where the machine has one.
//!
//! Cases:
//!
//! - **guest-to-tap**: the frontend runs `txonly`. What counts is the frames that reach the tap:
//!   a frame a backend writes into a tap is *received* by the interface, so its `rx_packets`
//!   (read from `/proc/BACKEND_PID/net/dev`, which shows the backend's namespace) moves.
//! - **tap-to-guest**: a generator thread in the namespace sends frames out of the tap through an
//!   AF_PACKET socket (`sendmmsg`, qdisc bypassed, 64 flows so that every tap queue gets some);
//!   what counts is what the frontend's `rxonly` received (`RX-packets`). The generator's
//!   offered rate and the tap's drops are printed under the table: when the backend delivers
//!   nearly all that was offered, the generator, not the backend, was the limit.
//!
//! Backend CPU time is the backend process's user + system time over the measured interval. A
//! DPDK backend polls, so its CPU per packet is one core divided by its packet rate.

mod peer;
mod setup;
mod traffic;

use std::path::PathBuf;
use std::time::Duration;

use peer::find_testpmd;
use setup::Setup;
use traffic::Offered;

use crate::report::{Measurement, Names, Result, Subject, Table};
use crate::Options;

const OURS: &str = "vhost-user-net";
const PEER: &str = "DPDK vhost PMD";
const GUEST_MAC_TEXT: &str = "52:54:00:12:34:56";
const NAMES: Names = Names {
    ours: OURS,
    peer: PEER,
};

/// Options of `vhost-user-bench net`.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// Queue pairs to measure, comma separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_values_t = [1u16, 2])]
    pub queue_pairs: Vec<u16>,

    /// Frame sizes in bytes (Ethernet header included, no FCS), comma separated.
    #[arg(long, value_name = "BYTES,...", value_delimiter = ',', default_values_t = [64usize, 1500])]
    pub frame_sizes: Vec<usize>,

    /// The dpdk-testpmd binary (the frontend, and the peer's backend) [default: from PATH].
    #[arg(long, value_name = "PATH")]
    pub testpmd: Option<PathBuf>,

    /// Measure our daemon only.
    #[arg(long)]
    pub no_peer: bool,

    /// Rounds the subjects take turns in per case (the case's --duration is split between
    /// them; each subject's best round is reported). 1 with --quick.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rounds: u32,
}

impl Default for NetArgs {
    fn default() -> Self {
        NetArgs {
            queue_pairs: vec![1, 2],
            frame_sizes: vec![64, 1500],
            testpmd: None,
            no_peer: false,
            rounds: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    GuestToTap,
    TapToGuest,
}

fn case_name(direction: Direction, size: usize, pairs: u16) -> String {
    let d = match direction {
        Direction::GuestToTap => "guest-to-tap",
        Direction::TapToGuest => "tap-to-guest",
    };
    format!("{d} {size}B {pairs}q")
}

pub fn run(opts: &Options, args: &NetArgs) -> Result<()> {
    let Some(testpmd) = find_testpmd(args.testpmd.as_deref()) else {
        eprintln!(
            "net: dpdk-testpmd not found (Debian: apt-get install dpdk dpdk-dev). It is the \
             frontend for every subject, so the net benchmark is skipped."
        );
        return Ok(());
    };
    let ours_bin = opts.daemon(OURS);
    if !ours_bin.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release) or pass --bin-dir",
            ours_bin.display()
        )
        .into());
    }
    if let Some(&size) = args
        .frame_sizes
        .iter()
        .find(|&&s| !(60..=1514).contains(&s))
    {
        return Err(format!("--frame-sizes {size}: must be 60 to 1514 bytes").into());
    }
    if let Some(&n) = args.queue_pairs.iter().find(|&&n| !(1..=8).contains(&n)) {
        return Err(format!("--queue-pairs {n}: must be 1 to 8").into());
    }
    let mut subjects = vec![Subject::Ours];
    if args.no_peer {
        eprintln!("net: --no-peer: measuring {OURS} only");
    } else {
        subjects.push(Subject::Peer);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return Err("the net benchmark needs 2 CPUs: testpmd's forwarding lcore polls one".into());
    }
    let warmup = if opts.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(500)
    };
    let rounds = if opts.quick { 1 } else { args.rounds.max(1) };
    let duration = opts.case_duration() / rounds;
    let run = BenchRun {
        testpmd,
        ours_bin,
        cores,
        warmup,
        duration,
        rounds,
        dir: tempfile::Builder::new().prefix("vub-net-").tempdir()?,
    };
    eprintln!(
        "net: {} case(s), each subject {} round(s) of {:.1} s per case taking turns, frontend: \
         DPDK virtio_user (testpmd), {cores} CPU(s)",
        args.queue_pairs.len() * args.frame_sizes.len() * 2,
        run.rounds,
        run.duration.as_secs_f64()
    );

    let mut table = Table::new(
        &format!(
            "net: vhost-user-net vs DPDK vhost PMD, frontend DPDK virtio_user (ops = frames; \
             each row is the subject's best of {} round(s) of {:.1} s)",
            run.rounds,
            run.duration.as_secs_f64()
        ),
        OURS,
    );
    let mut notes = Vec::new();
    for &pairs in &args.queue_pairs {
        let cases: Vec<(Direction, usize)> = [Direction::GuestToTap, Direction::TapToGuest]
            .into_iter()
            .flat_map(|d| args.frame_sizes.iter().map(move |&s| (d, s)))
            .filter(|&(d, s)| opts.selected(&case_name(d, s, pairs)))
            .collect();
        if cases.is_empty() {
            continue;
        }
        // Both subjects stay set up while they take turns case by case (an idle one costs
        // nothing: the peer's forwarding is stopped between its turns), so that the load of a
        // shared machine drifts over both alike.
        let mut setups = Vec::new();
        for &subject in &subjects.clone() {
            match Setup::start(&run, subject, pairs) {
                Ok(setup) => setups.push(setup),
                Err(e) if subject == Subject::Peer => {
                    eprintln!("net: the peer ({PEER}) did not start, measuring {OURS} only: {e}");
                    notes.push(format!("{PEER} could not be started: {e}"));
                    subjects.retain(|&s| s != Subject::Peer);
                }
                Err(e) => return Err(e),
            }
        }
        for (direction, size) in cases {
            let case = case_name(direction, size, pairs);
            let mut best: Vec<Option<(Measurement, Option<Offered>)>> =
                setups.iter().map(|_| None).collect();
            for round in 0..run.rounds {
                // Alternate who goes first.
                let mut order: Vec<usize> = (0..setups.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let setup = &mut setups[i];
                    if setup.failed {
                        continue;
                    }
                    let (m, offered) = match setup.run_case(&run, direction, size) {
                        Ok(result) => result,
                        Err(e) if setup.subject == Subject::Peer => {
                            // The peer's failure is a finding, not the end of the run.
                            eprintln!("  {case}, {PEER}: failed, measuring {OURS} only: {e}");
                            notes.push(format!("{case}, {PEER}: failed: {e}"));
                            setup.failed = true;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if run.rounds > 1 {
                        eprintln!(
                            "    round {}: {case}, {}: {:.0} frames/s",
                            round + 1,
                            setup.subject.name(NAMES),
                            m.ops_per_sec()
                        );
                    }
                    let better = best[i]
                        .as_ref()
                        .is_none_or(|(b, _)| m.ops_per_sec() > b.ops_per_sec());
                    if better {
                        best[i] = Some((m, offered));
                    }
                }
            }
            for (setup, best) in setups.iter().zip(best) {
                if let Some((m, offered)) = best {
                    if let Some(offered) = offered {
                        notes.push(offered.note(&case, setup.subject, &m));
                    }
                    table.push(&case, setup.subject.name(NAMES), m);
                }
            }
        }
        for setup in setups {
            if !setup.failed {
                setup.finish()?;
            }
        }
    }
    table.print();
    println!("Notes:");
    for note in &notes {
        println!("- {note}");
    }
    let p = run.placement();
    println!(
        "- CPUs: {cores}. Frontend testpmd: forwarding lcore on CPU 1 (it polls, 100%); backend \
         under test on CPU(s) {:?} (the peer's forwarding lcore polls it; our daemon's threads \
         are pinned there); tap-to-guest generator on CPU(s) {:?}{}.",
        p.backend_cpus,
        p.generator_cpus,
        if cores < 4 {
            ", sharing the frontend's core: with 2 CPUs the generator and the frontend compete, \
             and the backend has one core, so a second queue pair cannot add CPU"
        } else {
            ""
        }
    );
    Ok(())
}

/// What every setup of one run shares.
struct BenchRun {
    testpmd: PathBuf,
    ours_bin: PathBuf,
    cores: usize,
    warmup: Duration,
    /// Length of one round, and rounds per subject and case.
    duration: Duration,
    rounds: u32,
    dir: tempfile::TempDir,
}

/// Which CPUs everyone runs on. The frontend's forwarding lcore gets a core; the backend under
/// test (the peer's forwarding lcore, or all of our daemon's threads) gets another; the
/// tap-to-guest generator shares the frontend's core on a 2- or 3-CPU machine (so that a
/// backend's core is its own), and gets a core of its own with 4 or more.
struct Placement {
    frontend_eal: Vec<String>,
    peer_eal: Vec<String>,
    backend_cpus: Vec<usize>,
    generator_cpus: Vec<usize>,
}

impl BenchRun {
    fn placement(&self) -> Placement {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        if self.cores >= 4 {
            Placement {
                frontend_eal: s(&["-l", "0,1", "--main-lcore", "0"]),
                peer_eal: s(&["-l", "2,3", "--main-lcore", "2"]),
                backend_cpus: vec![3],
                generator_cpus: vec![0],
            }
        } else {
            Placement {
                frontend_eal: s(&["-l", "0,1", "--main-lcore", "0"]),
                peer_eal: s(&["-l", "0,1", "--main-lcore", "1"]),
                backend_cpus: vec![0],
                generator_cpus: vec![1],
            }
        }
    }
}

/// Restricts the calling thread (and what it executes) to `cpus`.
fn pin_to(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes one bit of `set` for a CPU number below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
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
            args: NetArgs,
        }
        let parsed = Cli::parse_from(["net"]).args;
        let default = NetArgs::default();
        assert_eq!(parsed.queue_pairs, default.queue_pairs);
        assert_eq!(parsed.frame_sizes, default.frame_sizes);
        assert_eq!(parsed.no_peer, default.no_peer);
        assert_eq!(parsed.rounds, default.rounds);
    }
}
