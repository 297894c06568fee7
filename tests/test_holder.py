"""kvmnumad/holder.py: a CLONE_VM child keeps the old address space past exec.

Observed from outside through /proc: the holder's maps (the same guest
mapping at the same address, still resident after the exec), its fds (one
pipe end), its signal mask, its state; a crash of the new image must not
leak it.  The exec'ing process is a small Python script started here, so
the test's own address space is never the one held.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from kvmnumad import libc
from kvmnumad.vm import region
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# Maps 64 MiB of a memfd, touches every page, spawns a holder, prints what the
# test needs, then execs `sleep` (which keeps the pipe end) or a process that
# kills itself at once (the new image's crash).
OLD_IMAGE = textwrap.dedent("""
    import mmap, os, sys
    from kvmnumad import holder
    fd = os.memfd_create("held-guest")
    os.ftruncate(fd, 64 << 20)
    m = mmap.mmap(fd, 64 << 20)
    for off in range(0, 64 << 20, 4096):
        m[off] = 1
    h = holder.spawn()
    os.set_inheritable(h.fd, True)
    print(h.pid, h.fd, flush=True)
    if sys.argv[1] == "crash":
        os.execv("/bin/sh", ["sh", "-c", "kill -9 $$"])
    os.execv("/bin/sleep", ["sleep", "60"])
""")


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


class Scenario:
    """The old image under a supervisor that plays the new image's parent: a
    subreaper, so the orphaned holder comes to it (not to this host's PID 1)
    and its wait status can be read."""

    def __init__(self, mode: str) -> None:
        code = OLD_IMAGE
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR_WAIT, code, mode], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.image, self.holder, self.fd = (int(x) for x in self.proc.stdout.readline().split())

    def kill_image(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("kill\n")
        self.proc.stdin.flush()

    def results(self) -> tuple[int, int]:
        """(the new image's exit, the holder's wait status)."""
        assert self.proc.stdout is not None
        out = self.proc.communicate(timeout=60)[0].split()
        return int(out[0]), int(out[1])


SUPERVISOR_WAIT = textwrap.dedent("""
    import ctypes, os, subprocess, sys
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    p = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    holder, fd = p.stdout.readline().split()
    print(p.pid, holder, fd, flush=True)
    if sys.argv[2] != "crash":
        sys.stdin.readline()
        p.kill()
    code = p.wait()
    print(code, os.waitpid(int(holder), 0)[1], flush=True)
""")


def test_the_holder_keeps_the_old_address_space_past_exec_and_goes_when_let_go() -> None:
    s = Scenario("exec")
    pid = s.holder
    try:
        wait_until(lambda: Path(f"/proc/{s.image}/exe").resolve().name == "sleep", "the exec", timeout=30)
        # exec dropped its reference: the guest mapping lives on, resident, in the holder only
        assert "/memfd:held-guest" in Path(f"/proc/{pid}/maps").read_text()
        assert "/memfd:held-guest" not in Path(f"/proc/{s.image}/maps").read_text()
        assert int(_status(pid, "RssShmem").split()[0]) >= 64 * 1024
        # its only fd is the read end of the pipe; the new image holds the write end
        held = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert len(held) == 1 and next(iter(held)).startswith("pipe:"), held
        assert os.readlink(f"/proc/{s.image}/fd/{s.fd}") in held
        # every signal blocked but those that cannot be (and glibc's own two)
        blocked = int(_status(pid, "SigBlk"), 16)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            assert blocked & (1 << (sig - 1)), sig
        os.kill(pid, signal.SIGTERM)  # a stray signal does not end it
        assert _state(pid) == "S"
        assert _status(pid, "Threads") == "1"
    finally:
        s.kill_image()  # the new image goes: its pipe end closes
    image, holder = s.results()
    assert image == -signal.SIGKILL
    assert os.WIFEXITED(holder) and os.WEXITSTATUS(holder) == 0  # read() saw EOF, then SYS_exit(0)
    assert _state(pid) is None


def test_a_crashed_new_image_does_not_leak_the_holder() -> None:
    s = Scenario("crash")
    image, holder = s.results()
    assert image == -signal.SIGKILL
    assert os.WIFEXITED(holder) and os.WEXITSTATUS(holder) == 0  # EOF ended it, nobody let it go
    assert _state(s.holder) is None


def test_a_deferred_region_closes_its_memfd_and_keeps_its_mapping_until_taken() -> None:
    def mapped(name: str) -> bool:
        return f"/memfd:{name}" in Path("/proc/self/maps").read_text()

    r = region.GuestRegion("deferred-probe", 4 * MiB)
    region.defer_unmaps()
    try:
        r.close()
    finally:
        kept = region.take_deferred()
    assert kept == [(r.hva, 4 * MiB)]
    assert mapped("deferred-probe")  # the mapping stays (for the holder), the fd does not
    fds = [n for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}")]
    assert not any(os.readlink(f"/proc/self/fd/{n}").startswith("/memfd:deferred-probe") for n in fds)
    libc.munmap(r.hva, 4 * MiB)
    assert not mapped("deferred-probe")
    other = region.GuestRegion("undeferred-probe", 4 * MiB)  # deferral ended: close() unmaps again
    other.close()
    assert not mapped("undeferred-probe")
