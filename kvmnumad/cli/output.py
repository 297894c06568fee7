"""What kvmnumactl prints: aligned tables for people, one JSON document per
line for scripts, and D-Bus values as short text.

Values are formatted from their D-Bus signature rather than per property, so
that a property the service adds later prints sensibly without a change here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dbus_fast import SignatureTree, SignatureType, Variant

from kvmnumad import cpulist

_NUMBERS = "uiqnyt"


def plain(value: Any) -> Any:
    """Variants unwrapped all the way down, so json.dumps takes the result."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return list(value)
    return value


def print_json(value: Any) -> None:
    # flushed: `kvmnumactl ... --json | jq` must not wait for the buffer to fill
    print(json.dumps(plain(value)), flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], legend: str | None = None) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if legend is not None:
        print(f"\n{legend}")


def human_bytes(n: int) -> str:
    """Binary units with one decimal, as machinectl and free -h print sizes."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("K", "M", "G", "T", "P"):
        value /= 1024
        if value < 1024 or unit == "P":
            break
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def format_value(signature: str, value: Any, name: str = "") -> str:
    """One D-Bus value as a line of text, driven by its signature: structs join with
    ':', arrays with ' ', CPU sets print as cpulists."""
    return _fmt(SignatureTree(signature).types[0], plain(value), name)


def _fmt(t: SignatureType, value: Any, name: str) -> str:
    token = t.token
    if token == "b":
        return "yes" if value else "no"
    if token == "v":
        return json.dumps(value)
    if token == "(":
        return ":".join(_fmt_in_struct(c, v) for c, v in zip(t.children, value, strict=False))
    if token == "a":
        child = t.children[0]
        if child.token == "{":
            return " ".join(f"{k}={_fmt(child.children[1], v, str(k))}" for k, v in value.items())
        if child.token in _NUMBERS and "cpu" in name.lower():
            return cpulist.format(value)
        return " ".join(_fmt(child, v, name) for v in value)
    return str(value)


def _fmt_in_struct(t: SignatureType, value: Any) -> str:
    # an array of numbers inside a struct is a CPU set in this API (VcpuAffinity, topology)
    if t.token == "a" and t.children[0].token in _NUMBERS:
        return cpulist.format(value) if value else "-"
    return _fmt(t, value, "")


def format_property(name: str, variant: Variant) -> str:
    """The two properties whose generic form would be unreadable get their own;
    the rest follow their signature."""
    value = plain(variant)
    if name == "MemoryRegions":
        # the host virtual address, a sixth field, leaves the contract (issue 11): printed while it is sent
        return "; ".join(
            f"slot {slot} gpa={gpa:#x} size={human_bytes(size)} guest-node={gn} host-node={hn}"
            + "".join(f" hva={a:#x}" for a in hva)
            for slot, gpa, size, gn, hn, *hva in value
        )
    if name == "VcpuNodes":
        return " ".join(f"{v}:{node}{'(bound)' if bound else ''}" for v, bound, node in value)
    return format_value(variant.signature, value, name)


def flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    """Nested stats (a{sv} of a{sv} ...) as dotted keys, one value per line, so
    that grep and cut read them."""
    value = value.value if isinstance(value, Variant) else value
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict | Variant) for v in value):
        out = []
        for i, v in enumerate(value):
            out += flatten(f"{prefix}.{i}", v)
        return out
    if isinstance(value, list):
        return [(prefix, " ".join(str(plain(v)) for v in value))]
    if isinstance(value, bool):
        return [(prefix, "yes" if value else "no")]
    return [(prefix, str(value))]
