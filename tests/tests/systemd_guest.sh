#!/bin/bash
# Runs inside the systemd guest (tests/src/systemd_guest.rs) as root, once the system is up:
# installs the .deb from /test, uses the three daemons through their units as an operator
# would, and reports `E2E key=value` lines on the serial console (read by systemd_guest.rs).
# A check reports `ok` or `fail: <why>`; the host side decides.
set -u
T=/test
# Every probe gives up after a minute: a hung frontend must not hang the whole test.
PROBE="timeout 60 $T/vhost-user-probe"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "E2E $1=$2"; }
# Where the script is, on the serial console (the host shows it when the guest hangs).
step() { echo "E2E step=$1 $(cut -d' ' -f1 /proc/uptime)"; }
one_line() { tr '\n' ' ' | cut -c1-400; }
# check NAME COMMAND...: ok when COMMAND succeeds.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then say "$name" ok; else say "$name" "fail: $(echo "$out" | one_line)"; fi
}
# refuse NAME COMMAND...: ok when COMMAND fails.
refuse() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then say "$name" "fail: succeeded: $(echo "$out" | one_line)"; else say "$name" ok; fi
}
state() { systemctl show -p "$2" --value "$1"; }
mainpid() { state "$1" MainPID; }
# wait_for SECONDS COMMAND...: until COMMAND succeeds.
wait_for() {
    local n=$(($1 * 10))
    shift
    while [ $n -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

say booted "$(cut -d' ' -f1 /proc/uptime)"
say systemd "$(systemctl --version | head -1 | cut -d' ' -f2)"
say pid1 "$(cat /proc/1/comm)"

# Install: the package creates the kvm group and the vhost-user user itself.
check install dpkg -i $T/vhost-user-daemons.deb
check user getent passwd vhost-user
check kvm_group getent group kvm

# Three instances, as the examples describe them.
truncate -s 64M /var/lib/vhost-user/blk/d0.img
chown vhost-user: /var/lib/vhost-user/blk/d0.img
echo "ARGS=--file /var/lib/vhost-user/blk/d0.img --num-queues 1 --io-engine io_uring" >/etc/vhost-user/blk/d0.conf
echo "ARGS=--unix /run/vhost-user/console/c0/console.sock --log /var/log/vhost-user/c0.log" >/etc/vhost-user/console/c0.conf
echo "ARGS=--tap vhu-n0 --queue-pairs 1" >/etc/vhost-user/net/n0.conf
check enable systemctl enable --now vhost-user-blk@d0.socket vhost-user-console@c0.socket vhost-user-net@n0.socket

BLK=vhost-user-blk@d0.service
SOCK=/run/vhost-user/blk/d0.sock
# Socket activation: nothing runs until a frontend connects; then I/O goes through io_uring.
say blk_before "$(systemctl is-active $BLK)"
say blk_socket_mode "$(stat -c '%a %U %G' $SOCK)"
check blk_io $PROBE blk $SOCK 8 165
say blk_after "$(systemctl is-active $BLK)"
PID=$(mainpid $BLK)
say blk_user "$(stat -c %U /proc/$PID)"
# Readiness: Type=notify, and the daemon said READY=1 (systemctl start returns only then).
say blk_type "$(state $BLK Type)"
# Reconnect: the same daemon serves the next frontend.
check blk_reconnect $PROBE blk $SOCK 16 90
say blk_same_pid "$([ "$(mainpid $BLK)" = "$PID" ] && echo ok || echo "fail: $PID -> $(mainpid $BLK)")"
if journalctl -u $BLK -o cat | grep -q "io_uring unavailable"; then
    say blk_io_uring "fail: $(journalctl -u $BLK -o cat | grep 'io_uring unavailable' | one_line)"
else
    say blk_io_uring ok
fi

# The sandbox, seen from inside the service's mount namespace (as root there, which is more
# than the daemon has): /run and /etc are read-only, the images' directory is not.
refuse blk_run_writable nsenter -t $PID -m touch /run/systemd/system/escape.service
refuse blk_run_test_w nsenter -t $PID -m test -w /run/systemd/system
refuse blk_etc_writable nsenter -t $PID -m touch /etc/escape
check blk_images_writable nsenter -t $PID -m test -w /var/lib/vhost-user/blk/d0.img
say blk_caps "$(grep CapEff /proc/$PID/status | cut -f2)"
say blk_netns "$([ "$(readlink /proc/$PID/ns/net)" != "$(readlink /proc/1/ns/net)" ] && echo private || echo host)"

step journal
# Journal: priorities from the daemon, no time stamp of its own.
# (The frontend may wait for an answer that does not come: it only has to ask.)
timeout 5 $T/vhost-user-probe config-oob $SOCK >/dev/null 2>&1
sleep 0.5
say blk_warn_priority "$(journalctl -u $BLK -p warning..warning -o cat | grep -c 'outside the config space')"
say blk_info_priority "$(journalctl -u $BLK -p info..info -o cat | grep -c 'INFO')"
say blk_own_timestamps "$(journalctl -u $BLK -o cat | grep -c '^\[20[0-9][0-9]-')"

step restart
# Restart, crash restart, stop.
check blk_restart systemctl restart $BLK
NEW=$(mainpid $BLK)
say blk_restart_pid "$([ "$NEW" != "$PID" ] && [ "$NEW" != 0 ] && echo ok || echo "fail: $PID -> $NEW")"
check blk_after_restart $PROBE blk $SOCK 24 7
# SIGABRT: Rust's own SIGSEGV handler lets a SIGSEGV sent by kill(1) pass unnoticed.
kill -ABRT "$NEW"
wait_for 60 sh -c "[ \"\$(systemctl show -p NRestarts --value $BLK)\" = 1 ] && systemctl is-active -q $BLK"
say blk_crash_restarts "$(state $BLK NRestarts)"
check blk_after_crash $PROBE blk $SOCK 32 8
check blk_stop systemctl stop $BLK
say blk_stopped "$(systemctl is-active $BLK)"
say blk_socket_after_stop "$(systemctl is-active vhost-user-blk@d0.socket)"
check blk_reactivated $PROBE blk $SOCK 40 9

step console
# Console: the endpoint and the log go to the kvm group, nobody else.
CON=vhost-user-console@c0.service
check console_start systemctl start $CON
EP=/run/vhost-user/console/c0/console.sock
LOG=/var/log/vhost-user/c0.log
say console_endpoint_mode "$(stat -c '%a %U %G' $EP)"
say console_log_mode "$(stat -c '%a %U %G' $LOG)"
say console_user "$(stat -c %U /proc/$(mainpid $CON))"
check console_vhost_user $PROBE connect /run/vhost-user/console/c0.sock
# A VM operator: in the kvm group, not in vhost-user's.
check console_operator useradd --no-create-home --no-user-group --groups kvm vmop
check console_operator_connects runuser -u vmop -- $PROBE unix-connect $EP
check console_operator_reads_log runuser -u vmop -- cat $LOG
refuse console_nobody_connects runuser -u nobody -- $PROBE unix-connect $EP
refuse console_nobody_reads_log runuser -u nobody -- cat $LOG
refuse console_run_writable nsenter -t "$(mainpid $CON)" -m touch /run/systemd/system/escape.service

step net
# Net: the tap is created with the ambient CAP_NET_ADMIN of an unprivileged user.
NET=vhost-user-net@n0.service
check net_connect $PROBE connect /run/vhost-user/net/n0.sock
say net_active "$(systemctl is-active $NET)"
say net_tap "$([ -d /sys/class/net/vhu-n0 ] && echo present || echo missing)"
say net_user "$(stat -c %U /proc/$(mainpid $NET))"
say net_caps "$(grep CapEff /proc/$(mainpid $NET)/status | cut -f2)"
refuse net_run_writable nsenter -t "$(mainpid $NET)" -m touch /run/systemd/system/escape.service
# Transmit batches go through io_uring: the unit's system call filter must let it be set up.
if journalctl -u $NET -o cat | grep -q "io_uring unavailable"; then
    say net_io_uring "fail: $(journalctl -u $NET -o cat | grep 'io_uring unavailable' | one_line)"
else
    say net_io_uring ok
fi

step security
# systemd-analyze security, as the README quotes it.
for unit in $BLK $CON $NET; do
    systemctl start $unit
    say "security_${unit%%@*}" "$(systemd-analyze security --no-pager $unit | sed -n 's/.*exposure level for .*: \([0-9.]*\) .*/\1/p')"
done

step bad
# A misconfigured instance: the image is outside the writable paths. Each connection starts
# one attempt that fails with the fix in an err-priority line; the socket stays up.
BAD=vhost-user-blk@bad.service
mkdir -p /srv
truncate -s 16M /srv/bad.img
chown vhost-user: /srv/bad.img
echo "ARGS=--file /srv/bad.img" >/etc/vhost-user/blk/bad.conf
systemctl enable --now vhost-user-blk@bad.socket
for i in 1 2 3 4 5 6 7; do
    $PROBE connect /run/vhost-user/blk/bad.sock >/dev/null 2>&1
    sleep 0.3
done
sleep 1
say bad_socket "$(systemctl is-active vhost-user-blk@bad.socket)"
say bad_service "$(systemctl is-active $BAD)"
say bad_restarts "$(state $BAD NRestarts)"
say bad_attempts "$(journalctl -u $BAD -p err -o cat | grep -c 'vhost-user-blk: error:')"
say bad_err_line "$(journalctl -u $BAD -p err -o cat | grep -m1 'vhost-user-blk: error:' | one_line)"
mkdir -p /etc/systemd/system/$BAD.d
printf '[Service]\nReadWritePaths=/srv\n' >/etc/systemd/system/$BAD.d/writable.conf
systemctl daemon-reload
check bad_fixed $PROBE blk /run/vhost-user/blk/bad.sock 8 1

step purge
# Purge: no instance left behind as a not-found unit.
say links_before_purge "$(find /etc/systemd/system -type l -name 'vhost-user-*@*' | wc -l)"
systemctl stop 'vhost-user-*'
check purge dpkg --purge vhost-user-daemons
systemctl daemon-reload
say purge_links "$(find /etc/systemd/system -xtype l -name 'vhost-user-*' | wc -l)"
say purge_not_found "$(systemctl list-units --all --no-legend 'vhost-user-*' | grep -c not-found)"

say done 1
step end
sync
systemctl poweroff --force --force
