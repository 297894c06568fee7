"""What persistence keeps of a VM, and the one parser of it.

A definition is the VM's declared intent (layout, regions, declared
placement, running or not), never its effective state: that is re-derived
from the host at restore.  The JSON shape is the state file's format, so it
changes only compatibly; ``from_dict`` checks every field, because a state
file is input like any other (a bad one is moved aside, not trusted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kvmnumad.model import Policy
from kvmnumad.numa.memory import MemPolicy

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RegionDef:
    node: int
    size: int
    gpa: int
    policy: MemPolicy
    host_nodes: tuple[int, ...]


@dataclass(frozen=True)
class VcpuDef:
    vcpu: int
    declared: tuple[int, ...] | None
    bound_node: int | None


@dataclass(frozen=True)
class VmDefinition:
    name: str
    owner: int
    vcpus: int
    policy: Policy
    passes: int
    numa_nodes: int
    node_map: tuple[int, ...]
    regions: tuple[RegionDef, ...]
    vcpu_placement: tuple[VcpuDef, ...]
    running: bool
    # The caller's flat binary, kept beside the definition (StateStore's
    # ``<name>.payload``) and named here by its SHA-256, so a definition and
    # a payload of different saves can never be paired; None: the built-in one.
    payload_sha256: str | None = None
    # Automatic balancing (optimizer/balance.py); None: the policy's default
    # (a definition saved before balancing existed).
    auto_balance: bool | None = None
    explicit_vcpus: tuple[int, ...] = ()  # pinned or bound by a caller: the balancer leaves them
    explicit_nodes: tuple[int, ...] = ()  # guest nodes a caller mapped
    allowed_nodes: tuple[int, ...] = ()  # host nodes the request allowed (the balancer stays there); (): all

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "vcpus": self.vcpus,
            "policy": str(self.policy),
            "passes": self.passes,
            "numa_nodes": self.numa_nodes,
            "node_map": list(self.node_map),
            "regions": [{"node": r.node, "size": r.size, "gpa": r.gpa, "policy": int(r.policy),
                         "host_nodes": list(r.host_nodes)} for r in self.regions],
            "vcpu_placement": [{"vcpu": v.vcpu, "declared": None if v.declared is None else list(v.declared),
                                "bound_node": v.bound_node} for v in self.vcpu_placement],
            "running": self.running,
            "payload_sha256": self.payload_sha256,
            "auto_balance": self.auto_balance,
            "explicit_vcpus": list(self.explicit_vcpus),
            "explicit_nodes": list(self.explicit_nodes),
            "allowed_nodes": list(self.allowed_nodes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmDefinition:
        """Raises ValueError (or TypeError, KeyError) naming what is wrong."""
        try:
            return cls(
                name=_str(d["name"]),
                owner=_uint(d.get("owner", 0)),
                vcpus=_uint(d["vcpus"]),
                policy=Policy(d.get("policy", "manual")),
                passes=_uint(d.get("passes", 0)),
                numa_nodes=_uint(d.get("numa_nodes", 0)),
                node_map=tuple(_uint(x) for x in d.get("node_map", [])),
                regions=tuple(
                    RegionDef(_uint(r["node"]), _uint(r["size"]), _uint(r["gpa"]),
                              MemPolicy(_uint(r["policy"])), tuple(_uint(x) for x in r["host_nodes"]))
                    for r in d.get("regions", [])),
                vcpu_placement=tuple(
                    VcpuDef(_uint(p["vcpu"]),
                            None if p.get("declared") is None else tuple(_uint(c) for c in p["declared"]),
                            None if p.get("bound_node") is None else _uint(p["bound_node"]))
                    for p in d.get("vcpu_placement", [])),
                running=bool(d.get("running", False)),
                payload_sha256=_sha256(d.get("payload_sha256")),
                auto_balance=_optional_bool(d.get("auto_balance")),
                explicit_vcpus=tuple(_uint(x) for x in d.get("explicit_vcpus", [])),
                explicit_nodes=tuple(_uint(x) for x in d.get("explicit_nodes", [])),
                allowed_nodes=tuple(_uint(x) for x in d.get("allowed_nodes", [])),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad VM definition: {type(e).__name__} {e}") from e


def _uint(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _optional_bool(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"expected true, false or null, got {value!r}")
    return value


def _sha256(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"expected a SHA-256 in hex, got {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value
