# Sourced by both guests' guest-run.sh (POSIX sh): hold KVM's static keys, then bring the other
# CPUs online.  The guest boots with one CPU (maxcpus=1); key_holder.py flips the keys the tests
# would flip (the first or last VM, a vCPU without irqchip, a cpuset) once, while only CPU 0 is
# online, and holds them until power-off: a flip with more CPUs online can hang or corrupt a
# multi-threaded TCG guest (key_holder.py; README, "Why the TCG guest froze").
#   hold_keys PYTHON HOLDER_PY PREFIX [key_holder.py args...]   sets $KEY_HOLDER_PID ("" without /dev/kvm)
hold_keys() {
    _python=$1 _holder=$2 _prefix=$3
    shift 3
    KEY_HOLDER_PID=
    if [ -e /dev/kvm ]; then
        "$_python" "$_holder" "$@" > /tmp/key-holder.out 2>&1 &
        KEY_HOLDER_PID=$!
        _i=0
        while ! grep -q holding /tmp/key-holder.out 2>/dev/null && [ $_i -lt 600 ]; do
            sleep 0.1
            _i=$((_i + 1))
        done
        sed "s/^/$_prefix: /" /tmp/key-holder.out
    fi
    for _f in /sys/devices/system/cpu/cpu[0-9]*/online; do
        [ "$(cat "$_f")" = 1 ] || echo 1 > "$_f" || echo "$_prefix: WARNING: cannot bring $_f up"
    done
    echo "$_prefix: CPUs online: $(cat /sys/devices/system/cpu/online)"
}
