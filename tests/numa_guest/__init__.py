"""Multi-NUMA guest harness: boots a QEMU guest per topology and runs the numa tests in it."""

from .topology import TOPOLOGIES, Node, Topology

__all__ = ["TOPOLOGIES", "Node", "Topology"]
