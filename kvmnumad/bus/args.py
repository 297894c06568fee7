"""Argument checks of the D-Bus layer, done before anything is authorized or run.

dbus-fast picks a handler by member *and* signature and answers
``UnknownMethod`` when a client sends, say, ``CreateVM(sii...)``: that hides
a typo behind "no such method".  The dispatcher therefore takes every call by
name and checks the signature here, answering a typed ``InvalidArgument`` that
names both signatures.  Once the signature matches, the wire format guarantees
each value's type; what is left is ranges, names and the ``a{sv}`` options,
whose variants carry a signature of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dbus_fast import Variant

from kvmnumad.errors import InvalidArgument
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.request import check_vm_name


def check_signature(member: str, expected: str, got: str) -> None:
    if got != expected:
        raise InvalidArgument(f"{member} takes arguments ({expected}), got ({got})")


check_name = check_vm_name  # the core's one VM name rule, checked before authorization


def parse_policy(value: str) -> Policy:
    try:
        return Policy(value)
    except ValueError:
        known = ", ".join(p.value for p in Policy)
        raise InvalidArgument(f"unknown policy {value!r} (known: {known})") from None


def check_cpus(cpus: list[int]) -> list[int]:
    """A CPU list must name at least one CPU, each once; whether they are
    online is the core's call (it answers CpuOffline)."""
    if not cpus:
        raise InvalidArgument("the CPU list is empty")
    if len(set(cpus)) != len(cpus):
        raise InvalidArgument(f"the CPU list {cpus} names a CPU twice")
    return list(cpus)


def _payload(path: str) -> str:
    # The daemon reads the file as root: a relative path would be resolved
    # against the daemon's cwd, not the caller's.
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"payload {path!r} must be an absolute path")
    return path


def _host_nodes(nodes: list[int]) -> tuple[int, ...]:
    if len(set(nodes)) != len(nodes):
        raise InvalidArgument(f"host_nodes {nodes} names a node twice")
    return tuple(nodes)


# option -> (variant signature, converter into the CreateOptions field)
OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "numa_nodes": ("u", int),
    "policy": ("s", parse_policy),
    "host_nodes": ("au", _host_nodes),
    "payload": ("s", _payload),
    "prealloc": ("b", bool),
    "start": ("b", bool),
    "allow_split": ("b", bool),
    "passes": ("u", int),
}


def parse_options(options: Mapping[str, Any]) -> CreateOptions:
    """The a{sv} of CreateVM/PlanVM as CreateOptions; unknown keys and
    variants of the wrong type are refused by name, never ignored."""
    fields: dict[str, Any] = {}
    for key, variant in options.items():
        if key not in OPTIONS:
            raise InvalidArgument(f"unknown option {key!r} (known: {', '.join(OPTIONS)})")
        signature, convert = OPTIONS[key]
        if not isinstance(variant, Variant) or variant.signature != signature:
            got = variant.signature if isinstance(variant, Variant) else type(variant).__name__
            raise InvalidArgument(f"option {key!r} must be of type {signature!r}, got {got!r}")
        fields[key] = convert(variant.value)
    return CreateOptions(**fields)
