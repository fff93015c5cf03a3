//! The hand-written parts of the man pages: DESCRIPTION after clap's `about`, then EXIT STATUS,
//! SIGNALS, ENVIRONMENT, FILES, EXAMPLES and SEE ALSO. What they say is what the code does:
//! `common/src/{cli,serve,signals,logging}.rs`, each daemon's `main.rs`, `dist/`.

use crate::roff::Roff;
use crate::Daemon;

/// The paragraph every daemon shares: where the socket comes from and how it is served.
const SOCKET: &str = "The vhost-user socket is `--socket-path` {path}, created with mode 0600 \
    unless `--socket-mode` and `--socket-group` say otherwise, or a listening socket the daemon \
    inherits: `--fd` {n}, or under systemd socket activation when neither option is given. The \
    socket is bound once: when the VMM disconnects (a guest reboot, a QEMU restart with \
    `reconnect-ms=1000`, `reconnect=1` before QEMU 9.2) the next connection is accepted on the \
    same socket, with fresh device state. A stale socket file left by a crashed instance is \
    replaced; a socket that another process still serves is refused. The daemon never forks \
    into the background and logs to standard error.";

const SHARED_MEMORY: &str = "The guest's memory must be shared with the daemon: give QEMU a \
    `memory-backend-memfd` (or `memory-backend-file`) object with `share=on`, used as the \
    guest's RAM.";

/// DESCRIPTION: clap's one-line `about`, then what the daemon does.
pub fn description(daemon: &Daemon, about: &str) -> String {
    let mut roff = Roff::default();
    roff.section("DESCRIPTION").para(&format!("{about}."));
    match daemon.short {
        "blk" => {
            roff.para(
                "`vhost-user-blk` serves a regular file or a block device to a virtual machine \
                 as a virtio-blk disk. A VMM such as QEMU or Cloud Hypervisor connects to the \
                 daemon's vhost-user UNIX socket and shares the guest's memory; the guest's \
                 virtqueues are then served by the daemon, not by the VMM.",
            )
            .para(SOCKET)
            .para(
                "Each queue (`--num-queues`) has its own worker thread and, with the default \
                 `io_uring` engine, its own io_uring. A block device's size comes from \
                 BLKGETSIZE64. `--direct` opens the backing store with O_DIRECT; guest buffers \
                 that are not aligned for it go through a bounce buffer.",
            )
            .para(
                "A guest flush is `fdatasync`(2): when it completes, the data is durable. When \
                 the guest turns its write cache off, or did not negotiate FLUSH, every write is \
                 made durable before it completes. Discard punches a hole in a file (BLKDISCARD \
                 on a device); write-zeroes uses FALLOC_FL_ZERO_RANGE, or punches a hole when \
                 the guest allows unmapping (BLKZEROOUT on a device). The guest's GET_ID returns \
                 `--serial`, or by default an identity derived from the backing file's device \
                 and inode, which stays the same across restarts.",
            )
            .para(
                "`--format` says what the file holds: `raw` (the default: its bytes are the \
                 disk's) or `qcow2`. The format is never guessed: a guest can write a qcow2 \
                 header into a raw disk and name any host file as its backing file. A qcow2 \
                 image's backing chain is opened read-only at start-up, relative backing names \
                 resolved against the directory of the image that names them, as QEMU does; \
                 `--backing` names another backing file and `--backing-format` its format (a \
                 backing file's format must be recorded in the image or given). The disk's \
                 size is the image's virtual size. A flush writes the image's cached metadata \
                 back, then syncs. Discard and write-zeroes make zero clusters (the host \
                 blocks under whole clusters are punched). Encrypted images, external data \
                 files, extended L2 entries, zstd compression and images marked dirty or \
                 corrupt are refused at start-up.",
            )
            .para(SHARED_MEMORY);
        }
        "net" => {
            roff.para(
                "`vhost-user-net` connects a virtual machine's virtio-net device to a Linux tap \
                 interface: frames the guest transmits go out through the tap, frames arriving \
                 on the tap fill the guest's receive buffers.",
            )
            .para(SOCKET)
            .para(
                "The daemon attaches to the tap `--tap` {name}, or creates it, with one tap \
                 queue per queue pair (IFF_MULTI_QUEUE) and the virtio-net header in front of \
                 every frame (IFF_VNET_HDR). An existing tap must have `vnet_hdr`, and \
                 `multi_queue` for more than one pair. Each queue pair is served by its own \
                 worker thread with its own tap queue. Creating or attaching to a tap needs \
                 CAP_NET_ADMIN. A tap the daemon created disappears when it exits.",
            )
            .para(
                "The device offers MAC, MTU, STATUS, MQ, MRG_RXBUF, checksum and segmentation \
                 offloads, EVENT_IDX and INDIRECT_DESC. It has no control queue: QEMU handles \
                 it, and its `-netdev vhost-user,queues=` {n} must not exceed `--queue-pairs`.",
            )
            .para(SHARED_MEMORY);
        }
        _ => {
            roff.para(
                "`vhost-user-console` is a virtio-console device (virtio device id 3). The \
                 guest's `/dev/hvc0` (port 0) and its named ports (`/dev/vport0p1`, ..., whose \
                 names are in `/sys/class/virtio-ports/*/name`) are connected to endpoints on \
                 the host: a new pseudo-terminal (the default; its path is logged), a UNIX \
                 socket or a TCP socket. A socket endpoint serves one client at a time; others \
                 are refused until it leaves.",
            )
            .para(SOCKET)
            .para(
                "The endpoints and their history outlive the VMM connection: a reconnecting \
                 VMM finds the same pseudo-terminal, sockets and history. Each port keeps the \
                 last `--history` KiB of guest output and replays it to every client that \
                 attaches. With no client attached, guest output goes to the history and the \
                 `--log` file and is otherwise dropped: the guest never stalls on an unattended \
                 console.",
            )
            .para(
                "The device has 2 x ({ports} + 1) queues (4 with only the console) and 12 bytes \
                 of configuration space: the values QEMU's generic vhost-user device needs as \
                 `num_vqs` and `config_size`.",
            )
            .para(SHARED_MEMORY);
        }
    }
    roff.finish()
}

/// The sections after OPTIONS.
pub fn extra_sections(daemon: &Daemon) -> String {
    let mut roff = Roff::default();
    exit_status(&mut roff);
    signals(&mut roff, daemon);
    environment(&mut roff);
    files(&mut roff, daemon);
    examples(&mut roff, daemon);
    see_also(&mut roff, daemon);
    roff.finish()
}

fn exit_status(roff: &mut Roff) {
    roff.section("EXIT STATUS")
        .para(
            "The daemon serves one frontend after another and does not exit when a VMM \
             disconnects. It exits:",
        )
        .item(
            "0",
            "after SIGTERM or SIGINT (see SIGNALS), or after answering `--print-capabilities`, \
             `--help` or `--version`.",
        )
        .item(
            "1",
            "when it cannot start or stops serving: an option value is out of range, the socket \
             cannot be created or is in use, the device's backing cannot be opened. One line on \
             standard error names the problem.",
        )
        .item(
            "2",
            "when the command line cannot be parsed (an unknown option, a missing value).",
        );
}

fn signals(roff: &mut Roff, daemon: &Daemon) {
    let last_words = match daemon.short {
        "blk" => {
            "Before that, the backing file or device is flushed (`fdatasync`(2)), so every \
             write the guest saw complete is durable."
        }
        "net" => {
            "A tap the daemon created goes away with it; a tap created beforehand (for example \
             with `ip tuntap add`) stays."
        }
        _ => {
            "Before that, the `--pty-link` symlinks and the UNIX endpoint sockets it created \
             are removed."
        }
    };
    roff.section("SIGNALS")
        .item(
            "SIGTERM, SIGINT",
            &format!(
                "The daemon exits promptly with status 0, whatever it is doing, and removes \
                 the socket file it created with `--socket-path` (a socket inherited with \
                 `--fd` or from systemd is left alone). {last_words}"
            ),
        )
        .para(
            "Other signals keep their default action: SIGHUP or SIGQUIT, for instance, end the \
             daemon without this cleanup. A socket file left behind that way is replaced at the \
             next start.",
        );
}

fn environment(roff: &mut Roff) {
    roff.section("ENVIRONMENT")
        .item(
            "`RUST_LOG`",
            "The log filter when `--log-level` is not given, in env_logger syntax: a level \
             (`debug`) or per-module levels (`info,vhost_user_common=debug`). The default is \
             `info`. Logs go to standard error, that is the journal under systemd.",
        )
        .item(
            "`LISTEN_FDS`, `LISTEN_PID`",
            "systemd socket activation (sd_listen_fds(3)). When neither `--socket-path` nor \
             `--fd` is given and `LISTEN_PID` is the daemon's process id, the one listening \
             socket passed as file descriptor 3 is served. More than one socket is an error, \
             and `--socket-mode` and `--socket-group` cannot be used with an inherited socket.",
        )
        .item(
            "`NOTIFY_SOCKET`",
            "Set by systemd for a `Type=notify` service (sd_notify(3)): the daemon sends \
             `READY=1` once its socket is listening, before the first VMM connects.",
        );
}

fn files(roff: &mut Roff, daemon: &Daemon) {
    let (name, short) = (daemon.name, daemon.short);
    roff.section("FILES")
        .item(
            &format!("`/etc/vhost-user/{short}/`{{instance}}`.conf`"),
            &format!(
                "The settings of the systemd instance `{name}@`{{instance}}: one variable, \
                 `ARGS`, the daemon's options without `--socket-path` and `--fd` (split on white \
                 space, no shell quoting). An example is \
                 `/usr/share/doc/vhost-user-daemons/examples/{short}.conf`."
            ),
        )
        .items(
            &[
                &format!("`/lib/systemd/system/{name}@.service`"),
                &format!("`/lib/systemd/system/{name}@.socket`"),
            ],
            &format!(
                "The template units. `systemctl enable --now {name}@`{{instance}}`.socket` \
                 creates the socket; the first connection starts the service, which runs \
                 `/usr/bin/{name} $ARGS` with systemd's hardening (see `systemctl cat \
                 {name}@.service`)."
            ),
        )
        .item(
            &format!("`/run/vhost-user/{short}/`{{instance}}`.sock`"),
            "The instance's vhost-user socket (mode 0660, group kvm): give it to QEMU's \
             `-chardev socket,path=`.",
        )
        .item(
            &format!("`/usr/share/qemu/vhost-user/50-{name}.json`"),
            "The QEMU vhost-user backend descriptor (QEMU's docs/interop/vhost-user.json), which \
             lets management tools such as libvirt find the daemon.",
        );
    match short {
        "blk" => {
            roff.item(
                "`/var/lib/vhost-user/`",
                "The only directory the service may write to. An image elsewhere needs a \
                 drop-in (`systemctl edit vhost-user-blk@`{instance}) with \
                 `[Service]` `ReadWritePaths=`{directory}.",
            );
        }
        "console" => {
            roff.item(
                "`/run/vhost-user/console/`, `/var/log/vhost-user/`",
                "Where the service may write: UNIX endpoints (`--unix`, `--port ...,unix=`) \
                 and `--log` files.",
            );
        }
        _ => {}
    }
}

fn examples(roff: &mut Roff, daemon: &Daemon) {
    roff.section("EXAMPLES");
    match daemon.short {
        "blk" => {
            roff.para(
                "Export a disk image with two queues, and attach QEMU to it (`reconnect-ms=1000` \
                 lets QEMU find the daemon again after a restart; QEMU before 9.2, such as \
                 Debian 12's 7.2, spells it `reconnect=1`):",
            )
            .example(&[
                "truncate -s 4G /var/lib/vhost-user/disk.img",
                "vhost-user-blk --socket-path /run/vub0.sock \\",
                "    --file /var/lib/vhost-user/disk.img --num-queues 2 &",
                "qemu-system-x86_64 -machine q35,accel=kvm -m 1G \\",
                "    -object memory-backend-memfd,id=mem,size=1G,share=on \\",
                "    -numa node,memdev=mem \\",
                "    -chardev socket,id=c0,path=/run/vub0.sock,reconnect-ms=1000 \\",
                "    -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...",
            ])
            .para(
                "A read-only export of a block device with four queues and O_DIRECT, on a \
                 socket QEMU's group (kvm) may open:",
            )
            .example(&[
                "vhost-user-blk --socket-path /run/vub1.sock \\",
                "    --socket-group kvm --socket-mode 0660 \\",
                "    --file /dev/nvme0n1p3 --readonly --direct --num-queues 4",
            ])
            .para(
                "A qcow2 overlay on a shared base image: the guest's writes go to `vm1.qcow2`, \
                 the base is only read:",
            )
            .example(&[
                "cd /var/lib/vhost-user",
                "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 vm1.qcow2",
                "vhost-user-blk --socket-path /run/vub2.sock \\",
                "    --file /var/lib/vhost-user/vm1.qcow2 --format qcow2",
            ])
            .para("The same disk as a systemd instance `vm1`:")
            .example(&[
                "mkdir -p /etc/vhost-user/blk",
                "echo 'ARGS=--file /var/lib/vhost-user/disk.img --num-queues 2' \\",
                "    > /etc/vhost-user/blk/vm1.conf",
                "systemctl enable --now vhost-user-blk@vm1.socket",
                "sock=/run/vhost-user/blk/vm1.sock",
                "qemu-system-x86_64 ... \\",
                "    -chardev socket,id=c0,path=$sock,reconnect-ms=1000 \\",
                "    -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...",
            ]);
        }
        "net" => {
            roff.para(
                "Create the tap `tap0` with an address on the host side, two queue pairs, and \
                 attach QEMU (its `queues=` must not exceed `--queue-pairs`):",
            )
            .example(&[
                "vhost-user-net --socket-path /run/vun.sock --tap tap0 \\",
                "    --queue-pairs 2 --mac 52:54:00:12:34:56 \\",
                "    --host-ip 192.168.100.1/24 &",
                "qemu-system-x86_64 -machine q35,accel=kvm -m 1G \\",
                "    -object memory-backend-memfd,id=mem,size=1G,share=on \\",
                "    -numa node,memdev=mem \\",
                "    -chardev socket,id=c1,path=/run/vun.sock,reconnect-ms=1000 \\",
                "    -netdev vhost-user,id=n0,chardev=c1,queues=2 \\",
                "    -device virtio-net-pci,netdev=n0,mq=on,mac=52:54:00:12:34:56",
            ])
            .para("Or attach to a tap created beforehand, for example one in a bridge:")
            .example(&[
                "ip tuntap add dev tap0 mode tap multi_queue vnet_hdr",
                "ip link set tap0 master br0 up",
                "vhost-user-net --socket-path /run/vun.sock --tap tap0 --queue-pairs 2",
            ])
            .para("As a systemd instance `vm1`, on the socket `/run/vhost-user/net/vm1.sock`:")
            .example(&[
                "echo 'ARGS=--tap vhu-vm1 --queue-pairs 2' \\",
                "    > /etc/vhost-user/net/vm1.conf",
                "systemctl enable --now vhost-user-net@vm1.socket",
            ]);
        }
        _ => {
            roff.para(
                "A console on a pseudo-terminal with a stable name, logged to a file, and \
                 `screen`(1) attached to it (Ctrl-a k leaves; the guest keeps running):",
            )
            .example(&[
                "vhost-user-console --socket-path /run/vm1-vuc.sock \\",
                "    --pty-link /run/vm1-console --log /var/log/vm1-console.log &",
                "screen /run/vm1-console",
            ])
            .para("The console on a UNIX socket, plus a named port for an agent:")
            .example(&[
                "vhost-user-console --socket-path /run/vm1-vuc.sock \\",
                "    --unix /run/vm1-console.sock \\",
                "    --port name=org.example.agent,unix=/run/vm1-agent.sock &",
                "socat -,raw,echo=0 UNIX-CONNECT:/run/vm1-console.sock",
            ])
            .para(
                "QEMU attaches it with its generic vhost-user device: `vhost-user-device-pci` \
                 in 8.2 to 9.x, `vhost-user-test-device-pci` in 10.1 and later; QEMU 7.2 has \
                 none and 10.0's is not user-creatable. `num_vqs` is 2 x (ports + 1), counting \
                 the console: 4 alone, 6 with one named port. No `reconnect-ms` on this chardev \
                 (the generic device cannot start on a reconnecting one):",
            )
            .example(&[
                "device=vhost-user-test-device-pci,chardev=vuc,virtio-id=3",
                "qemu-system-x86_64 -machine q35,accel=kvm -m 1G \\",
                "    -object memory-backend-memfd,id=mem,size=1G,share=on \\",
                "    -numa node,memdev=mem \\",
                "    -chardev socket,id=vuc,path=/run/vm1-vuc.sock \\",
                "    -device $device,num_vqs=4,config_size=12 \\",
                "    -append 'console=hvc0 ...' ...",
            ]);
        }
    }
}

fn see_also(roff: &mut Roff, daemon: &Daemon) {
    let mut pages: Vec<(&str, &str)> = crate::DAEMONS
        .iter()
        .filter(|other| other.name != daemon.name)
        .map(|other| (other.name, "1"))
        .collect();
    match daemon.short {
        "net" => pages.push(("ip-tuntap", "8")),
        "console" => pages.extend([("screen", "1"), ("pty", "7")]),
        _ => {}
    }
    pages.extend([
        ("qemu", "1"),
        ("systemd.socket", "5"),
        ("systemd.service", "5"),
        ("sd_listen_fds", "3"),
        ("sd_notify", "3"),
    ]);
    roff.section("SEE ALSO").references(&pages).para(
        "The vhost-user protocol and its backend program conventions: \
         https://www.qemu.org/docs/master/interop/vhost-user.html",
    );
}
