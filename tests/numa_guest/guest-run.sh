#!/bin/sh
# Inside the numa guest: make the machine look like a host kvmnumad runs on,
# show what it is, then run the numa tests. Runs under dash with the guest's
# fixed PATH, hence absolute paths from the launcher.
# Usage: guest-run.sh TOPOLOGY PYTHON TESTS_DIR [pytest args...]
#        guest-run.sh TOPOLOGY PYTHON SCRIPT.py [args...]
exec 2>&1
topology=$1 python=$2 tests=$3
shift 3
echo "numa-guest: booted, guest uptime $(cut -d' ' -f1 /proc/uptime) s"

# A frozen guest must be told from a slow one: a heartbeat the launcher
# watches (silence for 60 s = frozen), and the kernel's own lockup and
# hung-task reports, with stacks, on the console the launcher keeps.
(while sleep 10; do echo "numa-guest: heartbeat, guest uptime $(cut -d' ' -f1 /proc/uptime) s"; done) &
heartbeat=$!
echo 1 > /proc/sys/kernel/softlockup_all_cpu_backtrace 2>/dev/null
echo 1 > /proc/sys/kernel/hung_task_all_cpu_backtrace 2>/dev/null
echo 30 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
echo 1 > /proc/sys/kernel/sysrq 2>/dev/null
# warnings and worse reach the console (lockup reports, stacks); routine info (a CPU going
# offline) would split pytest's lines, which the launcher parses
dmesg -n 5 2>/dev/null
# The kernel's automatic NUMA balancing is off for every test: it would move pages under the
# daemon's own placement and the tests' numa_maps checks. (This 6.1 guest kernel, under TCG with
# nested KVM, has panicked "corrupted stack end detected inside scheduler" in a vCPU thread, once
# with task_numa_fault on the stack and once in futex_wait with balancing already off: balancing
# is not the cause; the launcher boots such a guest once more.) bench/repair.py turns it on for
# its own baseline, on a plain process, and back.
echo 0 > /proc/sys/kernel/numa_balancing 2>/dev/null

# virtme-ng mounts cgroup2 today; a kernel or vng without it must not make the
# cpuset tests fail for the wrong reason.
if ! grep -q ' /sys/fs/cgroup ' /proc/mounts; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "numa-guest: WARNING: cannot mount cgroup2"
fi
mkdir -p /run/dbus /run/systemd/journal

# udevd loads kvm_amd from the CPU's modalias; wait for it rather than race it.
if [ ! -e /dev/kvm ]; then
    modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null
    udevadm settle --timeout=30 2>/dev/null
fi
if [ -e /dev/kvm ]; then
    echo "numa-guest: /dev/kvm present: $(ls -l /dev/kvm)"
else
    echo "numa-guest: WARNING: /dev/kvm missing (nested KVM unavailable)"
fi

. "$(dirname "$0")/hold-keys.sh"
hold_keys "$python" "$(dirname "$0")/key_holder.py" numa-guest
numactl -H | sed 's/^/numa-guest: /'

case $tests in
*.py) # a script instead of the suite (the launcher's --repro)
    KEY_HOLDER_PID=$KEY_HOLDER_PID PYTHONPATH=$(dirname "$tests") PYTHONUNBUFFERED=1 "$python" "$tests" "$@" ;;
# No plugin autoload: the numa tests use none, and hypothesis' entry point alone cost
# 12-26 s of the guest's pytest start (measured under TCG, 4node). --durations: where
# the guest's minutes go, in the output CI keeps.
*)  KVMNUMAD_TOPOLOGY=$topology PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
        "$python" -m pytest -m numa -p no:cacheprovider --durations=15 "$tests" "$@" ;;
esac
rc=$?
kill $heartbeat 2>/dev/null
echo "numa-guest: pytest exit status $rc"
exit $rc
