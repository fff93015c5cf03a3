//! A throwaway Ceph cluster for the RBD tests and benchmarks: one monitor and one OSD on the
//! in-memory `memstore` objectstore, pool size 1, listening on 127.0.0.1 only, with its own
//! configuration, keyring and directories (every command gets `-c CONF`). Started from
//! Debian's `ceph-mon`, `ceph-osd` and `ceph-common` in a few seconds; both daemons run in the
//! foreground as our children and are killed when the [`Cluster`] is dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::Result;

/// The pool every cluster has.
pub const POOL: &str = "rbd";

/// Whether Ceph's daemons are installed (the RBD tests need them).
pub fn installed() -> bool {
    [
        "ceph-mon",
        "ceph-osd",
        "ceph",
        "rbd",
        "ceph-authtool",
        "monmaptool",
    ]
    .iter()
    .all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// At most this many clusters run at once in one test process: each is a monitor, an OSD and
/// a client daemon, and more than two on two cores make requests time out.
const MAX_RUNNING: usize = 2;
static RUNNING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// A place among the [`MAX_RUNNING`] clusters, given back on drop.
struct Slot;

impl Slot {
    fn take() -> Slot {
        let (count, freed) = &RUNNING;
        let mut count = count.lock().unwrap_or_else(|e| e.into_inner());
        while *count >= MAX_RUNNING {
            count = freed.wait(count).unwrap_or_else(|e| e.into_inner());
        }
        *count += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (count, freed) = &RUNNING;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        freed.notify_one();
    }
}

/// A running one-monitor, one-OSD cluster.
pub struct Cluster {
    _slot: Slot,
    dir: tempfile::TempDir,
    conf: PathBuf,
    keyring: PathBuf,
    mon_addr: String,
    mon: Option<Child>,
    osd: Option<Child>,
}

fn run(command: &mut Command, what: &str) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn uuid() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_string())
}

impl Cluster {
    /// Starts the cluster and creates pool [`POOL`]; ready for `rbd create`.
    pub fn start() -> Result<Cluster> {
        let slot = Slot::take();
        let dir = tempfile::Builder::new().prefix("ceph-test").tempdir()?;
        let d = dir.path();
        for sub in ["run", "mon", "osd"] {
            std::fs::create_dir(d.join(sub))?;
        }
        let fsid = uuid()?;
        let mon_addr = format!("127.0.0.1:{}", free_port()?);
        let conf = d.join("ceph.conf");
        let keyring = d.join("keyring");
        let dirs = d.display();
        // paxos propose interval 0.1: the cluster is ready in about a second (7 s at the
        // default); the data-avail thresholds keep a full /tmp from stopping the monitor.
        std::fs::write(
            &conf,
            format!(
                "[global]\n\
                 fsid = {fsid}\n\
                 mon host = v2:{mon_addr}\n\
                 public addr = 127.0.0.1\n\
                 auth allow insecure global id reclaim = false\n\
                 keyring = {dirs}/keyring\n\
                 run dir = {dirs}/run\n\
                 log file = {dirs}/$name.log\n\
                 admin socket = {dirs}/run/$name.asok\n\
                 osd objectstore = memstore\n\
                 memstore device bytes = 1073741824\n\
                 osd pool default size = 1\n\
                 osd pool default min size = 1\n\
                 mon allow pool size one = true\n\
                 osd crush chooseleaf type = 0\n\
                 paxos propose interval = 0.1\n\
                 mon data avail warn = 1\n\
                 mon data avail crit = 0\n\
                 osd data = {dirs}/osd\n\
                 mon data = {dirs}/mon\n\
                 # A stopped OSD saves its memstore and finds it again when restarted.\n\
                 osd fast shutdown = false\n\
                 [client]\n\
                 log file = /dev/null\n\
                 admin socket =\n"
            ),
        )?;
        let c = conf.to_string_lossy().into_owned();
        let k = keyring.to_string_lossy().into_owned();
        for (entity, caps) in [
            ("mon.", vec!["--cap", "mon", "allow *"]),
            (
                "client.admin",
                vec!["--cap", "mon", "allow *", "--cap", "osd", "allow *"],
            ),
            (
                "osd.0",
                vec![
                    "--cap",
                    "mon",
                    "allow profile osd",
                    "--cap",
                    "osd",
                    "allow *",
                ],
            ),
        ] {
            let mut command = Command::new("ceph-authtool");
            command.arg(&k);
            if entity == "mon." {
                command.arg("--create-keyring");
            }
            command.args(["--gen-key", "-n", entity]).args(caps);
            run(&mut command, "ceph-authtool")?;
        }
        let monmap = d.join("monmap");
        run(
            Command::new("monmaptool")
                .args(["--create", "--fsid", &fsid, "--addv", "a"])
                .arg(format!("[v2:{mon_addr}]"))
                .arg(&monmap),
            "monmaptool",
        )?;
        run(
            Command::new("ceph-mon")
                .args(["-c", &c, "--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap)
                .args(["--keyring", &k]),
            "ceph-mon --mkfs",
        )?;
        let mut cluster = Cluster {
            _slot: slot,
            mon: None,
            osd: None,
            conf,
            keyring,
            mon_addr,
            dir,
        };
        cluster.mon = Some(cluster.spawn("ceph-mon", &["-i", "a"])?);
        let osd_uuid = uuid()?;
        cluster.ceph(&["osd", "new", &osd_uuid, "0"])?;
        run(
            Command::new("ceph-osd").args(["-c", &c, "-i", "0", "--mkfs", "--osd-uuid", &osd_uuid]),
            "ceph-osd --mkfs",
        )?;
        cluster.start_osd()?;
        cluster.ceph(&["osd", "pool", "create", POOL, "8"])?;
        cluster.ceph(&["osd", "pool", "application", "enable", POOL, "rbd"])?;
        Ok(cluster)
    }

    /// A daemon in the foreground (ours to kill), its output in its own log.
    fn spawn(&self, program: &str, args: &[&str]) -> Result<Child> {
        let log = File::create(self.dir.path().join(format!("{program}.out")))?;
        let mut command = Command::new(program);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                // Killed with the thread that started it, should the test process die before
                // it drops the cluster (Drop kills it otherwise).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Ok(command
            .arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?)
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The keyring with `client.admin`'s key (and the daemons').
    pub fn keyring(&self) -> &Path {
        &self.keyring
    }

    /// The monitor's `IP:PORT`.
    pub fn mon_addr(&self) -> &str {
        &self.mon_addr
    }

    /// The cluster's own directory (for the caller's scratch files too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ceph -c CONF ARGS...`; stdout.
    pub fn ceph(&self, args: &[&str]) -> Result<String> {
        run(
            Command::new("ceph")
                .arg("-c")
                .arg(&self.conf)
                .args(["--connect-timeout", "20"])
                .args(args),
            &format!("ceph {}", args.join(" ")),
        )
    }

    /// `rbd -c CONF ARGS...`; stdout.
    pub fn rbd(&self, args: &[&str]) -> Result<String> {
        run(
            Command::new("rbd").arg("-c").arg(&self.conf).args(args),
            &format!("rbd {}", args.join(" ")),
        )
    }

    /// Creates `POOL/name` of `size` bytes; returns its `pool/name`.
    pub fn create_image(&self, name: &str, size: u64) -> Result<String> {
        let spec = format!("{POOL}/{name}");
        self.rbd(&["create", "--size", &format!("{}K", size >> 10), &spec])?;
        Ok(spec)
    }

    /// The image's bytes, by `rbd export`.
    pub fn export(&self, spec: &str) -> Result<Vec<u8>> {
        let out = self
            .dir
            .path()
            .join(format!("export-{}", spec.replace(['/', '@'], "_")));
        let _ = std::fs::remove_file(&out);
        self.rbd(&["export", "--no-progress", spec, &out.to_string_lossy()])?;
        let data = std::fs::read(&out)?;
        std::fs::remove_file(&out)?;
        Ok(data)
    }

    /// `rbd import` of `data` as a new image `POOL/name`.
    pub fn import(&self, name: &str, data: &[u8]) -> Result<String> {
        let file = self.dir.path().join(format!("import-{name}"));
        std::fs::write(&file, data)?;
        let spec = format!("{POOL}/{name}");
        self.rbd(&["import", "--no-progress", &file.to_string_lossy(), &spec])?;
        std::fs::remove_file(&file)?;
        Ok(spec)
    }

    /// Starts the OSD (again) and waits until the monitor says it is up.
    pub fn start_osd(&mut self) -> Result<()> {
        self.osd = Some(self.spawn("ceph-osd", &["-i", "0"])?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stat = self.ceph(&["osd", "stat", "-f", "json"])?;
            if stat.contains("\"num_up_osds\":1") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the OSD did not come up: {stat}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the OSD (SIGTERM: memstore saves its objects, found again by [`Cluster::start_osd`])
    /// and waits for it to exit.
    pub fn stop_osd(&mut self) -> Result<()> {
        if let Some(mut osd) = self.osd.take() {
            let pid = nix::unistd::Pid::from_raw(osd.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
            osd.wait()?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL: nothing to save, and the fastest way out.
        for child in [self.osd.take(), self.mon.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("VHOST_TEST_LOG").is_some() {
            for log in ["mon.a.log", "osd.0.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                eprintln!("--- ceph {log} ---\n{}", crate::tail(&text, 30));
            }
        }
    }
}
