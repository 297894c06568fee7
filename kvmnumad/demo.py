"""``make run``: the daemon on its own private bus with a demo VM.

The demo VM is there to be looked at (busctl, kvmnumactl, taskset,
/proc/PID/numa_maps), not to do work, so it must cost nothing while it sits
there: a developer keeps ``make run`` open next to everything else on a
2-CPU machine.  The built-in payload run forever (passes=0) re-touches
every page after a 50 ms HLT and kept both CPUs busy (183 % of one CPU in
/proc/PID/stat).  A pass over one vCPU's 32 MiB costs about 70 ms of CPU on
these nested-KVM machines, so pacing cannot bring it near zero: even one
pass a second would be 4 x 7 % = 28 %.  Instead the demo makes a few passes,
which leave every page resident on its bound node, then writes the done
port: the runner parks each vCPU thread on a condition (state "halted"), and
the threads stay, pinned, at 0 CPU until Stop or Destroy.
"""

from __future__ import annotations

import sys

from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy

DEMO_VM = "demo"
DEMO_VCPUS = 4
DEMO_MEMORY = 128 << 20
# More than one, so that progress visibly counts and the idle path between
# passes (HLT) runs too; few, so that startup costs well under a second of CPU.
DEMO_PASSES = 3


def demo_options(host_nodes: int) -> CreateOptions:
    """LOCAL_FIRST needs a second host node to mean anything; on a one-node
    host the demo's two guest nodes are placed by hand on node 0 (MANUAL)."""
    return CreateOptions(
        numa_nodes=2,
        policy=Policy.LOCAL_FIRST if host_nodes > 1 else Policy.MANUAL,
        start=True,
        allow_split=True,
        passes=DEMO_PASSES,
    )


def create_demo(manager: Manager) -> None:
    """Idempotent, because a restored state dir may already hold the demo VM
    (then it is kept as it was saved, not created twice)."""
    if DEMO_VM in {vm.name for vm in manager.list_vms()}:
        return
    manager.create_vm(DEMO_VM, DEMO_VCPUS, DEMO_MEMORY, demo_options(len(manager.host_nodes())))


if __name__ == "__main__":
    # Imported here, not at the top: kvmnumad.daemon imports this module for create_demo.
    from kvmnumad.daemon import main

    sys.exit(main(["--bus", "private", "--demo", *sys.argv[1:]]))
