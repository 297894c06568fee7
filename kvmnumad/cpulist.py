"""The kernel's list format (``0-3,8,10-11``), used for CPUs and nodes alike.

One home for it: sysfs and cpuset files, journal fields, messages and the
command line all speak it, and two parsers that disagree on ``3-1`` or a
trailing newline would make the same text mean two things.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_PART = re.compile(r"(\d+)(?:-(\d+))?")


def parse(text: str, *, limit: int | None = None) -> frozenset[int]:
    """Indexes of ``text``; surrounding white space and empty text are allowed
    (the kernel writes ``"\\n"`` for an empty set).  Raises ValueError naming
    the bad part, and for an index above ``limit``."""
    ids: set[int] = set()
    body = text.strip()
    if not body:
        return frozenset()
    for raw in body.split(","):
        part = raw.strip()
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"invalid list {text.strip()!r} (expected e.g. 0-2,5)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"invalid range {part!r} in {text.strip()!r}")
        if limit is not None and hi > limit:
            raise ValueError(f"index {hi} in {text.strip()!r} is above {limit}")
        ids.update(range(lo, hi + 1))
    return frozenset(ids)


def format(ids: Iterable[int]) -> str:
    """Inverse of parse: runs collapsed, sorted, no spaces (as the kernel and taskset print it)."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def describe(ids: Iterable[int]) -> str:
    """For messages: an empty set reads as ``(none)``, not as nothing."""
    return format(ids) or "(none)"
