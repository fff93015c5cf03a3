//! `qemu-img`: makes the qcow2 images the blk tests serve, then checks them the way an operator
//! would (`check`, `compare`). `QEMU_IMG` names another binary than the one on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;

/// The `qemu-img` to run.
pub fn path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("QEMU_IMG") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("qemu-img"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "qemu-img is not installed: the qcow2 tests need it (apt-get install qemu-utils, or \
             run .ci/run; QEMU_IMG=PATH names another binary)"
                .into()
        })
}

/// Runs `qemu-img ARGS` and returns what it printed, or its error output when it failed.
pub fn run(args: &[&str]) -> Result<String> {
    let (code, out, err) = run_status(args)?;
    if code != 0 {
        return Err(format!("qemu-img {args:?} exited with {code}: {err}{out}").into());
    }
    Ok(out)
}

/// Runs `qemu-img ARGS`: (exit code, stdout, stderr).
pub fn run_status(args: &[&str]) -> Result<(i32, String, String)> {
    let output = Command::new(path()?).args(args).output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `qemu-img create -f qcow2 [-o OPTIONS] PATH SIZE`.
pub fn create(path: &Path, size: u64, options: &str) -> Result<()> {
    let size = size.to_string();
    let path = s(path);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path.as_str(), size.as_str()]);
    run(&args).map(drop)
}

/// `qemu-img create -f qcow2 -b BACKING -F FORMAT PATH`: a new top over `backing` (a name as
/// written into the header: relative names resolve against `path`'s directory).
pub fn create_over(path: &Path, backing: &str, backing_format: &str) -> Result<()> {
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_format,
        &s(path),
    ])
    .map(drop)
}

/// `qemu-img convert`: `from` (raw) into a qcow2 `to`, with compressed clusters if `compress`.
pub fn convert_to_qcow2(from: &Path, to: &Path, compress: bool) -> Result<()> {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
    if compress {
        args.push("-c");
    }
    let (from, to) = (s(from), s(to));
    args.extend([from.as_str(), to.as_str()]);
    run(&args).map(drop)
}

/// `qemu-img convert`: the qcow2 `image` (its backing chain read through) into a raw `to`,
/// what a guest sees of it.
pub fn convert_to_raw(image: &Path, to: &Path) -> Result<()> {
    run(&["convert", "-f", "qcow2", "-O", "raw", &s(image), &s(to)]).map(drop)
}

/// `qemu-img check`: no corruption. Leaked clusters (exit code 3) are accepted when
/// `leaks_allowed` (a daemon killed between an allocation and its flush leaks, by design).
pub fn check(image: &Path, leaks_allowed: bool) -> Result<String> {
    let (code, out, err) = run_status(&["check", &s(image)])?;
    let text = format!("{out}{err}");
    match code {
        0 => Ok(text),
        3 if leaks_allowed => Ok(text),
        _ => Err(format!(
            "qemu-img check {} exited with {code}: {text}",
            image.display()
        )
        .into()),
    }
}

/// `qemu-img compare`: the image's guest-visible content equals the raw file's.
pub fn compare_with_raw(raw: &Path, image: &Path) -> Result<()> {
    run(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &s(raw),
        &s(image),
    ])
    .map(drop)
    .map_err(|e| format!("image differs from what was written: {e}").into())
}
