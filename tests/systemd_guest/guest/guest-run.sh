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
# KVM's static keys held before CPU 1 comes up (hold-keys.sh; --kvm-only: systemd owns the cgroup
# tree here). This guest panicked "corrupted stack end detected inside scheduler" in a vCPU thread
# twice in a row during the package-upgrade handover before it.
. "$dir/hold-keys.sh"
hold_keys /usr/bin/python3 "$dir/key_holder.py" systemd-guest --kvm-only
SYSTEMD_GUEST_DEBS="$dir" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SYSTEMD_PAGER=cat \
    /usr/bin/python3 -m pytest -c "$dir/pytest.ini" --rootdir "$dir" "$dir/checks.py" "$@"
rc=$?
[ -f "$dir/figures.txt" ] && sed 's/^/systemd-guest: figure: /' "$dir/figures.txt"
# the whole journal of the boot, for the post-mortem (the launcher keeps it)
journalctl -b --no-pager -o short-monotonic > "$dir/journal.txt" 2>&1
kill $heartbeat 2>/dev/null
echo "systemd-guest: pytest exit status $rc"
exit $rc
