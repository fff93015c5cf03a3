//! `--seccomp kill|log|none`: a per-daemon allowlist of system calls (built with rust-vmm's
//! `seccompiler`), installed on every thread of the process once the daemon is set up and
//! before it serves.
//!
//! The lists are a common base (memory, threads, epoll, eventfds, the vhost-user socket,
//! logging, exit) plus what each device does while serving; `ioctl` is allowed only for the
//! request numbers listed, `prctl` only for naming threads, `tgkill` only towards this process.
//! They were found by running every test, the QEMU suite and the benchmarks with `--seccomp
//! log` and reading the kernel log (`dmesg`: "audit: type=1326 ... syscall=N").

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What happens to a system call outside the allowlist (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// The process is killed (SIGSYS).
    #[default]
    Kill,
    /// The call is allowed and logged by the kernel (dmesg / audit): for finding a missing
    /// entry.
    Log,
    /// No filter.
    None,
}

/// Which daemon's allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Blk,
    /// vhost-user-blk serving a Ceph RBD image: librados's threads and sockets too.
    BlkRbd,
    Net,
    Console,
}

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: cannot build the filter: {0}")]
    Build(seccompiler::BackendError),
    #[error(
        "seccomp: cannot install the filter: {0} (pass --seccomp none on kernels without seccomp)"
    )]
    Install(seccompiler::Error),
    #[error("seccomp: unsupported architecture: {0}")]
    Arch(seccompiler::BackendError),
}

/// One allowlist entry: a system call, allowed always or only for some argument values.
enum Allow {
    Any(i64),
    /// Allowed when argument `arg` (32-bit compare) is one of `values`.
    ArgIn(i64, u8, Vec<u64>),
    /// Allowed when every `(arg, value)` pair matches (32-bit compares).
    ArgsAll(i64, Vec<(u8, u64)>),
}

use Allow::{Any, ArgIn, ArgsAll};

/// The system calls every daemon makes while serving.
fn base() -> Vec<Allow> {
    let mut list = vec![
        // Memory: guest RAM regions (mmap of the frontend's memfds), allocator, thread stacks.
        Any(libc::SYS_brk),
        Any(libc::SYS_mmap),
        Any(libc::SYS_munmap),
        Any(libc::SYS_mprotect),
        Any(libc::SYS_mremap),
        Any(libc::SYS_madvise),
        // Descriptors: the vhost-user socket, eventfds, the device's own fds, stderr.
        Any(libc::SYS_read),
        Any(libc::SYS_write),
        Any(libc::SYS_readv),
        Any(libc::SYS_writev),
        Any(libc::SYS_pread64),
        Any(libc::SYS_pwrite64),
        Any(libc::SYS_close),
        Any(libc::SYS_dup),
        Any(libc::SYS_dup3),
        Any(libc::SYS_fcntl),
        Any(libc::SYS_fstat),
        Any(libc::SYS_newfstatat),
        // The SIGBUS guard asks whether guest memory is on hugetlbfs (its page size).
        Any(libc::SYS_fstatfs),
        Any(libc::SYS_statx),
        Any(libc::SYS_lseek),
        // The sandbox's root is empty: an open finds nothing there; std's
        // available_parallelism() tries /proc and /sys (and falls back) on every blk connection.
        Any(libc::SYS_openat),
        Any(libc::SYS_eventfd2),
        Any(libc::SYS_epoll_create1),
        Any(libc::SYS_epoll_ctl),
        Any(libc::SYS_epoll_pwait),
        Any(libc::SYS_epoll_pwait2),
        Any(libc::SYS_ppoll),
        // The vhost-user socket: accept, messages with fds (SCM_RIGHTS), readiness.
        Any(libc::SYS_accept4),
        Any(libc::SYS_recvmsg),
        Any(libc::SYS_sendmsg),
        Any(libc::SYS_recvfrom),
        Any(libc::SYS_sendto),
        Any(libc::SYS_shutdown),
        Any(libc::SYS_getsockopt),
        Any(libc::SYS_getsockname),
        Any(libc::SYS_getpeername),
        // Threads: one per queue (or queue pair), started per connection, joined at disconnect.
        Any(libc::SYS_clone),
        Any(libc::SYS_clone3),
        Any(libc::SYS_set_robust_list),
        Any(libc::SYS_rseq),
        Any(libc::SYS_futex),
        Any(libc::SYS_sched_yield),
        Any(libc::SYS_sched_getaffinity),
        Any(libc::SYS_getpid),
        Any(libc::SYS_gettid),
        Any(libc::SYS_getrandom),
        Any(libc::SYS_nanosleep),
        Any(libc::SYS_clock_nanosleep),
        Any(libc::SYS_clock_gettime),
        Any(libc::SYS_gettimeofday),
        ArgIn(libc::SYS_prctl, 0, vec![libc::PR_SET_NAME as u64]),
        // Signals: SIGTERM/SIGINT handling, Rust's stack-overflow guard, abort.
        Any(libc::SYS_rt_sigaction),
        Any(libc::SYS_rt_sigprocmask),
        Any(libc::SYS_rt_sigreturn),
        Any(libc::SYS_sigaltstack),
        Any(libc::SYS_restart_syscall),
        ArgIn(libc::SYS_tgkill, 0, vec![std::process::id().into()]),
        // Exit: the socket file and pty links are removed, then the process exits.
        Any(libc::SYS_unlinkat),
        Any(libc::SYS_exit),
        Any(libc::SYS_exit_group),
        ArgIn(
            libc::SYS_ioctl,
            1,
            vec![libc::FIONBIO, libc::FIOCLEX, libc::TCGETS],
        ),
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        Any(libc::SYS_poll),
        Any(libc::SYS_epoll_wait),
        Any(libc::SYS_unlink),
        Any(libc::SYS_stat),
        Any(libc::SYS_lstat),
        Any(libc::SYS_open),
    ]);
    list
}

fn blk() -> Vec<Allow> {
    vec![
        Any(libc::SYS_io_uring_setup),
        Any(libc::SYS_io_uring_enter),
        Any(libc::SYS_io_uring_register),
        Any(libc::SYS_preadv),
        Any(libc::SYS_pwritev),
        Any(libc::SYS_preadv2),
        Any(libc::SYS_pwritev2),
        Any(libc::SYS_fsync),
        Any(libc::SYS_fdatasync),
        Any(libc::SYS_fallocate),
        // Inflight tracking: GET_INFLIGHT_FD creates and sizes the shared buffer.
        Any(libc::SYS_memfd_create),
        Any(libc::SYS_ftruncate),
        ArgIn(
            libc::SYS_ioctl,
            1,
            vec![BLKGETSIZE64, BLKSSZGET, BLKDISCARD, BLKZEROOUT],
        ),
    ]
}

/// librados / librbd while serving: its messenger's TCP connections to monitors and OSDs
/// (made again after a daemon restarts), its worker threads and timers.
fn rbd() -> Vec<Allow> {
    vec![
        // A new connection for each OSD (and monitor) met, again when one restarts.
        ArgIn(
            libc::SYS_socket,
            0,
            vec![libc::AF_INET as u64, libc::AF_INET6 as u64],
        ),
        Any(libc::SYS_connect),
        Any(libc::SYS_setsockopt),
        // The messenger names its host in each new session.
        Any(libc::SYS_uname),
        // librbd's timers (asio): retrying the exclusive lock held by a daemon that died.
        Any(libc::SYS_timerfd_create),
        Any(libc::SYS_timerfd_settime),
        Any(libc::SYS_timerfd_gettime),
    ]
}

fn net() -> Vec<Allow> {
    vec![
        ArgIn(
            libc::SYS_ioctl,
            1,
            vec![
                libc::TUNSETQUEUE,
                libc::TUNSETOFFLOAD,
                libc::TUNSETVNETHDRSZ,
                libc::TUNGETIFF,
            ],
        ),
        // Transmit batches: the tap queues' rings are set up (restricted to WRITEV) before
        // the filter; serving only submits to them.
        Any(libc::SYS_io_uring_enter),
    ]
}

fn console() -> Vec<Allow> {
    vec![
        // TCP endpoints: TCP_NODELAY on each accepted client.
        ArgsAll(
            libc::SYS_setsockopt,
            vec![(1, libc::IPPROTO_TCP as u64), (2, libc::TCP_NODELAY as u64)],
        ),
        Any(libc::SYS_fsync),
        Any(libc::SYS_fdatasync),
        ArgIn(
            libc::SYS_ioctl,
            1,
            vec![
                libc::TIOCGWINSZ,
                libc::TIOCSWINSZ,
                libc::TCSETS,
                libc::TCSETSW,
                libc::TIOCGPTN,
                libc::TIOCSPTLCK,
            ],
        ),
    ]
}

// linux/fs.h (the `libc` crate does not export them for every target).
const BLKSSZGET: u64 = 0x1268;
const BLKDISCARD: u64 = 0x1277;
const BLKGETSIZE64: u64 = 0x8008_1272;
const BLKZEROOUT: u64 = 0x127f;

/// Adds "all of `pairs` match" as one more way to allow `nr` (unless `nr` is allowed outright).
fn add_rule(
    rules: &mut BTreeMap<i64, Option<Vec<SeccompRule>>>,
    nr: i64,
    pairs: &[(u8, u64)],
) -> Result<(), SeccompError> {
    let Some(list) = rules.entry(nr).or_insert_with(|| Some(Vec::new())) else {
        return Ok(());
    };
    let conditions = pairs
        .iter()
        .map(|&(arg, value)| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SeccompError::Build)?;
    list.push(SeccompRule::new(conditions).map_err(SeccompError::Build)?);
    Ok(())
}

impl Profile {
    fn allowlist(self) -> Vec<Allow> {
        let mut list = base();
        list.extend(match self {
            Profile::Blk => blk(),
            Profile::BlkRbd => blk().into_iter().chain(rbd()).collect(),
            Profile::Net => net(),
            Profile::Console => console(),
        });
        list
    }

    /// The system call numbers this profile allows (all or some argument values), sorted.
    pub fn syscalls(self) -> Vec<i64> {
        let mut numbers: Vec<i64> = self
            .allowlist()
            .iter()
            .map(|allow| match allow {
                Any(nr) | ArgIn(nr, ..) | ArgsAll(nr, _) => *nr,
            })
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        numbers
    }

    /// Compiles the filter: allowlisted calls pass, others get `mode`'s action.
    pub fn compile(self, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
        let mismatch = match mode {
            SeccompMode::None => return Ok(None),
            SeccompMode::Kill => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
        };
        // Merge entries per call: `Any` wins over argument rules (an empty rule list allows
        // the call whatever its arguments).
        let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        for allow in self.allowlist() {
            match allow {
                Any(nr) => {
                    rules.insert(nr, None);
                }
                ArgIn(nr, arg, values) => {
                    for value in values {
                        add_rule(&mut rules, nr, &[(arg, value)])?;
                    }
                }
                ArgsAll(nr, pairs) => add_rule(&mut rules, nr, &pairs)?,
            }
        }
        let rules = rules
            .into_iter()
            .map(|(nr, list)| (nr, list.unwrap_or_default()))
            .collect();
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SeccompError::Arch)?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
            .map_err(SeccompError::Build)?;
        BpfProgram::try_from(filter)
            .map(Some)
            .map_err(SeccompError::Build)
    }

    /// Installs the filter on every thread of the process (TSYNC), so threads started before
    /// (the signal thread, blk's copy pool) are covered as well as those started later, which
    /// inherit it. Also sets `PR_SET_NO_NEW_PRIVS`.
    pub fn install(self, mode: SeccompMode) -> Result<(), SeccompError> {
        let Some(program) = self.compile(mode)? else {
            return Ok(());
        };
        seccompiler::apply_filter_all_threads(&program).map_err(SeccompError::Install)?;
        log::info!(
            "seccomp: {} system calls allowed, others {}",
            self.syscalls().len(),
            if mode == SeccompMode::Kill {
                "kill the process"
            } else {
                "are logged"
            }
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child with `profile`'s filter in `mode` installed and returns
    /// how the child ended.
    fn in_child(
        profile: Profile,
        mode: SeccompMode,
        body: fn() -> i32,
    ) -> nix::sys::wait::WaitStatus {
        use nix::unistd::{fork, ForkResult};
        let program = match profile.compile(mode) {
            Ok(Some(program)) => program,
            other => panic!("filter: {other:?}"),
        };
        // SAFETY: the child only calls async-signal-safe functions (prctl/seccomp via the
        // precompiled program, raw syscalls, _exit) before it exits.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let code = match seccompiler::apply_filter(&program) {
                    Ok(()) => body(),
                    Err(_) => 100,
                };
                // SAFETY: _exit ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => {
                nix::sys::wait::waitpid(child, None).unwrap_or_else(|e| panic!("waitpid: {e}"))
            }
            Err(e) => panic!("fork: {e}"),
        }
    }

    fn ptrace_traceme() -> i32 {
        // SAFETY: PTRACE_TRACEME takes no pointers.
        let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        if rc == 0 {
            7
        } else {
            8
        }
    }

    fn mount_proc() -> i32 {
        // SAFETY: all pointers are valid NUL-terminated strings or null.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/nonexistent".as_ptr(),
                c"proc".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            7
        } else {
            8
        }
    }

    fn allowed_calls() -> i32 {
        // A few calls every daemon makes: they must pass.
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK);
        match fd {
            Ok(fd) => match fd.write(1) {
                Ok(()) => 0,
                Err(_) => 3,
            },
            Err(_) => 2,
        }
    }

    #[test]
    fn forbidden_calls_kill_with_sigsys() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::WaitStatus;
        for profile in [
            Profile::Blk,
            Profile::BlkRbd,
            Profile::Net,
            Profile::Console,
        ] {
            for body in [ptrace_traceme as fn() -> i32, mount_proc] {
                let status = in_child(profile, SeccompMode::Kill, body);
                assert!(
                    matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                    "{profile:?}: {status:?}"
                );
            }
            let status = in_child(profile, SeccompMode::Kill, allowed_calls);
            assert!(
                matches!(status, WaitStatus::Exited(_, 0)),
                "{profile:?}: {status:?}"
            );
        }
    }

    #[test]
    fn log_mode_lets_forbidden_calls_through() {
        use nix::sys::wait::WaitStatus;
        // ptrace(TRACEME) is allowed (and logged by the kernel): the child exits normally.
        let status = in_child(Profile::Blk, SeccompMode::Log, ptrace_traceme);
        assert!(matches!(status, WaitStatus::Exited(_, 7 | 8)), "{status:?}");
    }

    #[test]
    fn ioctl_is_limited_to_the_listed_requests() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::WaitStatus;
        fn tiocsti() -> i32 {
            // TIOCSTI (inject terminal input) on stdin: not on any list.
            let byte = 0u8;
            // SAFETY: TIOCSTI reads one byte from the valid pointer.
            unsafe { libc::ioctl(0, libc::TIOCSTI, &byte as *const u8) };
            0
        }
        let status = in_child(Profile::Console, SeccompMode::Kill, tiocsti);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{status:?}"
        );
    }

    #[test]
    fn no_filter_with_none() {
        assert!(matches!(Profile::Net.compile(SeccompMode::None), Ok(None)));
    }
}
