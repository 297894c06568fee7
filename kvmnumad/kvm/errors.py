"""The one error type of the KVM layer: an errno plus the ioctl that produced it.

It is an OSError so that ``err.errno`` works as everywhere else; the message
names the request, because "Invalid argument" alone does not say which of the
dozen ioctls of a VM start refused.
"""

from __future__ import annotations

import os


class KvmError(OSError):
    """A KVM ioctl (or a check standing in for one) failed with ``errno``."""

    def __init__(self, errno: int, ioctl: str, detail: str = "") -> None:
        self.ioctl = ioctl
        message = f"{ioctl}: {os.strerror(errno)}"
        if detail:
            message += f" ({detail})"
        super().__init__(errno, message)
