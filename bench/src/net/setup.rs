//! One subject set up and connected: its network namespace and tap, the backend (our daemon,
//! or testpmd with the vhost PMD) and the frontend testpmd.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vhost_user_tests::netns::Netns;
use vhost_user_tests::Daemon;

use super::peer::{forward_drop_share, Testpmd};
use super::traffic::Offered;
use super::{pin_to, BenchRun, Direction, GUEST_MAC_TEXT, OURS};
use crate::report::{Measurement, Result, Subject};

static SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// The backend under test.
pub(super) enum Backend {
    Ours(Daemon),
    Peer(Testpmd),
}

impl Backend {
    pub(super) fn pid(&self) -> u32 {
        match self {
            Backend::Ours(daemon) => daemon.pid(),
            Backend::Peer(testpmd) => testpmd.child.id(),
        }
    }
}

/// One subject with `pairs` queue pairs, connected to the frontend. Field order is drop order:
/// the frontend quits, then the backend, then the namespace goes.
pub(super) struct Setup {
    pub(super) frontend: Testpmd,
    pub(super) backend: Backend,
    pub(super) ns: Netns,
    pub(super) tap: String,
    pub(super) subject: Subject,
    /// A turn failed (the peer only: ours failing ends the run); no more turns.
    pub(super) failed: bool,
}

impl Setup {
    pub(super) fn start(run: &BenchRun, subject: Subject, pairs: u16) -> Result<Setup> {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", subject.tag());
        // No IPv6 on the taps: no router solicitations among the measured frames.
        let ns = Netns::without_ipv6("vub-net").map_err(|e| {
            format!("cannot create a network namespace (the net benchmark needs root): {e}")
        })?;
        // Interface names: at most 15 characters.
        let tap = format!("vb{tag}{}", pid % 1_000_000);
        let socket = run.dir.path().join(format!("{tag}.sock"));
        let unique = format!("{pid}-{n}");
        let backend = match subject {
            Subject::Ours => Backend::Ours(start_ours(run, &ns, &tap, &socket, pairs)?),
            Subject::Peer => Backend::Peer(Testpmd::start_peer(
                run, &ns, &tap, &socket, pairs, &tag, &unique,
            )?),
        };
        let frontend = Testpmd::start_frontend(run, &socket, pairs, &tag, &unique)?;
        let mut setup = Setup {
            frontend,
            backend,
            ns,
            tap,
            subject,
            failed: false,
        };
        // Let the rings come up (ours attaches a tap queue when its RX ring is enabled).
        std::thread::sleep(Duration::from_millis(500));
        setup.check_alive()?;
        Ok(setup)
    }

    /// One turn at a case: the measurement, and for tap-to-guest what was offered.
    pub(super) fn run_case(
        &mut self,
        run: &BenchRun,
        direction: Direction,
        size: usize,
    ) -> Result<(Measurement, Option<Offered>)> {
        self.activate()?;
        let (m, offered) = match direction {
            Direction::GuestToTap => (self.guest_to_tap(run, size)?, None),
            Direction::TapToGuest => {
                let (m, offered) = self.tap_to_guest(run, size)?;
                (m, Some(offered))
            }
        };
        let dropped = self.deactivate()?;
        self.check_alive()?;
        let offered = offered.map(|mut o| {
            o.forward_dropped = dropped;
            o
        });
        Ok((m, offered))
    }

    /// The peer's forwarding runs only during its turns (it polls a core while it runs).
    fn activate(&mut self) -> Result<()> {
        if let Backend::Peer(testpmd) = &mut self.backend {
            testpmd.cmd("start")?;
        }
        Ok(())
    }

    /// Stops the peer's forwarding; returns the share of the frames it forwarded towards the
    /// guest that it dropped (the guest's ring was full: the vhost PMD does not push back).
    fn deactivate(&mut self) -> Result<Option<f64>> {
        if let Backend::Peer(testpmd) = &mut self.backend {
            let out = testpmd.cmd("stop")?;
            return Ok(forward_drop_share(&out, 0));
        }
        Ok(None)
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Backend::Ours(daemon) = &mut self.backend {
            if let Some(status) = daemon.child.try_wait()? {
                return Err(format!("{OURS} died ({status}):\n{}", daemon.log_tail(30)).into());
            }
        }
        if let Backend::Peer(testpmd) = &mut self.backend {
            if let Some(why) = testpmd.died() {
                return Err(why.into());
            }
        }
        if let Some(why) = self.frontend.died() {
            return Err(why.into());
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<()> {
        self.check_alive()?;
        self.frontend.quit();
        // The daemon must survive its frontend leaving.
        std::thread::sleep(Duration::from_millis(200));
        if let Backend::Ours(daemon) = &mut self.backend {
            if let Some(status) = daemon.child.try_wait()? {
                return Err(format!(
                    "{OURS} died when the frontend left ({status}):\n{}",
                    daemon.log_tail(30)
                )
                .into());
            }
        }
        Ok(())
    }
}

/// Our daemon in namespace `ns`, creating `tap`, all its threads pinned to the backend's CPUs.
fn start_ours(
    run: &BenchRun,
    ns: &Netns,
    tap: &str,
    socket: &std::path::Path,
    pairs: u16,
) -> Result<Daemon> {
    let cpus = run.placement().backend_cpus;
    let [program, rest @ ..] = ns.prefix();
    let mut command = Command::new(program);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // sched_setaffinity, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || pin_to(&cpus));
    }
    command
        .args(rest)
        .arg(&run.ours_bin)
        .arg("--socket-path")
        .arg(socket)
        .args([
            "--tap",
            tap,
            "--queue-pairs",
            &pairs.to_string(),
            "--mac",
            GUEST_MAC_TEXT,
            "--up",
            "--log-level",
            "warn",
        ]);
    // The daemon's log goes in a directory of its own inside the run's.
    let dir = tempfile::Builder::new()
        .prefix("daemon-")
        .tempdir_in(run.dir.path())?;
    Daemon::start_command(command, socket.to_path_buf(), dir)
        .map_err(|e| format!("{OURS}: {e}").into())
}
