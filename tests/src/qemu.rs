//! Runs a [`Guest`](crate::guest::Guest) in QEMU (TCG) next to the daemons, and reads back what
//! the guest's script reported.
//!
//! - The machine: q35 under TCG, 2 vCPUs, 1 GiB of memfd-backed shared RAM (a vhost-user
//!   backend maps it), no default devices, the serial console written to a file, no reboot.
//! - The guest reports results as lines `E2E key=value` on the serial console;
//!   [`GuestOutput`] collects them.
//! - Every run keeps its evidence in a named directory, `<target>/e2e-logs/<name>/`: the serial
//!   log, QEMU's own output, the daemons' logs and the exact command lines. A failing test
//!   prints the tails of those files ([`Logs::report`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::debroot::DebRoot;
use crate::guest::{find_program, target_dir, Guest};
use crate::Result;

/// The QEMU binary, or an error that says how to get it.
pub fn qemu_binary() -> Result<PathBuf> {
    find_program("qemu-system-x86_64").ok_or_else(|| {
        "qemu-system-x86_64 is not installed: the QEMU end-to-end tests need it. Run .ci/run \
         (it installs qemu-system-x86, ipxe-qemu, seabios, fio, iperf3, busybox-static, cpio), \
         or apt-get install those packages"
            .into()
    })
}

/// The QEMU releases the end-to-end suite runs on: the ones Debian users have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QemuVersion {
    /// Debian 12's own QEMU (`/usr/bin/qemu-system-x86_64`).
    Qemu72,
    /// The newest QEMU in Debian (11.x from Debian 13's trixie-backports), run from a Debian 13
    /// root ([`crate::debroot`]).
    Qemu11,
}

impl QemuVersion {
    pub const ALL: [QemuVersion; 2] = [QemuVersion::Qemu72, QemuVersion::Qemu11];

    /// What `--version` must start with.
    fn banner_prefix(self) -> &'static str {
        match self {
            QemuVersion::Qemu72 => "QEMU emulator version 7.2",
            QemuVersion::Qemu11 => "QEMU emulator version 11.",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            QemuVersion::Qemu72 => "qemu72",
            QemuVersion::Qemu11 => "qemu11",
        }
    }
}

/// One QEMU release, found (or built) and checked, and how its command line is spelled.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub version: QemuVersion,
    /// The first line of `qemu-system-x86_64 --version`.
    pub banner: String,
    root: Option<DebRoot>,
}

impl Qemu {
    /// QEMU `version`, or an error saying why it is not there (a failure, not a skip: every
    /// version of the matrix is meant to run). Built and checked once per process.
    pub fn get(version: QemuVersion) -> Result<Qemu> {
        type Found = Mutex<BTreeMap<&'static str, std::result::Result<Qemu, String>>>;
        static FOUND: OnceLock<Found> = OnceLock::new();
        let found = FOUND.get_or_init(Default::default);
        let mut found = found.lock().unwrap_or_else(|e| e.into_inner());
        found
            .entry(version.label())
            .or_insert_with(|| Qemu::find(version).map_err(|e| e.to_string()))
            .clone()
            .map_err(Into::into)
    }

    fn find(version: QemuVersion) -> Result<Qemu> {
        let mut qemu = Qemu {
            version,
            banner: String::new(),
            root: match version {
                QemuVersion::Qemu72 => {
                    qemu_binary()?;
                    None
                }
                QemuVersion::Qemu11 => Some(DebRoot::get()?),
            },
        };
        let out = crate::netns::output_ok(&mut qemu.command(&["--version".to_string()], &[]))?;
        qemu.banner = out.lines().next().unwrap_or("").trim().to_string();
        if !qemu.banner.starts_with(version.banner_prefix()) {
            return Err(format!(
                "expected {} but `qemu-system-x86_64 --version` says {:?}",
                version.banner_prefix(),
                qemu.banner
            )
            .into());
        }
        Ok(qemu)
    }

    /// The command running QEMU with `args`; `binds` are directories QEMU opens files in
    /// besides /dev, /proc, /sys, /tmp and /var/tmp (mounted at the same paths in the root).
    /// QEMU's PID is the child's.
    pub fn command(&self, args: &[String], binds: &[PathBuf]) -> Command {
        match &self.root {
            None => {
                let mut c = Command::new(qemu_binary().unwrap_or_else(|_| PathBuf::from(QEMU_72)));
                c.args(args);
                c
            }
            Some(root) => root.command("/usr/bin/qemu-system-x86_64", args, binds),
        }
    }

    /// The command line of [`Qemu::command`], for logs and for users to copy.
    pub fn command_line(&self, args: &[String], binds: &[PathBuf]) -> String {
        let c = self.command(args, binds);
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        command_line(&c.get_program().to_string_lossy(), &args)
    }

    /// The `-chardev socket` option that makes QEMU reconnect to a restarted backend after a
    /// second: `reconnect=1` until QEMU 9.1, `reconnect-ms=1000` from 9.2 (11 refuses the
    /// former).
    pub fn reconnect(&self) -> &'static str {
        match self.version {
            QemuVersion::Qemu72 => "reconnect=1",
            QemuVersion::Qemu11 => "reconnect-ms=1000",
        }
    }

    /// Extra `virtio-net-pci` options: QEMU 7.2 under TCG crashes when the guest starts a
    /// vhost-user-net device with MSI-X (`vectors=0`: the guest uses INTx); 11 does not.
    pub fn net_vectors(&self) -> &'static str {
        match self.version {
            QemuVersion::Qemu72 => ",vectors=0",
            QemuVersion::Qemu11 => "",
        }
    }

    /// The generic vhost-user PCI device (the only way to attach vhost-user-console): 7.2 has
    /// none, 8.2-9.x `vhost-user-device-pci`, 10.0 has it but not user-creatable, 10.1+
    /// `vhost-user-test-device-pci`.
    pub fn generic_device(&self) -> Option<&'static str> {
        match self.version {
            QemuVersion::Qemu72 => None,
            QemuVersion::Qemu11 => Some("vhost-user-test-device-pci"),
        }
    }
}

const QEMU_72: &str = "qemu-system-x86_64";

/// Escapes a path for a QEMU option value (a comma is written twice).
pub fn qemu_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// A shell-like rendering of a command line, for logs and for users to copy.
pub fn command_line(program: &str, args: &[String]) -> String {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=./,:+@%".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The evidence directory of one test run: `<target>/e2e-logs/<name>/`, emptied at the start.
pub struct Logs {
    pub dir: PathBuf,
}

impl Logs {
    pub fn new(name: &str) -> Result<Logs> {
        let dir = target_dir().join("e2e-logs").join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Logs { dir })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Appends a line to `commands.txt` (the exact command lines of the run).
    pub fn note_command(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("commands.txt"))
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Notes `daemon`'s command line in `commands.txt`, and copies its log to `<dir>/<name>`
    /// when the returned guard is dropped (declare it after the daemon: it is dropped first,
    /// while the log still exists).
    pub fn keep(&self, daemon: &crate::Daemon, name: &str) -> KeepLog {
        self.note_command(&daemon.command_line);
        KeepLog {
            from: daemon.log.clone(),
            to: self.path(name),
        }
    }

    /// The last lines of every file of the run, for a failure message.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for file in files {
            if file.extension().is_some_and(|x| x == "cpio") {
                continue;
            }
            let text = fs::read(&file).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            let keep = if file.ends_with("serial.log") { 80 } else { 40 };
            out.push_str(&format!(
                "\n----- {} (last {} of {} lines) -----\n",
                file.display(),
                keep.min(lines.len()),
                lines.len()
            ));
            for line in &lines[lines.len().saturating_sub(keep)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str(&format!(
            "\n(all logs of this run: {})\n",
            self.dir.display()
        ));
        out
    }
}

/// See [`Logs::keep`].
pub struct KeepLog {
    from: PathBuf,
    to: PathBuf,
}

impl Drop for KeepLog {
    fn drop(&mut self) {
        let _ = fs::copy(&self.from, &self.to);
    }
}

/// What a guest script reported: every `E2E key=value` line of the serial log, in order.
#[derive(Debug, Default, Clone)]
pub struct GuestOutput {
    pub pairs: Vec<(String, String)>,
}

impl GuestOutput {
    /// Parses a serial log. A kernel message may share a line with the report, so the report
    /// is looked for anywhere in the line; the value is the rest of the line.
    pub fn parse(serial: &str) -> GuestOutput {
        let mut pairs = Vec::new();
        for line in serial.lines() {
            let Some(at) = line.find("E2E ") else {
                continue;
            };
            let rest = line[at + 4..].trim_end_matches('\r');
            if let Some((key, value)) = rest.split_once('=') {
                if !key.is_empty() && !key.contains(' ') {
                    pairs.push((key.to_string(), value.trim().to_string()));
                }
            }
        }
        GuestOutput { pairs }
    }

    /// The last value reported for `key`.
    pub fn get(&self, key: &str) -> Result<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("the guest did not report {key}").into())
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let value = self.get(key)?;
        value
            .parse()
            .map_err(|_| format!("guest reported {key}={value:?}, not a number").into())
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let value = self.get(key)?;
        value
            .parse()
            .map_err(|_| format!("guest reported {key}={value:?}, not a number").into())
    }

    /// Every key starting with `prefix`, with its last value.
    pub fn with_prefix(&self, prefix: &str) -> BTreeMap<String, String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// One guest's QEMU process. Killed (by PID) when dropped.
pub struct Vm {
    child: Child,
    /// Holds the run's initramfs (the guest plus its script) while QEMU runs.
    _initrd_dir: tempfile::TempDir,
    pub serial: PathBuf,
    pub command: String,
    started: Instant,
}

/// How a VM is set up besides the guest itself.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The QEMU that runs it (and spells the options).
    pub qemu: Qemu,
    /// Let a guest reboot (`reboot -f` restarts it) instead of QEMU exiting (`-no-reboot`).
    pub allow_reboot: bool,
    /// The shell script the guest runs (as `/e2e/test.sh`).
    pub script: String,
    /// Device arguments (`-chardev ... -device ...`).
    pub devices: Vec<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Keep the run's initramfs as `<logs>/initrd.cpio` (so the printed QEMU command line
    /// still works after the run) instead of in a temporary directory.
    pub keep_initrd: bool,
    /// Names this VM's files in the logs (`serial.NAME.log`, `qemu.NAME.log`) when a test runs
    /// two (the source and the destination of a migration).
    pub name: Option<String>,
    /// A QMP server on this UNIX socket (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// Start paused, waiting for a migration on this URI (`-incoming tcp:127.0.0.1:PORT`).
    pub incoming: Option<String>,
}

impl VmConfig {
    pub fn new(qemu: &Qemu, script: impl Into<String>) -> VmConfig {
        VmConfig {
            qemu: qemu.clone(),
            allow_reboot: false,
            script: script.into(),
            devices: Vec::new(),
            cpus: 2,
            memory_mib: 1024,
            keep_initrd: false,
            name: None,
            qmp: None,
            incoming: None,
        }
    }

    /// The destination of a migration of this VM: the same machine and guest, named `name`,
    /// with QMP on `qmp`, waiting on `incoming`, and no devices yet (add the same ones, on the
    /// destination's own backends).
    pub fn migration_target(&self, name: &str, qmp: &Path, incoming: &str) -> VmConfig {
        VmConfig {
            devices: Vec::new(),
            name: Some(name.to_string()),
            qmp: Some(qmp.to_path_buf()),
            incoming: Some(incoming.to_string()),
            ..self.clone()
        }
    }

    /// A vhost-user-blk disk on `socket` with `queues` queues.
    pub fn blk(mut self, socket: &Path, queues: u16, reconnect: bool) -> VmConfig {
        let reconnect = if reconnect {
            format!(",{}", self.qemu.reconnect())
        } else {
            String::new()
        };
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id=blk0,path={}{reconnect}", qemu_path(socket)),
            "-device".into(),
            format!("vhost-user-blk-pci,chardev=blk0,num-queues={queues}"),
        ]);
        self
    }

    /// A vhost-user virtio-net device on `socket` with `pairs` queue pairs (with `vectors=0` on
    /// QEMU 7.2, see [`Qemu::net_vectors`]). `romfile=`: no iPXE option ROM (saves seconds of
    /// boot).
    pub fn net(mut self, socket: &Path, pairs: u16, mac: &str) -> VmConfig {
        let mq = if pairs > 1 { ",mq=on" } else { "" };
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id=net0,path={}", qemu_path(socket)),
            "-netdev".into(),
            format!("vhost-user,id=n0,chardev=net0,queues={pairs}"),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=n0{mq}{},mac={mac},romfile=",
                self.qemu.net_vectors()
            ),
        ]);
        self
    }

    /// vhost-user-console on `socket` with `ports` ports (the console plus named ones) through
    /// QEMU's generic vhost-user device: virtio id 3, rx/tx per port plus the two control
    /// queues, and the 12-byte config space (cols, rows, max_nr_ports, emerg_wr).
    pub fn console(mut self, socket: &Path, ports: u16, reconnect: bool) -> Result<VmConfig> {
        let device = self.qemu.generic_device().ok_or_else(|| {
            format!(
                "{} has no generic vhost-user device: it cannot attach vhost-user-console",
                self.qemu.banner
            )
        })?;
        let reconnect = if reconnect {
            format!(",{}", self.qemu.reconnect())
        } else {
            String::new()
        };
        let queues = 2 * (u32::from(ports) + 1);
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id=con0,path={}{reconnect}", qemu_path(socket)),
            "-device".into(),
            format!("{device},chardev=con0,virtio-id=3,num_vqs={queues},config_size=12"),
        ]);
        Ok(self)
    }
}

impl Vm {
    /// Boots `guest` with `config`; the serial console goes to `<logs>/serial.log`, QEMU's own
    /// output to `<logs>/qemu.log`.
    pub fn start(guest: &Guest, config: &VmConfig, logs: &Logs) -> Result<Vm> {
        let initrd_dir = tempfile::tempdir()?;
        let initrd = if config.keep_initrd {
            logs.path("initrd.cpio")
        } else {
            initrd_dir.path().join("initrd.cpio")
        };
        guest.initrd_with_script(&config.script, &initrd)?;
        fs::write(logs.path("test.sh"), &config.script)?;
        let file_name = |stem: &str| match &config.name {
            Some(name) => format!("{stem}.{name}.log"),
            None => format!("{stem}.log"),
        };
        let serial = logs.path(&file_name("serial"));
        let mem = format!("{}M", config.memory_mib);
        let mut args: Vec<String> = vec![
            "-machine".into(),
            "q35,accel=tcg".into(),
            "-smp".into(),
            config.cpus.to_string(),
            "-m".into(),
            mem.clone(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-nodefaults".into(),
            "-nographic".into(),
            "-monitor".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", qemu_path(&serial)),
            "-kernel".into(),
            guest.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            initrd.to_string_lossy().into_owned(),
            "-append".into(),
            "console=ttyS0 panic=-1 loglevel=4 edd=off".into(),
        ];
        if !config.allow_reboot {
            args.push("-no-reboot".into());
        }
        if let Some(qmp) = &config.qmp {
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", qemu_path(qmp)));
        }
        if let Some(uri) = &config.incoming {
            args.push("-incoming".into());
            args.push(uri.clone());
        }
        args.extend(config.devices.iter().cloned());
        // Where QEMU opens files besides /tmp: the kernel's and the logs' directories.
        let mut binds: Vec<PathBuf> = [guest.kernel.parent(), initrd.parent(), Some(&logs.dir)]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf)
            .collect();
        binds.sort();
        binds.dedup();
        let command = config.qemu.command_line(&args, &binds);
        logs.note_command(&format!("# {}\n{command}", config.qemu.banner));
        let log = File::create(logs.path(&file_name("qemu")))?;
        let child = config
            .qemu
            .command(&args, &binds)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", config.qemu.banner))?;
        Ok(Vm {
            child,
            _initrd_dir: initrd_dir,
            serial,
            command,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial log so far.
    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits until the guest reports `key` (returns its value). Fails if QEMU exits first or
    /// `timeout` passes.
    pub fn wait_for(&mut self, key: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(value) = GuestOutput::parse(&self.serial_text()).get(key) {
                return Ok(value.to_string());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(
                    format!("QEMU exited ({status}) before the guest reported {key}").into(),
                );
            }
            if Instant::now() > deadline {
                return Err(format!("the guest did not report {key} within {timeout:?}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest has reported `key` `n` times (1 = the first), e.g. once per boot,
    /// and returns the `n`th value.
    pub fn wait_for_nth(&mut self, key: &str, n: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = GuestOutput::parse(&self.serial_text());
            if let Some((_, value)) = out.pairs.iter().filter(|(k, _)| k == key).nth(n - 1) {
                return Ok(value.clone());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "QEMU exited ({status}) before the guest reported {key} (#{n})"
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(
                    format!("the guest did not report {key} (#{n}) within {timeout:?}").into(),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit (the guest powers off at the end of its script), killing it after
    /// `timeout`; `interrupted` is polled too (Ctrl-C in the demo). Returns what the guest
    /// reported, or an error if it did not finish its script.
    pub fn finish(
        &mut self,
        timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<GuestOutput> {
        let deadline = self.started + timeout;
        let status: ExitStatus = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if interrupted() {
                self.kill();
                return Err("interrupted".into());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "QEMU still running after {timeout:?}: killed (pid {}); the guest hung or is too slow",
                    self.child.id()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let output = GuestOutput::parse(&self.serial_text());
        if output.get("done").is_err() {
            return Err(format!(
                "QEMU exited ({status}) before the guest finished its script (no `E2E done=1`)"
            )
            .into());
        }
        Ok(output)
    }

    /// Seconds since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill(); // SIGKILL to this PID only
            let _ = self.child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Guest shell lines for a verified fio job: random 4 KiB O_DIRECT writes over `size` bytes of
/// /dev/vda with crc32c, read back and checked, with `engine` (fio's engine options). Reports
/// `fio` (terse v3, for [`FioTerse::verified_job`]) and `fio_rc`. With `running_after` =
/// `Some(n)`, the job runs in the background and `io_running` is reported once the disk has
/// completed `n` writes (or the job ended): what a test waits for before it disturbs the
/// daemon under the job.
pub fn fio_verify_script(job: &str, engine: &str, size: u64, running_after: Option<u64>) -> String {
    let fio = format!(
        "fio --name={job} --filename=/dev/vda {engine} --direct=1 --rw=randwrite --bs=4k \
         --size={size} --verify=crc32c --do_verify=1 --output-format=terse --terse-version=3 \
         > /tmp/fio.out 2> /tmp/fio.err"
    );
    let run = match running_after {
        None => format!("{fio}\n"),
        Some(writes) => format!(
            r#"{fio} &
FIO=$!
n=0
while [ "$(awk '{{print $5}}' /sys/block/vda/stat)" -lt {writes} ] && kill -0 $FIO 2>/dev/null && [ $n -lt 600 ]; do
    sleep 0.1; n=$((n + 1))
done
echo "E2E io_running=$(awk '{{print $5}}' /sys/block/vda/stat)"
wait $FIO
"#
        ),
    };
    format!(
        r#"{run}echo "E2E fio_rc=$?"
echo "E2E fio=$(grep '^3;' /tmp/fio.out)"
cat /tmp/fio.err
"#
    )
}

/// One line of `fio --output-format=terse --terse-version=3`.
#[derive(Debug, Clone)]
pub struct FioTerse {
    fields: Vec<String>,
}

impl FioTerse {
    /// The job a guest script reported as `fio` (with its exit code as `fio_rc`), checked to
    /// have exited cleanly, without an error (verification failures included), having written
    /// and verified `bytes` each.
    pub fn verified_job(out: &GuestOutput, bytes: u64) -> Result<FioTerse> {
        let fio = FioTerse::parse(out.get("fio")?)?;
        ensure(out.get_u64("fio_rc")? == 0 && fio.error() == 0, || {
            format!(
                "fio failed: rc {:?}, error {}",
                out.get("fio_rc"),
                fio.error()
            )
        })?;
        ensure(
            fio.write_kib() == bytes / 1024 && fio.read_kib() == bytes / 1024,
            || {
                format!(
                    "fio wrote {} KiB and verified {} KiB, expected {} each",
                    fio.write_kib(),
                    fio.read_kib(),
                    bytes / 1024
                )
            },
        )?;
        Ok(fio)
    }

    pub fn parse(line: &str) -> Result<FioTerse> {
        let fields: Vec<String> = line.trim().split(';').map(str::to_string).collect();
        if fields.len() < 90 || fields[0] != "3" {
            return Err(format!("not a fio terse v3 line: {line:?}").into());
        }
        Ok(FioTerse { fields })
    }

    /// 1-based field, as fio's documentation numbers them.
    fn field(&self, n: usize) -> f64 {
        self.fields
            .get(n - 1)
            .and_then(|f| f.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// fio's error code for the job (0: none, verify failures included).
    pub fn error(&self) -> u64 {
        self.field(5) as u64
    }
    pub fn read_kib(&self) -> u64 {
        self.field(6) as u64
    }
    pub fn read_bw_kib_s(&self) -> f64 {
        self.field(7)
    }
    pub fn read_iops(&self) -> f64 {
        self.field(8)
    }
    /// Largest completion latency of a read, in µs.
    pub fn read_clat_max_us(&self) -> f64 {
        self.field(15)
    }
    pub fn write_kib(&self) -> u64 {
        self.field(47) as u64
    }
    pub fn write_bw_kib_s(&self) -> f64 {
        self.field(48)
    }
    pub fn write_iops(&self) -> f64 {
        self.field(49)
    }
    /// Largest completion latency of a write, in µs.
    pub fn write_clat_max_us(&self) -> f64 {
        self.field(56)
    }
}

/// Fails with `what` unless `ok`.
pub fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms of the script are valid shell (`sh -n`), with the fio options in one
    /// command and `io_running` only in the background form.
    #[test]
    fn fio_verify_script_is_valid_shell() {
        for running_after in [None, Some(500)] {
            let script = fio_verify_script("job", "--ioengine=psync", 4096, running_after);
            let status = Command::new("sh")
                .args(["-n", "-c", &script])
                .status()
                .expect("sh");
            assert!(status.success(), "{script}");
            assert!(script.contains(
                "fio --name=job --filename=/dev/vda --ioengine=psync --direct=1 --rw=randwrite \
                 --bs=4k --size=4096 --verify=crc32c"
            ));
            assert_eq!(script.contains("E2E io_running="), running_after.is_some());
        }
    }
}
