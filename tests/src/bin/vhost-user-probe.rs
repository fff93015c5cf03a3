//! A vhost-user frontend for shell scripts (the systemd guest test runs it inside the guest):
//!
//! - `vhost-user-probe connect SOCKET`: connects, negotiates, sends a memory table, prints
//!   `features=0x...` and disconnects;
//! - `vhost-user-probe blk SOCKET SECTOR BYTE`: also writes 4 KiB of BYTE at SECTOR of a
//!   vhost-user-blk disk through a real queue, reads them back and compares; prints
//!   `capacity=SECTORS`;
//! - `vhost-user-probe config-oob SOCKET`: asks a vhost-user-blk daemon for config bytes past
//!   its config space (the daemon logs a warning), prints what came back;
//! - `vhost-user-probe unix-connect PATH`: connects to a UNIX stream socket (a console
//!   endpoint) and disconnects.
//!
//! Exit status 0 on success, 1 with the reason on stderr otherwise.

use std::process::ExitCode;
use std::time::Duration;

use vhost_user_tests::{Buf, Negotiate, Result, TestVmm};

const RAM: u64 = 64 << 20;
const WAIT: Duration = Duration::from_secs(30);
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const LEN: u32 = 4096;

/// One virtio-blk request on queue 0; returns the status byte.
fn request(vmm: &mut TestVmm, kind: u32, sector: u64, data: u64) -> Result<u8> {
    let header = vmm.ram.alloc(16, 16);
    let status = vmm.ram.alloc(1, 1);
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    vmm.ram.write(header, &bytes)?;
    vmm.ram.write(status, &[0xee])?;
    let data_buf = if kind == T_OUT {
        Buf::readable(data, LEN)
    } else {
        Buf::writable(data, LEN)
    };
    let (ram, q) = vmm.queue(0);
    q.submit(
        ram,
        &[
            Buf::readable(header, 16),
            data_buf,
            Buf::writable(status, 1),
        ],
    )?;
    q.wait_used(ram, 1, WAIT)?;
    Ok(vmm.ram.read(status, 1)?[0])
}

fn blk(socket: &str, sector: u64, byte: u8) -> Result<()> {
    let mut vmm = TestVmm::connect(socket.as_ref(), RAM, 1, 64, Negotiate::default())?;
    let config = vmm.get_config(0, 8)?;
    let capacity = u64::from_le_bytes(config[..8].try_into()?);
    let out = vmm.ram.alloc(u64::from(LEN), 4096);
    let back = vmm.ram.alloc(u64::from(LEN), 4096);
    let pattern = vec![byte; LEN as usize];
    vmm.ram.write(out, &pattern)?;
    let status = request(&mut vmm, T_OUT, sector, out)?;
    if status != 0 {
        return Err(format!("write: status {status}").into());
    }
    let status = request(&mut vmm, T_IN, sector, back)?;
    if status != 0 {
        return Err(format!("read: status {status}").into());
    }
    if vmm.ram.read(back, LEN as usize)? != pattern {
        return Err("read back other bytes than written".into());
    }
    println!("capacity={capacity}");
    Ok(())
}

fn connect(socket: &str) -> Result<()> {
    let vmm = TestVmm::connect_unstarted(socket.as_ref(), RAM, 2, Negotiate::default())?;
    println!("features={:#x}", vmm.offered_features);
    Ok(())
}

fn config_oob(socket: &str) -> Result<()> {
    let mut vmm = TestVmm::connect_unstarted(socket.as_ref(), RAM, 1, Negotiate::default())?;
    match vmm.get_config(1024, 8) {
        Ok(bytes) => println!("config={bytes:?}"),
        Err(e) => println!("refused={e}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["connect", socket] => connect(socket),
        ["config-oob", socket] => config_oob(socket),
        ["unix-connect", path] => std::os::unix::net::UnixStream::connect(path)
            .map(drop)
            .map_err(|e| format!("{path}: {e}").into()),
        ["blk", socket, sector, byte] => match (sector.parse(), byte.parse()) {
            (Ok(sector), Ok(byte)) => blk(socket, sector, byte),
            _ => Err("SECTOR and BYTE are numbers".into()),
        },
        _ => Err(
            "usage: vhost-user-probe connect SOCKET | blk SOCKET SECTOR BYTE | config-oob SOCKET \
             | unix-connect PATH"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
