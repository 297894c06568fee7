"""SLOW (about 1-3 minutes): build the .deb, install it with dpkg on this machine, check it, purge it.

Also builds the RPM when rpmbuild is there (apt package ``rpm``).  The installed
package is exercised the way a distribution runs it: Debian's /usr/bin/python3
with Debian's python3-dbus-fast (1.84), python3-pyudev, python3-psutil and
python3-systemd, never the development venv.  Skip the module with
``KVMNUMA_SKIP_PACKAGING=1`` when iterating on something else.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DEPS = ["python3-dbus-fast", "python3-pyudev", "python3-psutil", "python3-systemd", "libnuma1",
                "bash-completion"]
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

pytestmark = pytest.mark.skipif(os.environ.get("KVMNUMA_SKIP_PACKAGING") == "1",
                                reason="KVMNUMA_SKIP_PACKAGING=1")


def run(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    # cwd /: the source tree must not shadow the installed package on sys.path.
    out = subprocess.run(cmd, env=SYSTEM_ENV, cwd="/", capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def installed(package: str) -> bool:
    out = run("dpkg-query", "-W", "-f=${Status}", package, check=False)
    return "install ok installed" in out.stdout


@dataclass
class InstalledDeb:
    deb: Path
    files: list[str]


def start_installed_daemon(package: InstalledDeb) -> None:
    """The installed daemon (Debian's python3 and python3-dbus-fast) serves a
    demo VM on a private bus, reachable by the busctl line it prints."""
    out = run("/usr/bin/kvmnumad", "--help", timeout=60)
    assert "--bus" in out.stdout and "--state-dir" in out.stdout
    proc = subprocess.Popen(["/usr/bin/kvmnumad", "--bus", "private", "--demo", "--log-target", "stderr"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        call = next(ln.strip() for ln in lines if ln.strip().startswith("busctl") and "ListVMs" in ln)
        listing = run(*shlex.split(call), timeout=30).stdout
        assert '"demo" "running"' in listing, "".join(lines) + listing
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)


def _backup_unowned(deb: Path) -> dict[str, bytes]:
    """Files the package will own that exist already (a test fixture installed
    the polkit action, say): purging the package would delete them under
    everyone else's feet, so they are put back afterwards."""
    names = run("dpkg-deb", "-c", str(deb), timeout=60).stdout.splitlines()
    saved: dict[str, bytes] = {}
    for line in names:
        path = line.split()[-1].lstrip(".")
        if path and os.path.isfile(path):
            saved[path] = Path(path).read_bytes()
    return saved


@pytest.fixture(scope="module")
def installed_deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstalledDeb]:
    if installed("kvmnumad"):
        pytest.skip("a kvmnumad package is installed already: not replacing someone's install")
    missing = [p for p in RUNTIME_DEPS if not installed(p)]
    if missing:
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing)
    out_dir = tmp_path_factory.mktemp("deb")
    run(str(ROOT / "packaging" / "build-deb.sh"), str(out_dir))
    (deb,) = out_dir.glob("kvmnumad_*_all.deb")
    saved = _backup_unowned(deb)
    run("dpkg", "-i", str(deb))
    try:
        files = run("dpkg", "-L", "kvmnumad").stdout.split()
        yield InstalledDeb(deb, files)
    finally:
        run("dpkg", "--purge", "kvmnumad", check=False)
        for path, data in saved.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)


def test_deb_installs_its_files(installed_deb: InstalledDeb) -> None:
    for path in (
        "/lib/systemd/system/kvmnumad.service",
        "/usr/share/dbus-1/system.d/org.kvmnuma1.conf",
        "/usr/share/dbus-1/system-services/org.kvmnuma1.service",
        "/usr/share/polkit-1/actions/org.kvmnuma1.policy",
        "/usr/share/man/man8/kvmnumad.8.gz",
        "/usr/share/man/man1/kvmnumactl.1.gz",
        "/usr/share/bash-completion/completions/kvmnumactl",
        "/usr/bin/kvmnumad",
        "/usr/bin/kvmnumactl",
        "/usr/lib/python3/dist-packages/kvmnumad/__init__.py",
    ):
        assert path in installed_deb.files, path
        assert Path(path).exists(), path
    assert (Path("/lib/systemd/system/kvmnumad.service").read_text()
            == (ROOT / "systemd" / "kvmnumad.service").read_text())
    depends = run("dpkg-deb", "-f", str(installed_deb.deb), "Depends").stdout
    assert "python3-dbus-fast (>= 1.84)" in depends and "python3-systemd" in depends


def test_installed_unit_verifies(installed_deb: InstalledDeb) -> None:
    # Real paths now: /usr/bin/kvmnumad and the man pages of Documentation= are installed.
    out = run("systemd-analyze", "verify", "/lib/systemd/system/kvmnumad.service", check=False)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_system_python_runs_the_installed_package(installed_deb: InstalledDeb) -> None:
    probe = ("import dbus_fast, kvmnumad, kvmnumad.journal, kvmnumad.sdnotify, kvmnumad.state, "
             "kvmnumad.bus.polkit, systemd.journal, pyudev, psutil; "
             "from importlib.metadata import version; "
             "print(kvmnumad.__file__, version('dbus-fast'))")
    out = run("/usr/bin/python3", "-c", probe, timeout=60)
    path, dbus_fast_version = out.stdout.split()
    assert path == "/usr/lib/python3/dist-packages/kvmnumad/__init__.py"
    assert dbus_fast_version.startswith("1.84"), dbus_fast_version  # Debian 12's, not the venv's
    start_installed_daemon(installed_deb)


def test_bash_completion_offers_commands(installed_deb: InstalledDeb) -> None:
    script = ("source /usr/share/bash-completion/bash_completion 2>/dev/null; "
              "source /usr/share/bash-completion/completions/kvmnumactl; "
              "COMP_LINE='kvmnumactl st'; COMP_POINT=13; COMP_WORDS=(kvmnumactl st); COMP_CWORD=1; "
              "_kvmnumactl; echo ${COMPREPLY[@]}")
    if not Path("/usr/share/bash-completion/bash_completion").exists():
        pytest.skip("bash-completion is not installed")
    out = run("bash", "-c", script)
    assert out.stdout.split() == ["start", "stop", "stats"]


def test_rpm_builds_where_rpmbuild_exists(tmp_path: Path) -> None:
    if shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild not installed (apt package rpm)")
    run(str(ROOT / "packaging" / "build-rpm.sh"), str(tmp_path))
    (rpm,) = tmp_path.glob("kvmnumad-*.noarch.rpm")
    files = run("rpm", "-qlp", str(rpm)).stdout.split()
    for path in ("/usr/lib/systemd/system/kvmnumad.service", "/usr/share/dbus-1/system.d/org.kvmnuma1.conf",
                 "/usr/share/polkit-1/actions/org.kvmnuma1.policy", "/usr/share/man/man8/kvmnumad.8",
                 "/usr/bin/kvmnumad"):
        assert path in files, path
    requires = run("rpm", "-qRp", str(rpm)).stdout
    assert "python3-dbus-fast >= 1.84" in requires
