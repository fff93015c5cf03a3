//! testpmd, which plays two parts: the frontend of every subject (DPDK's virtio_user) and the
//! peer's backend (DPDK's vhost PMD forwarding to a tap).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_tests::guest::find_program;
use vhost_user_tests::netns::Netns;
use vhost_user_tests::tail;

use super::BenchRun;
use crate::report::Result;

/// `--testpmd`, or `dpdk-testpmd` from PATH (or /usr/local/bin).
pub(super) fn find_testpmd(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.exists().then(|| path.to_path_buf());
    }
    find_program("dpdk-testpmd").or_else(|| {
        let local = Path::new("/usr/local/bin/dpdk-testpmd");
        local.exists().then(|| local.to_path_buf())
    })
}

/// An interactive testpmd driven through its prompt; its output (unbuffered through `stdbuf`)
/// goes to a file that we read back.
pub(super) struct Testpmd {
    pub(super) what: String,
    pub(super) child: Child,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) log: PathBuf,
    /// DPDK's runtime directory of this instance (`--file-prefix`), removed when it quits.
    pub(super) runtime_dir: Option<PathBuf>,
}

impl Testpmd {
    pub(super) fn start(
        what: &str,
        netns: Option<&Netns>,
        bin: &Path,
        eal: &[String],
        app: &[String],
        log: PathBuf,
    ) -> Result<Testpmd> {
        let mut command = match netns {
            Some(ns) => {
                let [program, rest @ ..] = ns.prefix();
                let mut c = Command::new(program);
                c.args(rest).arg("stdbuf");
                c
            }
            None => Command::new("stdbuf"),
        };
        command
            .arg("-o0")
            .arg(bin)
            .args(eal)
            .arg("--")
            .args(app)
            .stdin(Stdio::piped())
            .stdout(File::create(&log)?)
            .stderr(Stdio::from(File::create(log.with_extension("err"))?));
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        let runtime_dir = eal
            .iter()
            .find_map(|a| a.strip_prefix("--file-prefix="))
            .map(|prefix| Path::new("/var/run/dpdk").join(prefix));
        let mut testpmd = Testpmd {
            what: what.to_string(),
            child,
            stdin,
            log,
            runtime_dir,
        };
        testpmd.wait_prompt(0, Duration::from_secs(60))?;
        Ok(testpmd)
    }

    /// The peer's backend: the vhost PMD on `socket` forwarding to `tap` (`--forward-mode=io`),
    /// in namespace `ns`. `unique` names its DPDK runtime directory.
    pub(super) fn start_peer(
        run: &BenchRun,
        ns: &Netns,
        tap: &str,
        socket: &Path,
        pairs: u16,
        tag: &str,
        unique: &str,
    ) -> Result<Testpmd> {
        let mut eal = eal(&format!("vub-net-be-{unique}"));
        eal.extend([
            "--vdev".into(),
            format!("net_vhost0,iface={},queues={pairs}", socket.display()),
            "--vdev".into(),
            format!("net_tap0,iface={tap}"),
        ]);
        eal.extend(run.placement().peer_eal);
        let mut app = app(pairs);
        app.push("--forward-mode=io".into());
        let log = run.dir.path().join(format!("{tag}-backend.log"));
        let testpmd = Testpmd::start(
            "the peer's testpmd (vhost PMD)",
            Some(ns),
            &run.testpmd,
            &eal,
            &app,
            log,
        )?;
        if !socket.exists() {
            return Err("the vhost PMD did not create its socket".into());
        }
        Ok(testpmd)
    }

    /// The frontend of every subject: virtio_user connected to `socket`.
    pub(super) fn start_frontend(
        run: &BenchRun,
        socket: &Path,
        pairs: u16,
        tag: &str,
        unique: &str,
    ) -> Result<Testpmd> {
        let mut eal = eal(&format!("vub-net-fe-{unique}"));
        eal.extend([
            "--vdev".into(),
            format!("net_virtio_user0,path={},queues={pairs}", socket.display()),
        ]);
        eal.extend(run.placement().frontend_eal);
        let app = app(pairs);
        let log = run.dir.path().join(format!("{tag}-frontend.log"));
        Testpmd::start(
            "the frontend testpmd (virtio_user)",
            None,
            &run.testpmd,
            &eal,
            &app,
            log,
        )
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(super) fn died(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}):\n{}\n{}",
                self.what,
                tail(&self.output(), 30),
                tail(
                    &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default(),
                    10
                )
            )),
            _ => None,
        }
    }

    /// Waits until a prompt appears in the output after byte `from`; returns that output.
    fn wait_prompt(&mut self, from: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.output();
            if let Some(new) = text.get(from..) {
                if new.contains("testpmd> ") {
                    return Ok(new.to_string());
                }
            }
            if let Some(why) = self.died() {
                return Err(why.into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no prompt within {timeout:?}:\n{}",
                    self.what,
                    tail(&text, 30)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs one command and returns what it printed.
    pub(super) fn cmd(&mut self, command: &str) -> Result<String> {
        let from = self.output().len();
        let stdin = self.stdin.as_mut().ok_or("testpmd's stdin is closed")?;
        stdin.write_all(command.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        self.wait_prompt(from, Duration::from_secs(30))
    }

    /// Quits and waits for the process (killing it after a while).
    pub(super) fn quit(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\nquit\n");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(dir) = self.runtime_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The EAL arguments both testpmds start with: no hugepages, no PCI, and a DPDK runtime
/// directory named `file_prefix`.
fn eal(file_prefix: &str) -> Vec<String> {
    vec![
        "--no-huge".to_string(),
        "-m".into(),
        "512".into(),
        "--no-pci".into(),
        format!("--file-prefix={file_prefix}"),
    ]
}

/// testpmd's own arguments for both: interactive, one forwarding core, `pairs` queues each way.
fn app(pairs: u16) -> Vec<String> {
    vec![
        "-i".to_string(),
        "--nb-cores=1".into(),
        format!("--rxq={pairs}"),
        format!("--txq={pairs}"),
        "--total-num-mbufs=32768".into(),
    ]
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.quit();
    }
}

/// `RX-packets` summed over the ports in a `show port stats all` output.
pub(super) fn rx_packets(stats: &str) -> Result<u64> {
    let mut total = 0;
    let mut found = false;
    for part in stats.split("RX-packets:").skip(1) {
        let value = part
            .split_whitespace()
            .next()
            .ok_or("empty RX-packets field")?;
        total += value.parse::<u64>()?;
        found = true;
    }
    if !found {
        return Err(format!("no RX-packets in testpmd's output:\n{stats}").into());
    }
    Ok(total)
}

/// From testpmd's `stop` output: TX-dropped / TX-total of port `port`'s forward statistics.
pub(super) fn forward_drop_share(stop_output: &str, port: u32) -> Option<f64> {
    let header = format!("Forward statistics for port {port} ");
    let section = &stop_output[stop_output.find(&header)?..];
    let field = |key: &str| -> Option<u64> {
        section[section.find(key)? + key.len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (dropped, total) = (field("TX-dropped:")?, field("TX-total:")?);
    (total > 0).then(|| dropped as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_drops_are_read_from_the_stop_output() {
        let text = "  ---- Forward statistics for port 0  ----\n  RX-packets: 5 RX-dropped: 0 \
                    RX-total: 5\n  TX-packets: 75 TX-dropped: 25 TX-total: 100\n";
        assert_eq!(forward_drop_share(text, 0), Some(0.25));
        assert_eq!(forward_drop_share(text, 1), None);
    }

    #[test]
    fn rx_packets_are_summed_over_ports() {
        let text = "  RX-packets: 10  RX-missed: 0\n ...\n  RX-packets: 5 RX-missed: 0\n";
        assert_eq!(rx_packets(text).ok(), Some(15));
        assert!(rx_packets("nothing").is_err());
    }
}
