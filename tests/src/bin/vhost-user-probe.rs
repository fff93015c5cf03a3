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
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const RAM: u64 = 64 << 20;
const WAIT: Duration = Duration::from_secs(30);
const LEN: u32 = 4096;

fn blk(socket: &str, sector: u64, byte: u8) -> Result<()> {
    let mut vmm = TestVmm::connect(socket.as_ref(), RAM, 1, 64, Negotiate::default())?;
    let config = vmm.get_config(0, 8)?;
    let capacity = u64::from_le_bytes(config[..8].try_into()?);
    let out = vmm.ram.alloc(u64::from(LEN), 4096);
    let back = vmm.ram.alloc(u64::from(LEN), 4096);
    let pattern = vec![byte; LEN as usize];
    vmm.ram.write(out, &pattern)?;
    let status = vmm.blk_request(VIRTIO_BLK_T_OUT, sector, Buf::readable(out, LEN), WAIT)?;
    if status != 0 {
        return Err(format!("write: status {status}").into());
    }
    let status = vmm.blk_request(VIRTIO_BLK_T_IN, sector, Buf::writable(back, LEN), WAIT)?;
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
