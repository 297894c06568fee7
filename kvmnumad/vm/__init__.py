"""A VM and its parts (memory, vCPUs, guest NUMA layout, console, definition)."""

from kvmnumad.vm.vm import Vm

__all__ = ["Vm"]
