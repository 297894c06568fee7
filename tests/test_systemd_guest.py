"""The systemd guest's launcher, the parts that need no guest: how it reads the
guest's console and when it boots a second time (the guest itself runs in
`make test-systemd`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.systemd_guest import launcher
from tests.systemd_guest.launcher import EXIT_TIMEOUT, GuestRun


def test_console_lines_give_boot_time_counts_and_exit_status() -> None:
    run = GuestRun(returncode=1)
    assert run.fold("systemd-guest: booted, guest uptime 31.2 s, PID 1 is systemd", 40.0) is None
    assert run.fold("systemd-guest: booted again", 50.0) is None
    assert run.boot_s == 40.0
    run.fold("========== 10 passed, 1 skipped in 95.31s (0:01:35) ==========", 90.0)
    assert run.counts == {"passed": 10, "skipped": 1}
    assert run.fold("systemd-guest: pytest exit status 0", 91.0) == 0


@pytest.mark.parametrize(("run", "retry"), [
    (GuestRun(returncode=EXIT_TIMEOUT, boot_s=30.0, counts={"passed": 3}), True),  # frozen half-way
    (GuestRun(returncode=255, died=True), True),  # QEMU died before the checks began
    (GuestRun(returncode=255, boot_s=20.0, died=True), True),  # vanished mid-run, no status (seen in CI)
    (GuestRun(returncode=1, boot_s=30.0, counts={"passed": 9, "failed": 1}), False),  # a real failure
])
def test_only_a_frozen_or_dead_guest_is_booted_again(run: GuestRun, retry: bool) -> None:
    assert run.retry_worth is retry


def test_a_changed_recipe_names_a_new_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "build-root.sh"
    script.write_text("one recipe\n")
    monkeypatch.setattr(launcher, "BUILD_SCRIPT", script)
    first = launcher.image_path()
    script.write_text("another recipe\n")
    assert launcher.image_path() != first


def test_the_guest_image_holds_every_package_the_deb_depends_on() -> None:
    """`dpkg -i` runs offline in the guest: a Depends the image lacks fails it
    (python3-prometheus-client, added with the metrics, did)."""
    repo = Path(__file__).resolve().parent.parent
    control = (repo / "packaging/debian/control").read_text()
    depends = control.split("\nDepends:", 1)[1].split("\n", 1)[0] + "\n"
    rest = control.split("\nDepends:", 1)[1].split("\n")[1:]
    for line in rest:  # continuation lines start with a space
        if not line.startswith((" ", "\t")):
            break
        depends += line + "\n"
    wanted = {d.strip().split()[0] for d in depends.replace("\n", ",").split(",")
              if d.strip() and not d.strip().startswith("${")}
    script = (repo / "tests/systemd_guest/build-root.sh").read_text()
    included = {p for line in script.splitlines() if line.startswith("pkgs=")
                for p in line.split("=", 1)[1].replace("$pkgs,", "").split(",")}
    assert wanted <= included, f"the image lacks {sorted(wanted - included)}"


def test_a_failed_test_is_named_in_the_summary_line() -> None:
    run = GuestRun(returncode=1)
    run.fold("FAILED checks.py::test_watchdog - AssertionError: assert 1 == 0", 80.0)
    run.fold("========== 1 failed, 9 passed in 95.31s (0:01:35) ==========", 90.0)
    assert run.failures == ["checks.py::test_watchdog"]
    assert "failed tests: checks.py::test_watchdog" in run.summary()
