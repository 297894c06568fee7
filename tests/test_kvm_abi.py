"""The Python ABI table against the kernel headers, through a C compiler.

A C program built against /usr/include/linux/kvm.h prints every number and
every sizeof/offsetof kvmnumad.kvm.ioctls uses; each must equal Python's.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmnumad.kvm import ioctls
from kvmnumad.kvm.ioctls import Cap, ExitReason, Ioctl

STRUCTS: dict[type[ctypes.Structure], str] = {
    ioctls.KvmRegs: "kvm_regs",
    ioctls.KvmSegment: "kvm_segment",
    ioctls.KvmDtable: "kvm_dtable",
    ioctls.KvmSregs: "kvm_sregs",
    ioctls.KvmUserspaceMemoryRegion: "kvm_userspace_memory_region",
    ioctls.KvmDirtyLog: "kvm_dirty_log",
    ioctls.KvmFpu: "kvm_fpu",
    ioctls.KvmXsave: "kvm_xsave",
    ioctls.KvmXcr: "kvm_xcr",
    ioctls.KvmXcrs: "kvm_xcrs",
    ioctls.KvmMsrEntry: "kvm_msr_entry",
    ioctls.KvmMsrs: "kvm_msrs",
    ioctls.KvmLapicState: "kvm_lapic_state",
    ioctls.KvmMpState: "kvm_mp_state",
    ioctls.KvmVcpuEvents: "kvm_vcpu_events",
}
# kvm_run members inside its exit union: (Python sub-struct, C member prefix)
RUN_EXITS: dict[str, type[ctypes.Structure]] = {
    "io": ioctls.KvmRunIo,
    "mmio": ioctls.KvmRunMmio,
    "fail_entry": ioctls.KvmRunFailEntry,
    "internal": ioctls.KvmRunInternal,
}
C_FIELD_ALIASES = {("kvm_dirty_log", "dirty_bitmap"): "dirty_bitmap"}


def python_values() -> dict[str, int]:
    values: dict[str, int] = {}
    for req in Ioctl:
        values[req.name] = int(req)
    for cap in Cap:
        values[f"KVM_CAP_{cap.name}"] = int(cap)
    for reason in ExitReason:
        values[f"KVM_EXIT_{reason.name}"] = int(reason)
    for name in ("KVM_API_VERSION", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
                 "KVM_NR_INTERRUPTS"):
        values[name] = getattr(ioctls, name)
    for cls, cname in STRUCTS.items():
        values[f"sizeof({cname})"] = ctypes.sizeof(cls)
        for field in cls._fields_:
            values[f"offsetof({cname},{field[0]})"] = getattr(cls, field[0]).offset
    run = ioctls.KvmRun
    for field in run._fields_:
        if field[0] != "exit":
            values[f"offsetof(kvm_run,{field[0]})"] = getattr(run, field[0]).offset
    exit_off = run.exit.offset
    values["offsetof(kvm_run,hw.hardware_exit_reason)"] = exit_off
    for member, cls in RUN_EXITS.items():
        for field in cls._fields_:
            values[f"offsetof(kvm_run,{member}.{field[0]})"] = exit_off + getattr(cls, field[0]).offset
    # The union is 256 bytes in the kernel: what follows it starts where our struct ends.
    values["offsetof(kvm_run,kvm_valid_regs)"] = ctypes.sizeof(run)
    return values


def c_program(names: list[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "#define P(n, v) printf(\"%s %llu\\n\", n, (unsigned long long)(v))",
             "int main(void) {"]
    for name in names:
        if name.startswith("sizeof("):
            expr = f"sizeof(struct {name[7:-1]})"
        elif name.startswith("offsetof("):
            struct, member = name[9:-1].split(",")
            expr = f"offsetof(struct {struct}, {member})"
        else:
            expr = name
        lines.append(f'    P("{name}", {expr});')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and linux-libc-dev")
    tmp = tmp_path_factory.mktemp("kvmabi")
    src, exe = tmp / "abi.c", tmp / "abi"
    src.write_text(c_program(sorted(python_values())))
    subprocess.run([gcc, "-O0", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_number_matches_the_kernel_headers(c_values: dict[str, int]) -> None:
    py = python_values()
    assert len(py) > 150  # the table really covers the structs, not just a few numbers
    mismatches = {k: (v, c_values.get(k)) for k, v in py.items() if c_values.get(k) != v}
    assert mismatches == {}


def test_ioctl_helpers_match_known_numbers() -> None:
    # The reference script ../shared/tools/kvm-smoke uses these literal numbers on this machine.
    assert int(Ioctl.KVM_SET_USER_MEMORY_REGION) == 0x4020AE46
    assert int(Ioctl.KVM_GET_DIRTY_LOG) == 0x4010AE42
    assert int(Ioctl.KVM_GET_SREGS) == 0x8138AE83
    assert int(Ioctl.KVM_SET_REGS) == 0x4090AE82
    assert int(Ioctl.KVM_RUN) == 0xAE80
