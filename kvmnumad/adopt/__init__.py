"""Adopted VMs: KVM guests run by another VMM process (QEMU, cloud-hypervisor,
Firecracker) that kvmnumad places but does not own.

``procfs`` and ``qmp`` discover what the process is (its vCPU threads, its
guest memory, its guest NUMA layout); ``vm`` is the adopted VM the Manager
holds beside its own; ``watch`` ends an adoption when the process exits;
``records`` keeps adoptions across a daemon restart; ``autoadopt`` adopts
configured processes as the kernel reports them (proc connector).
"""
