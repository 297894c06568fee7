"""Performance figures of kvmnumad, each a ratio against a baseline measured in the same run.

Absolute numbers on a shared, nested-KVM, 2-CPU machine mean little; the
same operation done by hand (raw ioctls, a bare syscall, the bus driver's own
round trip) a few milliseconds earlier on the same machine tells what
kvmnumad itself costs.  ``python -m bench`` runs them all and writes
``bench/results.md``.
"""
