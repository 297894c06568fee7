"""Guest code: the built-in page-touching payload, and loading a user's flat binary.

The payload is 32-bit flat protected-mode code (entered by
``VcpuFd.setup_flat32``) assembled here byte by byte, so kvmnumad needs no
assembler.  Its inputs are registers:

    EBX  guest-physical base of its node's memory
    ECX  bytes to touch (0 allowed; a multiple of 4 KiB, else the last dword may overrun)
    ESI  vCPU index (its serial character is '0' + index, modulo 256)
    EDI  passes to make, 0 = forever

Each pass writes the pass number (a dword) to the start of every 4 KiB page
of [EBX, EBX+ECX), then reports: ``out 0x510, eax`` (passes done so far),
one byte to the serial port 0x3f8, and HLT, which is the idle point between
passes (without an in-kernel irqchip it exits to user space, which sleeps).
After EDI passes it writes the count to 0x511 and halts for good in a loop.
The code touches no stack and no memory besides the pages above.
"""

from __future__ import annotations

import os
import stat
import struct

from kvmnumad.libc import PAGE_SIZE

PROGRESS_PORT = 0x510
DONE_PORT = 0x511
SERIAL_PORT = 0x3F8
MAX_FLAT_BINARY = 16 * 1024 * 1024


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


_SHORT_JUMPS = {"jz": 0x74, "je": 0x74, "ja": 0x77, "jmp": 0xEB}

# (label, instruction bytes or (short jump, target label), assembly) -- one line per instruction.
_TOUCH_SOURCE: list[tuple[str, bytes | tuple[str, str], str]] = [
    ("", b"\x31\xc0", "xor eax, eax        ; passes done = 0"),
    ("pass", b"\x89\xda", "mov edx, ebx        ; cursor = base"),
    ("", b"\x89\xcd", "mov ebp, ecx        ; bytes left = size"),
    ("touch", b"\x85\xed", "test ebp, ebp"),
    ("", ("jz", "passdone"), "jz passdone         ; size 0: nothing to touch"),
    ("", b"\x89\x02", "mov [edx], eax      ; dirty this page"),
    ("", b"\x81\xc2" + _u32(PAGE_SIZE), "add edx, 4096       ; next page"),
    ("", b"\x81\xed" + _u32(PAGE_SIZE), "sub ebp, 4096"),
    ("", ("ja", "touch"), "ja touch            ; bytes left > 0 (no borrow, not zero)"),
    ("passdone", b"\x40", "inc eax"),
    ("", b"\x66\xba" + _u16(PROGRESS_PORT), "mov dx, 0x510"),
    ("", b"\xef", "out dx, eax         ; progress = passes done"),
    ("", b"\x89\xc5", "mov ebp, eax        ; keep the count"),
    ("", b"\x89\xf0", "mov eax, esi"),
    ("", b"\x04\x30", "add al, '0'         ; '0' + vCPU index"),
    ("", b"\x66\xba" + _u16(SERIAL_PORT), "mov dx, 0x3f8"),
    ("", b"\xee", "out dx, al          ; one serial byte per pass"),
    ("", b"\x89\xe8", "mov eax, ebp"),
    ("", b"\x39\xf8", "cmp eax, edi        ; never equal when edi = 0"),
    ("", ("je", "done"), "je done"),
    ("", b"\xf4", "hlt                 ; idle point between passes"),
    ("", ("jmp", "pass"), "jmp pass"),
    ("done", b"\x66\xba" + _u16(DONE_PORT), "mov dx, 0x511"),
    ("", b"\xef", "out dx, eax         ; all passes done"),
    ("halt", b"\xf4", "hlt"),
    ("", ("jmp", "halt"), "jmp halt            ; halted for good"),
]


def _assemble(source: list[tuple[str, bytes | tuple[str, str], str]]) -> bytes:
    """Two passes: every jump is short (2 bytes), so pass one knows all label offsets."""
    labels: dict[str, int] = {}
    at = 0
    for label, insn, _ in source:
        if label:
            labels[label] = at
        at += 2 if isinstance(insn, tuple) else len(insn)
    code = bytearray()
    for _, insn, asm in source:
        if isinstance(insn, tuple):
            mnemonic, target = insn
            rel = labels[target] - (len(code) + 2)
            if not -128 <= rel <= 127:
                raise ValueError(f"{asm}: target out of short-jump range")
            code += bytes([_SHORT_JUMPS[mnemonic], rel & 0xFF])
        else:
            code += insn
    return bytes(code)


TOUCH_PAYLOAD: bytes = _assemble(_TOUCH_SOURCE)


def touch_payload_regs(base: int, size: int, vcpu_index: int, passes: int) -> dict[str, int]:
    """The register values ``VcpuFd.setup_flat32`` needs for TOUCH_PAYLOAD."""
    for name, value in (("base", base), ("size", size), ("vcpu_index", vcpu_index), ("passes", passes)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"payload {name}={value:#x} does not fit in 32 bits")
    if base + size > 1 << 32:
        raise ValueError(f"payload range {base:#x}+{size:#x} beyond 4 GiB: 32-bit code cannot reach it")
    return {"rbx": base, "rcx": size, "rsi": vcpu_index, "rdi": passes}


def load_flat_binary(path: str, max_size: int = MAX_FLAT_BINARY) -> bytes:
    """A flat binary the daemon itself ships or a test made (opened by path, as
    whoever runs this): never a path a caller names, which ``read_flat_binary``
    is for."""
    with open(path, "rb") as f:
        return read_flat_binary(f.fileno(), max_size)


def read_flat_binary(fd: int, max_size: int = MAX_FLAT_BINARY) -> bytes:
    """A user-supplied flat binary from an fd the *caller* opened, so the
    caller's own permissions decided what could be read, never the daemon's.

    Only a regular file: a FIFO, socket or device could block the reading
    thread for good or never end, and fstat says which before any read.  At
    most ``max_size + 1`` bytes are read (pread from offset 0, whatever the
    caller's file offset), so a file that grows while read is refused, not
    loaded whole.  Raises ValueError naming only sizes and the file type, since
    the caller already knows the file and nobody else should learn about it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"must be a regular file, got a {_file_type(st.st_mode)}")
    if st.st_size == 0:
        raise ValueError("flat binary is empty")
    if st.st_size > max_size:
        raise ValueError(f"flat binary is {st.st_size} bytes, more than {max_size}")
    chunks: list[bytes] = []
    got = 0
    while got <= max_size:
        chunk = os.pread(fd, max_size + 1 - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    if len(data) != st.st_size:
        raise ValueError(f"flat binary changed size while read ({st.st_size} -> {len(data)} bytes)")
    return data


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"
