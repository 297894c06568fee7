"""The command line's value syntax: sizes, CPU and node lists, 32-bit numbers.

Each parser checks the range of the D-Bus type the value goes into, so a value
that cannot be sent is a usage error (exit 2) here, not a marshalling error
from the bus library after the connection is made.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import TypeVar

from kvmnumad import cpulist

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

T = TypeVar("T")


class UsageError(Exception):
    """The command line is wrong; nothing was sent."""


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64M``, ``1G``, ``2GiB`` or ``0x100000``: binary units,
    as `qemu -m` and numactl read them."""
    if text.lower().startswith("0x"):
        try:
            value = int(text, 16)
        except ValueError:
            raise UsageError(f"invalid size {text!r}") from None
    else:
        m = _SIZE_RE.match(text)
        if m is None:
            raise UsageError(f"invalid size {text!r} (use bytes or a K/M/G/T suffix, e.g. 64M)")
        value = int(m.group(1)) << (10 * _UNITS[m.group(2).lower()])
    if value > U64_MAX:
        raise UsageError(f"size {text!r} does not fit in 64 bits")
    return value


def parse_cpulist(text: str) -> list[int]:
    """Sorted indexes from ``0-2,5`` (node lists too), as the project's one
    cpulist parser reads it.  Empty text is refused although the kernel's format
    allows it: on the command line it is a mistake (a pin to nowhere, no allowed
    node), not a value."""
    if not text.strip():
        raise UsageError(f"invalid list {text!r} (expected e.g. 0-2,5)")
    try:
        return sorted(cpulist.parse(text, limit=U32_MAX))
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_u32(text: str) -> int:
    """Any base Python reads (``0x10`` too): vCPU and node numbers come from
    scripts as often as from people."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 <= value <= U32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range 0..{U32_MAX}")
    return value


def argtype(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type: a UsageError then reads like argparse's own
    errors, with the option's name in front."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    # argparse names the type in its message when a parser lets a ValueError out
    wrapped.__name__ = parse.__name__
    return wrapped
