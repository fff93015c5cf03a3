//! Build tasks that need the daemons' clap definitions: man pages and shell completions.
//!
//! The binary (`cargo xtask`, see `main.rs`) also builds the Debian package; the integration
//! tests use this library to render the pages and completions they check.

use std::io;
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use clap_complete::Shell;

mod pages;
mod roff;

/// One of the three daemons.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    /// The binary's name, `vhost-user-blk`.
    pub name: &'static str,
    /// The short name used in paths: `/etc/vhost-user/blk/`, `dist/systemd/examples/blk.conf`.
    pub short: &'static str,
    command: fn() -> Command,
}

impl Daemon {
    /// The daemon's clap command, as its binary parses it.
    pub fn command(&self) -> Command {
        (self.command)().bin_name(self.name)
    }
}

/// The daemons, in the order the package and the pages list them.
pub const DAEMONS: [Daemon; 3] = [
    Daemon {
        name: "vhost-user-blk",
        short: "blk",
        command: vhost_user_blk::Args::command,
    },
    Daemon {
        name: "vhost-user-net",
        short: "net",
        command: vhost_user_net::Args::command,
    },
    Daemon {
        name: "vhost-user-console",
        short: "console",
        command: vhost_user_console::args::Args::command,
    },
];

/// Renders `daemon`'s man page (section 1): NAME, SYNOPSIS, OPTIONS and the first words of the
/// DESCRIPTION from its clap definition, the rest written by hand in `pages.rs`. `date` goes in
/// the page footer (`YYYY-MM-DD`).
pub fn man_page(daemon: &Daemon, date: &str) -> io::Result<String> {
    let command = daemon.command();
    let about = command
        .get_about()
        .map(ToString::to_string)
        .unwrap_or_default();
    let man = clap_mangen::Man::new(command).date(date);
    let mut clap_parts = Vec::new();
    man.render_title(&mut clap_parts)?;
    man.render_name_section(&mut clap_parts)?;
    man.render_synopsis_section(&mut clap_parts)?;
    let mut options = Vec::new();
    man.render_options_section(&mut options)?;

    let text = |bytes: Vec<u8>| {
        String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    // Each clap_mangen part starts with the same two-line preamble defining \*(Aq: keep one.
    let preamble = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    let head = text(clap_parts)?;
    let options = text(options)?;
    let page = format!(
        "{preamble}{head}{description}{options}{extra}",
        head = head.replace(preamble, "").replacen(
            "\n.SH NAME\n",
            &format!("\n{}.SH NAME\n", roff::PAGE_SETUP),
            1
        ),
        description = pages::description(daemon, &about),
        options = options.replace(preamble, ""),
        extra = pages::extra_sections(daemon),
    );
    Ok(page)
}

/// Writes `NAME.1` for every daemon into `dir` (created if needed); returns the paths.
pub fn write_man_pages(dir: &Path, date: &str) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for daemon in &DAEMONS {
        let path = dir.join(format!("{}.1", daemon.name));
        std::fs::write(&path, man_page(daemon, date)?)?;
        written.push(path);
    }
    Ok(written)
}

/// The shells completions are generated for, each with the file name its completion loader
/// looks for (`bash/NAME`, `zsh/_NAME`, `fish/NAME.fish`).
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// The file name `shell`'s completion loader expects for command `name`.
pub fn completion_file_name(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    }
}

/// `daemon`'s completion script for `shell`.
pub fn completion(daemon: &Daemon, shell: Shell) -> Vec<u8> {
    let mut command = daemon.command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, daemon.name, &mut script);
    script
}

/// Writes the completions of every daemon into `dir/bash/NAME`, `dir/zsh/_NAME` and
/// `dir/fish/NAME.fish`: each directory's files can be copied as they are into that shell's
/// completion directory. Returns the paths.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (shell, subdir) in SHELLS {
        let shell_dir = dir.join(subdir);
        std::fs::create_dir_all(&shell_dir)?;
        for daemon in &DAEMONS {
            let path = shell_dir.join(completion_file_name(shell, daemon.name));
            std::fs::write(&path, completion(daemon, shell))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The date of a build, as seconds since the epoch: `SOURCE_DATE_EPOCH` when set (reproducible
/// builds), otherwise now.
pub fn build_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

/// `(year, month, day)` of a day counted from 1970-01-01 (proleptic Gregorian calendar).
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days_from_civil inverse: eras of 400 years, March-based years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD` of `epoch` (seconds, UTC).
pub fn iso_date(epoch: u64) -> String {
    let (y, m, d) = civil_date((epoch / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(951_782_400), "2000-02-29");
        assert_eq!(iso_date(1_735_689_599), "2024-12-31");
        assert_eq!(iso_date(1_735_689_600), "2025-01-01");
    }

    #[test]
    fn every_page_renders() {
        for daemon in &DAEMONS {
            let page = man_page(daemon, "2025-01-01").unwrap_or_else(|e| panic!("{e}"));
            assert!(page.is_ascii(), "{}: not ASCII", daemon.name);
            assert_eq!(page.matches(".TH ").count(), 1, "{}", daemon.name);
            assert!(page.contains("\n.nh\n.ad l\n.SH NAME\n"), "{}", daemon.name);
        }
    }
}
