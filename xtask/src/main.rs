//! `cargo xtask man OUTDIR`, `cargo xtask completions OUTDIR`, `cargo xtask deb`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod deb;

/// Build tasks of the vhost-user daemons workspace.
#[derive(Parser, Debug)]
#[command(name = "xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Write the daemons' man pages (NAME.1, roff) into OUTDIR.
    Man {
        /// Directory to write into (created if needed).
        outdir: PathBuf,
    },
    /// Write bash, zsh and fish completions into OUTDIR/{bash,zsh,fish}/.
    Completions {
        /// Directory to write into (created if needed).
        outdir: PathBuf,
    },
    /// Build the release binaries and the Debian package <target>/debian/vhost-user-daemons_*.deb.
    Deb,
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.task {
        Task::Man { outdir } => {
            let date = xtask::iso_date(xtask::build_epoch());
            let written = xtask::write_man_pages(&outdir, &date)
                .map_err(|e| format!("{}: {e}", outdir.display()))?;
            for path in written {
                println!("{}", path.display());
            }
        }
        Task::Completions { outdir } => {
            let written = xtask::write_completions(&outdir)
                .map_err(|e| format!("{}: {e}", outdir.display()))?;
            for path in written {
                println!("{}", path.display());
            }
        }
        Task::Deb => {
            let deb = deb::build()?;
            println!("{}", deb.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}
