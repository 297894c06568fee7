"""The built-in payload: its bytes decode to what its comments say, and on the real
/dev/kvm it dirties exactly its pages and reports on its ports."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnumad.kvm.ioctls import ExitReason
from kvmnumad.kvm.payload import (
    _TOUCH_SOURCE,
    DONE_PORT,
    PROGRESS_PORT,
    SERIAL_PORT,
    TOUCH_PAYLOAD,
    load_flat_binary,
    touch_payload_regs,
)
from kvmnumad.kvm.system import Kvm
from tests.test_kvm_helpers import BOOT_SIZE, DATA_GPA, ENTRY, guest


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


def test_objdump_agrees_with_the_comments(tmp_path: Path) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs binutils")
    binary = tmp_path / "payload.bin"
    binary.write_bytes(TOUCH_PAYLOAD)
    out = subprocess.run([objdump, "-D", "-b", "binary", "-m", "i386", "-M", "intel", str(binary)],
                         check=True, capture_output=True, text=True).stdout
    decoded = [m.group(1).split()[0] for m in re.finditer(r"^\s*[0-9a-f]+:\s+(?:[0-9a-f]{2} )+\s*(.+)$",
                                                          out, re.MULTILINE)]
    written = [asm.split()[0] for _, _, asm in _TOUCH_SOURCE]
    aliases = {"jz": "je"}  # objdump spells jz as je
    assert decoded == [aliases.get(m, m) for m in written]




@pytest.mark.parametrize("size", [0, 4096, 2 << 20])
def test_passes_dirty_every_page_and_report_on_ports(kvm: Kvm, size: int) -> None:
    passes = 3
    with guest(kvm, TOUCH_PAYLOAD, data_size=max(size, 4096)) as (vm, vcpu, data):
        assert data is not None
        vcpu.setup_flat32(ENTRY, **touch_payload_regs(DATA_GPA, size, 5, passes))
        outs: list[tuple[int, int]] = []
        reasons: list[ExitReason] = []
        while not outs or outs[-1][0] != DONE_PORT:
            reason = vcpu.run()
            reasons.append(reason)
            assert reason in (ExitReason.IO, ExitReason.HLT), reason
            if reason is ExitReason.IO:
                io = vcpu.io_exit()
                assert io.is_out and io.count == 1
                outs.append((io.port, io.value))
            assert len(reasons) < 100
        assert outs == [
            (PROGRESS_PORT, 1), (SERIAL_PORT, ord("5")),
            (PROGRESS_PORT, 2), (SERIAL_PORT, ord("5")),
            (PROGRESS_PORT, 3), (SERIAL_PORT, ord("5")),
            (DONE_PORT, 3),
        ]
        assert reasons.count(ExitReason.HLT) == passes - 1  # idle points between passes only
        assert vm.count_dirty(1, data.size) == size // 4096
        # The payload writes nothing in the boot slot; the host's kvm-pvm reports 0 pages,
        # nested kvm_amd (in the multi-NUMA guest) 1: allow at most that one page.
        assert vm.count_dirty(0, BOOT_SIZE) <= 1
        # The last pass wrote its number (2, counting from 0) at the start of each page.
        for page in range(size // 4096):
            assert data.map[page * 4096 : page * 4096 + 8] == b"\x02\0\0\0\0\0\0\0"
        # After the done port, the guest stays in its hlt loop.
        assert [vcpu.run(), vcpu.run()] == [ExitReason.HLT, ExitReason.HLT]


def test_payload_regs_refuse_what_32_bit_code_cannot_reach() -> None:
    regs = touch_payload_regs(0x100000, 0x200000, 1, 0)
    assert regs == {"rbx": 0x100000, "rcx": 0x200000, "rsi": 1, "rdi": 0}
    with pytest.raises(ValueError, match="0x100000000"):
        touch_payload_regs(1 << 32, 4096, 0, 0)
    with pytest.raises(ValueError, match="beyond 4 GiB"):
        touch_payload_regs(0xFFFFF000, 0x2000, 0, 0)
    with pytest.raises(ValueError, match="passes"):
        touch_payload_regs(0, 0, 0, -1)


def test_load_flat_binary_checks_size(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"\xf4")
    assert load_flat_binary(str(good)) == b"\xf4"
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_flat_binary(str(empty))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x90" * (BOOT_SIZE - ENTRY + 1))
    with pytest.raises(ValueError, match=str(BOOT_SIZE - ENTRY + 1)):
        load_flat_binary(str(big), max_size=BOOT_SIZE - ENTRY)
    with pytest.raises(FileNotFoundError):
        load_flat_binary(str(tmp_path / "missing.bin"))
