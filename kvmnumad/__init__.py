"""kvmnumad: KVM virtual machines with NUMA-aware placement, controlled over D-Bus."""

__version__ = "0.1.0"
