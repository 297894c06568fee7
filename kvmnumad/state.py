"""VM definitions on disk, so a restarted daemon defines its VMs again.

One JSON file per VM (``<name>.json``) in the state directory
(``/var/lib/kvmnumad`` under systemd's ``StateDirectory=``).  A write is
atomic: a temporary file in the same directory is written and fsynced, renamed
over the old one, and the directory is fsynced, so after a crash or kill -9
each file holds either the old or the new definition, never half of one.

Reading never raises for bad content: a corrupt file is moved aside to
``<name>.corrupt-<UTC timestamp>`` and logged (event ``state-corrupt``), so one
bad file cannot turn the daemon into a restart loop.  Every method blocks on
fsync: call them off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kvmnumad import crashpoints
from kvmnumad.errors import InvalidArgument
from kvmnumad.journal import EventKind, log_event
from kvmnumad.request import check_vm_name

log = logging.getLogger(__name__)

SUFFIX = ".json"
PAYLOAD_SUFFIX = ".payload"  # a VM's own flat binary, beside its definition


class StateStore:
    """The VM definitions kept in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        # The name becomes a file name: the VM name rule keeps '/' and '..' out.
        try:
            check_vm_name(name)
        except InvalidArgument as e:
            raise ValueError(f"invalid VM name for a state file: {name!r}") from e
        return self.directory / (name + SUFFIX)

    def save(self, name: str, definition: dict[str, Any]) -> None:
        """Replace the definition of ``name`` atomically (write, fsync, rename, fsync dir)."""
        data = (json.dumps(definition, indent=2, sort_keys=True) + "\n").encode()
        self._write(self.path(name), name, data)

    def payload_path(self, name: str) -> Path:
        return self.path(name).with_suffix(PAYLOAD_SUFFIX)

    def save_payload(self, name: str, data: bytes) -> None:
        """The VM's flat binary, atomically like a definition.  Written before
        the definition that names it (by hash), so a crash between the two
        leaves the old definition, which never names this payload."""
        self._write(self.payload_path(name), name, data)

    def load_payload(self, name: str) -> bytes | None:
        """The saved flat binary of ``name``; None when there is none."""
        try:
            return self.payload_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, target: Path, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            crashpoints.reached("state.written")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._sync_dir()

    def remove(self, name: str) -> None:
        """Forget ``name`` and its payload; absent already is fine (destroy after a failed save)."""
        removed = False
        for path in (self.path(name), self.payload_path(name)):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            self._sync_dir()

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable definition, sorted by file name; corrupt files moved aside and logged."""
        definitions: list[dict[str, Any]] = []
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                # Left by a save that died before its rename: the old file is intact.
                entry.unlink(missing_ok=True)
                continue
            if entry.suffix != SUFFIX or entry.name.startswith("."):
                continue
            name = entry.name[: -len(SUFFIX)]
            try:
                definition = json.loads(entry.read_bytes())
                if not isinstance(definition, dict):
                    raise ValueError(f"top level is {type(definition).__name__}, not an object")
                if definition.get("name", name) != name:
                    raise ValueError(f"names VM {definition.get('name')!r}, file is {entry.name}")
            # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting is a RecursionError
            except (OSError, ValueError, RecursionError) as e:
                self._move_aside(entry, name, e)
                continue
            definitions.append(definition)
        return definitions

    def move_aside(self, name: str, error: Exception) -> None:
        """A definition that parsed as JSON but is not a valid VM: out of the way, reported."""
        self._move_aside(self.path(name), name, error)

    def _move_aside(self, entry: Path, name: str, error: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.directory / f"{name}.corrupt-{stamp}"
        n = 1
        while aside.exists():
            aside = self.directory / f"{name}.corrupt-{stamp}.{n}"
            n += 1
        try:
            os.replace(entry, aside)
            self._sync_dir()
            where = f"moved to {aside.name}"
        except OSError as e:
            where = f"could not be moved aside ({e}), skipped"
        log_event(
            EventKind.STATE_CORRUPT,
            f"state file {entry} is unreadable ({error}); {where}",
            vm=name,
            reason=str(error),
            level=logging.ERROR,
        )

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
