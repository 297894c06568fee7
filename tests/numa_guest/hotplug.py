"""CPU hotplug for tests in the numa guest (never on the host: its CPUs are shared)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

CPU_SYSFS = Path("/sys/devices/system/cpu")


def _cpu_online_path(cpu: int) -> Path:
    path = CPU_SYSFS / f"cpu{cpu}" / "online"
    if not path.exists():
        raise ValueError(f"cpu{cpu} cannot be hot-unplugged (no {path})")
    return path


def _cpu_is_online(cpu: int) -> bool:
    return _cpu_online_path(cpu).read_text().strip() == "1"


def _set_cpu_online(cpu: int, online: bool) -> None:
    # The kernel returns from this write only once the CPU is fully up or down.
    _cpu_online_path(cpu).write_text("1" if online else "0")


class CpuHotplug:
    """Offline/online CPUs through sysfs, remembering what to put back.

    ``with cpu_offline(3): ...`` brings cpu3 back on exit; whatever a test
    leaves changed (a plain ``offline()``, a failure in between) is restored
    at fixture teardown, so one test cannot shrink the guest for the next.
    """

    def __init__(self) -> None:
        self._original: dict[int, bool] = {}

    def _remember(self, cpu: int) -> None:
        self._original.setdefault(cpu, _cpu_is_online(cpu))

    def offline(self, cpu: int) -> None:
        self._remember(cpu)
        _set_cpu_online(cpu, False)

    def online(self, cpu: int) -> None:
        self._remember(cpu)
        _set_cpu_online(cpu, True)

    @contextlib.contextmanager
    def __call__(self, cpu: int) -> Iterator[int]:
        was_online = _cpu_is_online(cpu)
        self.offline(cpu)
        try:
            yield cpu
        finally:
            _set_cpu_online(cpu, was_online)

    def restore(self) -> None:
        errors = []
        for cpu, was_online in self._original.items():
            try:
                if _cpu_is_online(cpu) != was_online:
                    _set_cpu_online(cpu, was_online)
            except OSError as e:
                errors.append(f"cpu{cpu}: {e}")
        self._original.clear()
        if errors:
            raise RuntimeError(f"could not restore CPU online state: {'; '.join(errors)}")
