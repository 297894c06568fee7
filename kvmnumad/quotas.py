"""What each uid may hold: VMs, vCPUs, memory bytes and memory regions.

A polkit grant says *whether* a user may create VMs; a quota says how much.
Without one, one granted user could take every byte and thread of the host
(issue 12 finding 3).  The file is ``quotas.conf`` in the config directory
(``/etc/kvmnumad``, ``kvmnumad --config-dir``), INI::

    # every non-root uid without a section of its own
    [default]
    vms = 4
    vcpus = 16
    memory = 4G          # bytes, or with a K/M/G/T suffix (powers of 1024)
    regions = 16

    [uid:1000]           # a uid; keys not given come from [default]
    vms = 8

    [user:alice]         # a user name, resolved when the file is read
    memory = unlimited

Root (uid 0) is unlimited unless a ``[uid:0]`` or ``[user:root]`` section
says otherwise.  Without a file, the built-in defaults above apply.  The
file is read at start and on reload (SIGHUP, ``systemctl reload``); a file
that cannot be read or parsed is logged, and the quotas in force stay (at
start: the built-in ones), so a typo never lifts every limit.

Pure data and parsing; the Manager counts use and enforces (manager.py).
"""

from __future__ import annotations

import configparser
import logging
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = Path("/etc/kvmnumad")
FILE_NAME = "quotas.conf"
KEYS = ("vms", "vcpus", "memory", "regions")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


class QuotaError(ValueError):
    """The quota file is malformed; the message names the section and key."""


@dataclass(frozen=True)
class Usage:
    """What a uid holds, or what a request adds to it."""

    vms: int = 0
    vcpus: int = 0
    memory: int = 0  # bytes
    regions: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.vms + other.vms, self.vcpus + other.vcpus, self.memory + other.memory,
                     self.regions + other.regions)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.vms - other.vms, self.vcpus - other.vcpus, self.memory - other.memory,
                     self.regions - other.regions)


@dataclass(frozen=True)
class Quota:
    """Limits of one uid; None: unlimited."""

    vms: int | None = None
    vcpus: int | None = None
    memory: int | None = None
    regions: int | None = None

    def first_exceeded(self, used: Usage, wanted: Usage) -> tuple[str, int, int] | None:
        """(limit name, limit, current use) of the first limit ``used + wanted`` passes."""
        after = used + wanted
        for f in fields(self):
            limit = getattr(self, f.name)
            if limit is not None and getattr(wanted, f.name) > 0 and getattr(after, f.name) > limit:
                return f.name, limit, getattr(used, f.name)
        return None


UNLIMITED = Quota()
BUILTIN_DEFAULT = Quota(vms=4, vcpus=16, memory=4 << 30, regions=16)


@dataclass(frozen=True)
class Quotas:
    default: Quota = BUILTIN_DEFAULT
    by_uid: Mapping[int, Quota] = field(default_factory=dict)
    source: str = "built-in defaults"

    def for_uid(self, uid: int) -> Quota:
        if uid in self.by_uid:
            return self.by_uid[uid]
        return UNLIMITED if uid == 0 else self.default


def parse_size(text: str) -> int | None:
    """``unlimited``, a byte count, or one with a K/M/G/T suffix (1024-based)."""
    text = text.strip()
    if text.lower() in ("unlimited", "infinity", "none"):
        return None
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 512M, 4G, unlimited)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_count(text: str) -> int | None:
    text = text.strip()
    if text.lower() in ("unlimited", "infinity", "none"):
        return None
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a count (a whole number, or unlimited)")
    return int(text)


def parse(text: str, source: str = "<text>") -> Quotas:
    """Raises QuotaError naming the section and key of the first mistake."""
    cp = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), default_section="__none__",
                                   interpolation=None)
    try:
        cp.read_string(text, source)
    except configparser.Error as e:
        raise QuotaError(f"{source}: {e}") from e
    default = BUILTIN_DEFAULT
    if cp.has_section("default"):
        default = _section(cp["default"], BUILTIN_DEFAULT, source)
    by_uid: dict[int, Quota] = {}
    for name in cp.sections():
        if name == "default":
            continue
        kind, _, who = name.partition(":")
        if kind == "uid" and who.isdigit():
            uid = int(who)
        elif kind == "user" and who:
            try:
                uid = pwd.getpwnam(who).pw_uid
            except KeyError:
                log.warning("%s: [%s]: no such user, section ignored", source, name)
                continue
        else:
            raise QuotaError(f"{source}: unknown section [{name}] (known: [default], [uid:N], [user:NAME])")
        # root's own section starts from unlimited, everyone else's from [default]
        by_uid[uid] = _section(cp[name], UNLIMITED if uid == 0 else default, source)
    return Quotas(default, by_uid, source)


def _section(section: configparser.SectionProxy, base: Quota, source: str) -> Quota:
    values: dict[str, int | None] = {}
    for key, raw in section.items():
        if key not in KEYS:
            raise QuotaError(f"{source}: [{section.name}] unknown key {key!r} (known: {', '.join(KEYS)})")
        try:
            values[key] = parse_size(raw) if key == "memory" else parse_count(raw)
        except ValueError as e:
            raise QuotaError(f"{source}: [{section.name}] {key}: {e}") from e
    return replace(base, **values)


def load(config_dir: Path) -> Quotas:
    """The quotas of ``config_dir``/quotas.conf; the built-in ones without a
    file.  Raises OSError or QuotaError for a file that is there but bad."""
    path = Path(config_dir) / FILE_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Quotas(source=f"built-in defaults ({path} absent)")
    return parse(text, str(path))


# Memory migration jobs in flight (vm/migration.py): each holds pool tasks
# and moves memory bandwidth, so a caller cannot queue them without end.
MAX_JOBS_PER_UID = 4  # a non-root uid's jobs at once
MAX_JOBS = 16  # every job at once, root's (the balancer's) included
