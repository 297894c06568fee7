"""The guest's serial output, kept bounded.

vCPU threads append as the guest writes its serial port; a guest that writes
forever must not grow the daemon, so only the last SERIAL_KEEP bytes stay.
"""

from __future__ import annotations

import threading

SERIAL_KEEP = 64 * 1024


class SerialBuffer:
    def __init__(self, keep: int = SERIAL_KEEP) -> None:
        self._keep = keep
        self._data = bytearray()
        self._lock = threading.Lock()

    def append(self, _vcpu: int, data: bytes) -> None:
        """The runner's on_serial callback (called on vCPU threads)."""
        with self._lock:
            self._data += data
            if len(self._data) > self._keep:
                del self._data[: len(self._data) - self._keep]

    def read(self) -> bytes:
        with self._lock:
            return bytes(self._data)
