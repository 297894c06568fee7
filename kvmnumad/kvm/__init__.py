"""The KVM layer: one class per kernel fd (Kvm -> VmFd -> VcpuFd), the guest
payload, and the thread that runs each vCPU.  Knows nothing of NUMA or D-Bus."""

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import KVM_MEM_LOG_DIRTY_PAGES, Cap, ExitReason
from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vcpu import IoExit, VcpuFd
from kvmnumad.kvm.vm import VmFd

__all__ = ["KVM_MEM_LOG_DIRTY_PAGES", "Cap", "ExitReason", "IoExit", "Kvm", "KvmError", "VcpuFd", "VmFd"]
