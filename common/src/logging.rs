//! Logging through `log`, to stderr.
//!
//! Under systemd, stderr is usually a stream to journald: `JOURNAL_STREAM` then names its
//! device and inode. There each line starts with the `<N>` syslog priority journald parses
//! (so `journalctl -p err` finds our errors), and carries no time stamp of ours (the journal
//! has its own). On a terminal or a file the lines are unchanged.

use std::fmt::Display;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use log::{Level, LevelFilter};

/// `--log-level` wins when given; otherwise `RUST_LOG`; otherwise `info`.
pub fn init(level: Option<LevelFilter>) {
    let mut builder = env_logger::Builder::new();
    match level {
        Some(level) => {
            builder.filter_level(level);
        }
        None => match std::env::var("RUST_LOG") {
            Ok(spec) => {
                builder.parse_filters(&spec);
            }
            Err(_) => {
                builder.filter_level(LevelFilter::Info);
            }
        },
    }
    if stderr_is_journal() {
        builder.format(|buf, record| {
            let prefix = format!(
                "<{}>[{:<5} {}] ",
                priority(record.level()),
                record.level(),
                record.target()
            );
            // journald reads each line on its own: every line gets the priority.
            for line in record.args().to_string().lines() {
                writeln!(buf, "{prefix}{line}")?;
            }
            Ok(())
        });
    } else {
        builder.format_timestamp_millis();
    }
    // A second initialisation (tests embedding several daemons) is harmless.
    let _ = builder.try_init();
}

/// The syslog priority journald files a record under.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True when `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd) names the file stderr is: a
/// stream to journald. A stderr redirected elsewhere by the service does not match.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(meta) => meta.dev() == dev && meta.ino() == ino,
        Err(_) => false,
    }
}

/// Prints the line a daemon exits with, `PROGRAM: error: MESSAGE`, on stderr: at priority 3
/// (err) when stderr is the journal, and, under systemd, with a hint when the error is a
/// permission or read-only file system error (most likely the unit's sandbox).
pub fn fatal(program: &str, error: &dyn Display) {
    let message = error.to_string();
    let hint = if std::env::var_os("INVOCATION_ID").is_some() {
        let unit = systemd_unit().unwrap_or_else(|| format!("{program}@NAME"));
        sandbox_hint(&message, &unit)
    } else {
        None
    };
    let line = format!("{program}: error: {message}{}", hint.unwrap_or_default());
    let line = if stderr_is_journal() {
        format!("<{}>{line}", priority(Level::Error))
    } else {
        line
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What a daemon's `main` returns: success, or the [`fatal`] line and exit status 1.
pub fn exit_status(program: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            fatal(program, &e);
            std::process::ExitCode::FAILURE
        }
    }
}

/// The unit this process runs in (`vhost-user-blk@disk0.service`), from its cgroup.
fn systemd_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_from_cgroup(&cgroup)
}

fn unit_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .find(|name| name.ends_with(".service"))
        .map(str::to_string)
}

/// What to do about an EACCES or EROFS under the units' sandbox: the service runs as the
/// `vhost-user` user and writes only under its `ReadWritePaths=`.
fn sandbox_hint(message: &str, unit: &str) -> Option<String> {
    let denied = message.contains("(os error 13)");
    let read_only = message.contains("(os error 30)");
    if !denied && !read_only {
        return None;
    }
    let edit = format!("`systemctl edit {unit}`");
    Some(if read_only {
        format!(
            " (the service can write only under its ReadWritePaths=, /var/lib/vhost-user for \
             disk images: add ReadWritePaths=/that/directory with {edit})"
        )
    } else {
        format!(
            " (the service runs as user vhost-user and can write only under its \
             ReadWritePaths=: give the file to that user, e.g. `chown vhost-user: FILE`, and \
             for a path outside /var/lib/vhost-user add ReadWritePaths= with {edit})"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslog_ones() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
        assert_eq!(priority(Level::Trace), 7);
    }

    #[test]
    fn unit_comes_from_the_cgroup_path() {
        let cgroup =
            "0::/system.slice/system-vhost\\x2duser\\x2dblk.slice/vhost-user-blk@d0.service\n";
        assert_eq!(
            unit_from_cgroup(cgroup).as_deref(),
            Some("vhost-user-blk@d0.service")
        );
        assert_eq!(unit_from_cgroup("0::/user.slice/session-1.scope\n"), None);
    }

    #[test]
    fn hints_only_for_permission_and_read_only_errors() {
        let unit = "vhost-user-blk@d0.service";
        let rofs = sandbox_hint(
            "--file /srv/x.img: Read-only file system (os error 30)",
            unit,
        );
        assert!(rofs.is_some_and(|h| h.contains("ReadWritePaths=")
            && h.contains("systemctl edit vhost-user-blk@d0.service")));
        let denied = sandbox_hint("/srv/x.img: Permission denied (os error 13)", unit);
        assert!(denied.is_some_and(|h| h.contains("chown vhost-user:")));
        assert_eq!(
            sandbox_hint("No such file or directory (os error 2)", unit),
            None
        );
    }
}
