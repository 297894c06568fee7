#!/bin/sh
# Inside the systemd guest (virtme-ng-init runs it as root from serial-getty@ttyS0,
# with a fixed PATH, once systemd has booted): a heartbeat the launcher watches,
# then the checks, then the exit status line the launcher reads.
#   guest-run.sh DIR [pytest args...]      DIR: the host's staging dir, mounted here
exec 2>&1
dir=$1
shift
echo "systemd-guest: booted, guest uptime $(cut -d' ' -f1 /proc/uptime) s, PID 1 is $(cat /proc/1/comm)"
# silence for 60 s = frozen (launcher); the kernel's own lockup reports go to the console
(while sleep 10; do echo "systemd-guest: heartbeat, guest uptime $(cut -d' ' -f1 /proc/uptime) s"; done) &
heartbeat=$!
echo 1 > /proc/sys/kernel/softlockup_all_cpu_backtrace 2>/dev/null
echo 30 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
dmesg -n 5 2>/dev/null
# The guest kernel (6.1, TCG, nested KVM) panicked once with "corrupted stack end detected inside
# scheduler" in a vCPU thread whose stack showed task_numa_fault: no automatic NUMA balancing here.
echo 0 > /proc/sys/kernel/numa_balancing 2>/dev/null
cd "$dir" || exit 3
# KVM's static keys (the first or last VM, a vCPU without irqchip) flipped once here with only
# CPU 0 online (the launcher boots with maxcpus=1) and held until power-off: a flip with both
# CPUs online can hang or corrupt this TCG guest (key_holder.py, README "Why the TCG guest froze";
# this guest panicked "corrupted stack end detected inside scheduler" in a vCPU thread twice in a
# row during the package-upgrade handover before it). Then CPU 1 comes online.
if [ -e /dev/kvm ]; then
    /usr/bin/python3 "$dir/key_holder.py" --kvm-only > /tmp/key-holder.out 2>&1 &
    i=0
    while ! grep -q holding /tmp/key-holder.out 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    sed 's/^/systemd-guest: /' /tmp/key-holder.out
fi
for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
    [ "$(cat "$f")" = 1 ] || echo 1 > "$f" || echo "systemd-guest: WARNING: cannot bring $f up"
done
echo "systemd-guest: CPUs online: $(cat /sys/devices/system/cpu/online)"
SYSTEMD_GUEST_DEBS="$dir" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SYSTEMD_PAGER=cat \
    /usr/bin/python3 -m pytest -c "$dir/pytest.ini" --rootdir "$dir" "$dir/checks.py" "$@"
rc=$?
[ -f "$dir/figures.txt" ] && sed 's/^/systemd-guest: figure: /' "$dir/figures.txt"
# the whole journal of the boot, for the post-mortem (the launcher keeps it)
journalctl -b --no-pager -o short-monotonic > "$dir/journal.txt" 2>&1
kill $heartbeat 2>/dev/null
echo "systemd-guest: pytest exit status $rc"
exit $rc
