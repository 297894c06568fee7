"""AdoptProcess's a{sv}: each option checked by name and type, before
anyone is asked or anything of the process is read (as CreateVM's are)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from dbus_fast import Variant

from kvmnumad.adopt.discovery import AdoptOptions
from kvmnumad.bus.args import INTEGER_TYPES, parse_policy
from kvmnumad.errors import InvalidArgument
from kvmnumad.request import check_vm_name
from kvmnumad.vm.layout import MAX_GUEST_NODES

MAX_LAYOUT = 1024  # entries of vcpu_nodes / memory_nodes: bounded as every caller-sized value is
SUN_PATH = 107  # bytes of a Unix socket path (sockaddr_un.sun_path less its NUL)


def _string(key: str, variant: Variant) -> str:
    if variant.signature != "s":
        raise InvalidArgument(f"option {key!r} must be of type 's', got {variant.signature!r}")
    return str(variant.value)


def _qmp(key: str, variant: Variant) -> str:
    path = _string(key, variant)
    if not path.startswith("/") or len(os.fsencode(path)) > SUN_PATH:
        raise InvalidArgument(f"option 'qmp' must be an absolute Unix socket path of at most "
                              f"{SUN_PATH} bytes", qmp=path[:200])
    # Whether it exists is not said here: this runs before authorization,
    # and would tell any caller which paths hold what.  QmpClient says it after.
    return path


def _nodes(key: str, variant: Variant) -> tuple[int, ...]:
    element = variant.signature[1:] if variant.signature.startswith("a") else ""
    if element not in INTEGER_TYPES:
        raise InvalidArgument(f"option {key!r} must be an array of integers (au), got {variant.signature!r}")
    values = list(variant.value)
    if len(values) > MAX_LAYOUT:
        raise InvalidArgument(f"option {key!r} has {len(values)} entries, at most {MAX_LAYOUT}")
    for v in values:
        if not 0 <= v < MAX_GUEST_NODES:
            raise InvalidArgument(f"option {key!r}: guest node {v} out of range 0-{MAX_GUEST_NODES - 1}")
    return tuple(int(v) for v in values)


def _bool(key: str, variant: Variant) -> bool:
    if variant.signature != "b":
        raise InvalidArgument(f"option {key!r} must be of type 'b', got {variant.signature!r}")
    return bool(variant.value)


OPTIONS: dict[str, Callable[[str, Variant], Any]] = {
    "name": lambda k, v: check_vm_name(_string(k, v)),
    "policy": lambda k, v: parse_policy(_string(k, v)),
    "qmp": _qmp,
    "vcpu_nodes": _nodes,
    "memory_nodes": _nodes,
    "auto_balance": _bool,
}


def parse_adopt_options(options: Mapping[str, Any]) -> AdoptOptions:
    fields: dict[str, Any] = {}
    for key, variant in options.items():
        if key not in OPTIONS:
            raise InvalidArgument(f"unknown option {key!r} (known: {', '.join(OPTIONS)})")
        if not isinstance(variant, Variant):
            raise InvalidArgument(f"option {key!r} must be a variant, got {type(variant).__name__!r}")
        fields[key] = OPTIONS[key](key, variant)
    return AdoptOptions(**fields)
