"""StateStore: atomic saves that survive kill -9, corrupt files moved aside and logged."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmnumad.journal import MESSAGE_IDS, EventKind, setup_logging
from kvmnumad.state import StateStore

if TYPE_CHECKING:
    from tests.sysfixtures import Journal

pytest_plugins = ["tests.sysfixtures"]

WEB = {
    "name": "web",
    "vcpus": 4,
    "memory": 1 << 30,
    "options": {"numa_nodes": 2, "policy": "manual"},
    "node_map": [0, 0],
    "affinity": {"0": [0], "1": [1]},
    "bindings": {"2": 1},
}


def test_save_load_remove(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.load_all() == []
    store.save("web", WEB)
    store.save("db", {"name": "db", "vcpus": 1})
    assert store.load_all() == [{"name": "db", "vcpus": 1}, WEB]  # sorted by name
    store.save("web", {**WEB, "vcpus": 8})
    assert [d["vcpus"] for d in store.load_all()] == [1, 8]
    store.remove("db")
    store.remove("db")  # twice is fine
    assert store.load_all() == [{**WEB, "vcpus": 8}]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["web.json"]  # no temporaries left
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65])
def test_names_cannot_escape_the_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        StateStore(tmp_path).save(name, {})


def test_unserializable_definition_leaves_old_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("web", WEB)
    with pytest.raises(TypeError):
        store.save("web", {"name": "web", "bad": object()})
    assert store.load_all() == [WEB]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.json"]


def test_kill_9_during_saves_leaves_old_or_new(tmp_path: Path) -> None:
    """A writer killed at a random point: every file is still one whole definition."""
    writer = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from kvmnumad.state import StateStore
        store = StateStore(Path({str(tmp_path)!r}))
        i = 0
        print("go", flush=True)
        while True:
            i += 1
            store.save("web", {{"name": "web", "generation": i, "pad": "x" * 65536}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None and proc.stdout.readline() == "go\n"
    try:
        proc.wait(0.5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    definitions = StateStore(tmp_path).load_all()
    assert len(definitions) == 1 and definitions[0]["generation"] >= 1
    assert len(definitions[0]["pad"]) == 65536
    assert not list(tmp_path.glob("*.corrupt-*"))
    assert not list(tmp_path.glob(".*.tmp"))  # a torn temporary is cleaned, never loaded


def test_corrupt_files_are_moved_aside_and_logged(tmp_path: Path, journald: Journal,
                                                  restore_logging: None) -> None:
    setup_logging("info")
    tag = secrets.token_hex(3)
    store = StateStore(tmp_path)
    good, torn, wrong, named, deep = (f"{kind}-{tag}" for kind in ("good", "torn", "list", "named", "deep"))
    store.save(good, {"name": good, "vcpus": 2})
    (tmp_path / f"{torn}.json").write_text('{"name": "' + torn + '", "vcp')
    (tmp_path / f"{wrong}.json").write_text("[1, 2]")
    (tmp_path / f"{named}.json").write_text(json.dumps({"name": "someone-else"}))
    # valid JSON nested deeper than the parser's recursion limit: a RecursionError,
    # which used to end the daemon at every start
    (tmp_path / f"{deep}.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "notes.txt").write_text("ignored")

    assert store.load_all() == [{"name": good, "vcpus": 2}]
    left = sorted(p.name for p in tmp_path.iterdir())
    for bad in (torn, wrong, named, deep):
        assert len([n for n in left if n.startswith(f"{bad}.corrupt-")]) == 1, left
        assert f"{bad}.json" not in left
        entry = journald.entries(f"KVMNUMA_VM={bad}")[0]
        assert entry["MESSAGE_ID"] == MESSAGE_IDS[EventKind.STATE_CORRUPT]
        assert entry["PRIORITY"] == "3"
        assert "corrupt-" in entry["MESSAGE"]
    # A second start finds a clean directory: no crash loop, nothing logged again.
    assert store.load_all() == [{"name": good, "vcpus": 2}]
