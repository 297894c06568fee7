"""Typed errors of the kvmnumad core.

Every failure a caller can cause has its own class, so that a front end (the
D-Bus layer, the CLI) maps it by type, never by parsing a message.  The class
name is the stable part: the bus layer publishes it as
``org.kvmnuma1.Error.<ClassName>``.  Messages name the offending value, because
"invalid argument" alone sends an admin to the source code.
"""

from __future__ import annotations


class KvmnumaError(Exception):
    """Base of every error the core raises on purpose.

    ``values`` holds the offending values by name (``vcpus=300, maximum=256``)
    so that a front end or a test can use them without parsing the text.
    """

    def __init__(self, message: str = "", **values: object) -> None:
        super().__init__(message)
        self.values = values


class InvalidArgument(KvmnumaError):
    """A value is malformed or out of its documented range."""


class QuotaExceeded(KvmnumaError):
    """The caller's uid would pass one of its quotas (quotas.py): ``values``
    name the limit (``limit``: vms, vcpus, memory or regions), its ``maximum``
    and the ``used`` amount, and the message says the same."""


class NoSuchVM(KvmnumaError):
    """No VM of that name exists."""


class NoSuchVcpu(KvmnumaError):
    """The VM has no vCPU with that index."""


class NumaDisabled(KvmnumaError):
    """The operation needs guest NUMA, which is off for this VM (or on the host)."""


class NodeOutOfRange(KvmnumaError):
    """A guest or host NUMA node index does not exist."""


class CpuOffline(KvmnumaError):
    """A host CPU exists but is offline (one the host does not have is InvalidArgument)."""


class Overlap(KvmnumaError):
    """A guest-physical range overlaps an existing memory slot."""


class InsufficientMemory(KvmnumaError):
    """A host node (or the KVM slot table) cannot hold what was asked."""


class AlreadyExists(KvmnumaError):
    """A VM of that name exists already."""


class Busy(KvmnumaError):
    """The object is in a state that forbids the operation (running, has memory, ...)."""


class ResourceExhausted(KvmnumaError):
    """The host ran out of a kernel resource other than memory: file
    descriptors, threads, KVM VMs or vCPUs."""


class LimitReached(KvmnumaError):
    """The caller has too many calls in flight (per connection or per uid), or makes too many per second:
    answered at once, so that one caller cannot starve the others; try again."""


class KvmUnavailable(KvmnumaError):
    """/dev/kvm cannot be opened or lacks a capability kvmnumad needs."""


class AccessDenied(KvmnumaError):
    """The caller is not authorized (front ends map this to their own denial error)."""


class Internal(KvmnumaError):
    """An unexpected failure; logged with its traceback, reported without it."""


ERROR_TYPES: tuple[type[KvmnumaError], ...] = (
    InvalidArgument,
    QuotaExceeded,
    NoSuchVM,
    NoSuchVcpu,
    NumaDisabled,
    NodeOutOfRange,
    CpuOffline,
    Overlap,
    InsufficientMemory,
    AlreadyExists,
    Busy,
    ResourceExhausted,
    LimitReached,
    KvmUnavailable,
    AccessDenied,
    Internal,
)
