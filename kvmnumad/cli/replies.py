"""The service's typed replies as the objects kvmnumactl prints.

The bus answers PlanVM and GetStats with arrays of structs (issue 11: busctl
--json and qdbus cannot show integer-keyed maps, and results are never JSON
in a string).  kvmnumactl keeps printing what it printed before that change,
the same keys and nesting for people and for ``--json``, so that a script
reading ``kvmnumactl plan --json`` or ``stats --json`` does not follow the
bus contract's reshaping.  A daemon from before the change (a JSON string,
one a{sv}) is still understood: the client and the daemon are upgraded apart.
"""

from __future__ import annotations

import json
from typing import Any

from kvmnumad.cli.output import plain


def plan_object(reply: list[Any]) -> dict[str, Any]:
    """PlanVM's (policy, nodes, vcpus) as the plan object: nodes with their
    bytes per host node, vCPUs with their CPUs."""
    if len(reply) == 1 and isinstance(reply[0], str):  # an older daemon: the object as JSON text
        parsed = json.loads(reply[0])
        return parsed if isinstance(parsed, dict) else {"plan": parsed}
    policy, nodes, vcpus = plain(reply)
    return {
        "policy": policy,
        "nodes": [
            {
                "guest_node": guest_node,
                "host_nodes": host_nodes,
                "mempolicy": mempolicy,
                "bytes": size,
                "per_host_node": {str(host): n for host, n in per_host},
            }
            for guest_node, host_nodes, mempolicy, size, per_host in nodes
        ],
        "vcpus": [{"vcpu": v, "guest_node": node, "cpus": cpus} for v, node, cpus in vcpus],
    }


def stats_object(reply: list[Any]) -> dict[str, Any]:
    """GetStats' (exits, vcpus, pages per host node, dirty pages) as one
    object: per-vCPU figures as ``vcpu_*`` maps keyed by vCPU number, which
    is what ``stats`` turns into its table."""
    if len(reply) == 1:  # an older daemon: the a{sv} of maps already
        value = plain(reply[0])
        return value if isinstance(value, dict) else {"stats": value}
    exits, vcpus, pages, dirty = plain(reply)
    by_vcpu: dict[str, dict[str, Any]] = {
        k: {} for k in ("tid", "cpu_time_ns", "current_cpu", "exits", "progress")
    }
    for vcpu, tid, cpu_time, current, vcpu_exits, progress in vcpus:
        values = (tid, cpu_time, current, dict(vcpu_exits), progress)
        for column, value in zip(by_vcpu.values(), values, strict=True):
            column[str(vcpu)] = value
    return {
        "exits": dict(exits),
        **{f"vcpu_{k}": v for k, v in by_vcpu.items()},
        "pages_per_host_node": {str(node): n for node, n in pages},
        "dirty_pages": dirty,
    }
