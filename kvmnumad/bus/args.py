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

from kvmnumad.bus.fds import PassedFd
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


def _payload(key: str, variant: Variant) -> PassedFd:
    """The payload is an fd the caller opened (``h``): the caller's rights
    decide what it can read.  A path (``s``) is refused, since the daemon would
    open it as root (issue 12 finding 1: /etc/shadow was loaded that way)."""
    if variant.signature == "s":
        raise InvalidArgument(f"option {key!r} takes a file descriptor (type 'h') of a file you opened, "
                              "not a path: the daemon does not open files for callers")
    if variant.signature != "h":
        raise InvalidArgument(f"option {key!r} must be of type 'h' (a file descriptor), "
                              f"got {variant.signature!r}")
    if not isinstance(variant.value, PassedFd):
        raise InvalidArgument(f"option {key!r}: the message carries no file descriptor for it")
    return variant.value


def _host_nodes(nodes: list[int]) -> tuple[int, ...]:
    if len(set(nodes)) != len(nodes):
        raise InvalidArgument(f"host_nodes {nodes} names a node twice")
    return tuple(nodes)


# An integer option may come as any D-Bus integer type: gdbus and GLib send
# a plain ``2`` as int32, Qt as int, busctl as what the caller typed.  The
# value decides, not the wire type: it must fit the option's declared one.
INTEGER_TYPES = frozenset("ynqiuxt")
_UINT32_MAX = (1 << 32) - 1


def _uint32(key: str, value: int) -> int:
    if not 0 <= value <= _UINT32_MAX:
        raise InvalidArgument(f"option {key!r}: {value} does not fit its type 'u' (0..{_UINT32_MAX})",
                              value=value)
    return value


def _integer(key: str, variant: Variant) -> int:
    if variant.signature not in INTEGER_TYPES:
        raise InvalidArgument(f"option {key!r} must be an integer ('u' or any of y n q i x t), "
                              f"got {variant.signature!r}")
    return _uint32(key, variant.value)


def _integer_array(key: str, variant: Variant) -> list[int]:
    element = variant.signature[1:] if variant.signature.startswith("a") else ""
    if element not in INTEGER_TYPES:
        raise InvalidArgument(f"option {key!r} must be an array of integers ('au' or a of y n q i x t), "
                              f"got {variant.signature!r}")
    values = list(variant.value)  # 'ay' arrives as bytes
    return [_uint32(key, v) for v in values]


def _typed(signature: str) -> Callable[[str, Variant], Any]:
    def check(key: str, variant: Variant) -> Any:
        if variant.signature != signature:
            raise InvalidArgument(f"option {key!r} must be of type {signature!r}, got {variant.signature!r}")
        return variant.value

    return check


# option -> (reads the variant, converter into the CreateOptions field)
OPTIONS: dict[str, tuple[Callable[[str, Variant], Any], Callable[[Any], Any]]] = {
    "numa_nodes": (_integer, int),
    "policy": (_typed("s"), parse_policy),
    "host_nodes": (_integer_array, _host_nodes),
    "payload": (_payload, lambda fd: fd),
    "prealloc": (_typed("b"), bool),
    "start": (_typed("b"), bool),
    "allow_split": (_typed("b"), bool),
    "passes": (_integer, int),
}


def parse_options(options: Mapping[str, Any]) -> CreateOptions:
    """The a{sv} of CreateVM/PlanVM as CreateOptions; unknown keys and
    variants of the wrong type are refused by name, never ignored."""
    fields: dict[str, Any] = {}
    for key, variant in options.items():
        if key not in OPTIONS:
            raise InvalidArgument(f"unknown option {key!r} (known: {', '.join(OPTIONS)})")
        read, convert = OPTIONS[key]
        if not isinstance(variant, Variant):
            raise InvalidArgument(f"option {key!r} must be a variant, got {type(variant).__name__!r}")
        fields[key] = convert(read(key, variant))
    return CreateOptions(**fields)


def optional_policy(value: str) -> Policy | None:
    """A plain policy argument: empty means the DefaultPolicy, as a missing
    'policy' option does."""
    return parse_policy(value) if value else None


def simple_options(numa_nodes: int, policy: Policy | None, start: bool = False) -> CreateOptions:
    """The plain arguments of CreateVMSimple/PlanVMSimple, for clients that
    cannot build an a{sv} (dbus-send, qdbus)."""
    return CreateOptions(numa_nodes=numa_nodes, policy=policy, start=start)
