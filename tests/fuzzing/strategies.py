"""Hypothesis strategies for every method and writable property of org.kvmnuma1.

Each strategy draws a ``Call``: where it goes, what it carries and which
refusals the contract allows for it (``allowed``; ``expect`` when only one
name fits, e.g. a wrong signature is InvalidArgument).  Arguments come in
three kinds mixed in every strategy: valid ones, boundaries (0, 2^32-1,
2^64-1, empty, 64/65-character names, node and CPU indexes just past the
host's) and hostile ones (huge arrays, unicode, path-like names, wrong
variant types, fds of FIFOs and devices).  Raw calls send a member of the
contract with a signature that is not its own.

Host safety on a shared 2-CPU machine: a call that would run or prefault
guest memory (start, prealloc) is given at most 16 MiB and 4 vCPUs, so a
valid draw cannot make the payload touch gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from dbus_fast import Variant
from hypothesis import strategies as st

from kvmnumad.bus.paths import vm_path

MANAGER_PATH = "/org/kvmnuma1"
MANAGER_IFACE = "org.kvmnuma1.Manager"
VM_IFACE = "org.kvmnuma1.VM"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
MiB = 1 << 20
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

ERR = "org.kvmnuma1.Error."
KVMNUMA_ERRORS = frozenset(ERR + n for n in (
    "InvalidArgument", "QuotaExceeded", "NoSuchVM", "NoSuchVcpu", "NumaDisabled", "NodeOutOfRange",
    "CpuOffline", "Overlap", "InsufficientMemory", "AlreadyExists", "Busy", "ResourceExhausted",
    "LimitReached", "KvmUnavailable"))  # Internal is named, but it is a bug: never allowed here
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
METHOD_ERRORS = KVMNUMA_ERRORS | {ACCESS_DENIED, UNKNOWN_OBJECT}
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"
PROPERTY_ERRORS = METHOD_ERRORS | {UNKNOWN_PROPERTY, PROPERTY_READ_ONLY, UNKNOWN_INTERFACE, INVALID_ARGS}
# dbus-fast answers Get/GetAll/Set naming the interface "" (the spec's "any interface") with NotSupported
EMPTY_IFACE_ERRORS = PROPERTY_ERRORS | {NOT_SUPPORTED}
RAW_ERRORS = METHOD_ERRORS | {UNKNOWN_METHOD, UNKNOWN_INTERFACE, INVALID_ARGS}

POLICIES = ("manual", "local-first", "load-balanced", "interleave", "preferred")
MUTATING = frozenset({"CreateVM", "CreateVMSimple", "DestroyVM", "BindVcpuToNumaNode", "Destroy",
                      "DisableNuma", "EnableNuma", "MapNumaNode", "SetVcpuAffinity", "SetupNumaMemory",
                      "Start", "Stop", "Set", "Rebalance", "ClearExplicitPlacement"})

# The contract's in-signatures (dbus/*.xml), for the wrong-signature calls.
SIGNATURES: dict[tuple[str, str], str] = {
    (MANAGER_IFACE, "CreateVM"): "suta{sv}", (MANAGER_IFACE, "CreateVMSimple"): "sutusb",
    (MANAGER_IFACE, "DestroyVM"): "s", (MANAGER_IFACE, "GetReport"): "",
    (MANAGER_IFACE, "GetSuggestions"): "", (MANAGER_IFACE, "GetTopology"): "",
    (MANAGER_IFACE, "GetVM"): "s", (MANAGER_IFACE, "ListVMs"): "", (MANAGER_IFACE, "PlanVM"): "uta{sv}",
    (MANAGER_IFACE, "PlanVMSimple"): "utus",
    (MANAGER_IFACE, "Rebalance"): "", (MANAGER_IFACE, "PlanRebalance"): "",
    (VM_IFACE, "ClearExplicitPlacement"): "auau",
    (VM_IFACE, "BindVcpuToNumaNode"): "uu", (VM_IFACE, "Destroy"): "", (VM_IFACE, "DisableNuma"): "",
    (VM_IFACE, "EnableNuma"): "u", (VM_IFACE, "GetStats"): "", (VM_IFACE, "GetVcpuAffinity"): "u",
    (VM_IFACE, "GetVcpuNumaNode"): "u", (VM_IFACE, "MapNumaNode"): "uu", (VM_IFACE, "SetVcpuAffinity"): "uau",
    (VM_IFACE, "SetupNumaMemory"): "utt", (VM_IFACE, "Start"): "", (VM_IFACE, "Stop"): "",
}
VM_PROPERTIES = ("DeclaredVcpuAffinity", "MemoryBytes", "MemoryRegions", "Name", "NodeMap", "NumaEnabled",
                 "NumaNodes", "Owner", "Policy", "State", "VcpuAffinity", "VcpuNodes", "VcpuThreads", "Vcpus")
MANAGER_PROPERTIES = ("DefaultPolicy", "HostNodes", "MaxVcpus", "OnlineCPUs", "Version")


@dataclass(frozen=True)
class Payload:
    """An fd to pass as CreateVM's payload, opened by the harness: ``kind`` is
    tiny (hlt; jmp), random (``data``), empty, huge (sparse, past the limit),
    fifo, devnull or dir."""

    kind: str
    data: bytes = b""


@dataclass(frozen=True)
class Call:
    path: str
    iface: str | None
    member: str
    signature: str
    body: tuple[Any, ...]
    allowed: frozenset[str]
    expect: str | None = None  # the one error name the contract gives, if it gives one
    as_user: bool = False  # sent by the unprivileged user
    payload: Payload | None = None  # the fd behind Variant('h', 0) in the options
    raw: bool = False  # a signature not the member's own
    tags: tuple[str, ...] = field(default=())

    @property
    def mutating(self) -> bool:
        return self.member in MUTATING

    def __repr__(self) -> str:  # what hypothesis prints as the falsifying example
        body = repr(self.body)
        if len(body) > 300:
            body = body[:300] + f"... ({len(body)} chars)"
        who = " as unprivileged user" if self.as_user else ""
        extra = f" payload={self.payload.kind}" if self.payload else ""
        return f"Call({self.path} {self.iface}.{self.member}({self.signature}) {body}{who}{extra})"


@dataclass(frozen=True)
class Host:
    cpus: int  # possible CPUs (0..cpus-1)
    nodes: int
    max_vcpus: int


# ------------------------------------------------------------------ scalars
def boundary_int(lo: int, hi: int, *special: int) -> st.SearchStrategy[int]:
    picks = sorted({v for v in (lo, lo + 1, hi - 1, hi, 0, 1, 2, 63, 64, 65, 255, 256, 257, 4095, 4096,
                                (1 << 31) - 1, 1 << 31, U32 - 1, U32, 1 << 32, (1 << 63) - 1, 1 << 63,
                                U64 - 1, *special) if lo <= v <= hi})
    return st.one_of(st.sampled_from(picks), st.integers(lo, hi))


INT_RANGES = {"y": (0, 255), "n": (-(1 << 15), (1 << 15) - 1), "q": (0, (1 << 16) - 1),
              "i": (-(1 << 31), (1 << 31) - 1), "u": (0, U32),
              "x": (-(1 << 63), (1 << 63) - 1), "t": (0, U64)}


def u32(*special: int) -> st.SearchStrategy[int]:
    return boundary_int(0, U32, *special)


def u64(*special: int) -> st.SearchStrategy[int]:
    return boundary_int(0, U64, *special)


# D-Bus strings hold neither NUL nor a surrogate
_CHARS = st.characters(min_codepoint=1, max_codepoint=0xD7FF) | st.characters(min_codepoint=0xE000)
_TEXT = st.text(_CHARS, max_size=80)
_LONG = st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "/", "_", "\U0001f600"]),
                  st.sampled_from([64, 65, 255, 1024, 70_000]))
HOSTILE_NAMES = ("", "a" * 64, "a" * 65, "..", ".", "-", "_", "a/b", "/", "ä", "vm\n", "a b", "_2d",
                 "a-b", "a_2db", "0", "9lives", "org.kvmnuma1", "%s%n", "'; rm -rf /", "\u202e", "\U0001f600",
                 "a\tb")


def text() -> st.SearchStrategy[str]:
    return st.one_of(_TEXT, _LONG, st.sampled_from(HOSTILE_NAMES))


def vm_names(existing: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    valid = st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")
    pool = st.sampled_from(existing) if existing else st.nothing()
    return st.one_of(valid, pool, text())


def policies() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(POLICIES), st.sampled_from(("", "MANUAL", "local_first", "x" * 65)),
                     st.builds(lambda: "x" * 2000),
                     _TEXT)


def object_paths() -> st.SearchStrategy[str]:
    element = st.from_regex(r"\A[A-Za-z0-9_]{1,20}\Z")
    elements = st.lists(element, min_size=1, max_size=5)
    return st.one_of(st.just("/"), st.builds(lambda es: "/" + "/".join(es), elements))


SIMPLE_SIGS = "ybnqiuxtdsog"


def value_of(sig: str) -> st.SearchStrategy[Any]:
    """A value that dbus-fast marshals as ``sig`` (one complete type of a small grammar)."""
    if sig in INT_RANGES:
        return boundary_int(*INT_RANGES[sig])
    if sig == "b":
        return st.booleans()
    if sig == "d":
        return st.floats(allow_nan=True, allow_infinity=True)
    if sig == "s":
        return text()
    if sig == "o":
        return object_paths()
    if sig == "g":
        return st.sampled_from(["", "s", "u", "a{sv}", "(uu)"])
    if sig == "v":
        return st.sampled_from(SIMPLE_SIGS).flatmap(lambda s: value_of(s).map(lambda v: Variant(s, v)))
    if sig.startswith("a{"):
        return st.dictionaries(value_of(sig[2]), value_of(sig[3:-1]), max_size=4)
    if sig.startswith("a"):
        return st.lists(value_of(sig[1:]), max_size=6)
    if sig.startswith("("):
        inner = sig[1:-1]
        return st.tuples(*(value_of(c) for c in split_types(inner))).map(list)
    raise ValueError(sig)


def split_types(sig: str) -> list[str]:
    """The complete types of a signature (enough of the grammar for ours)."""
    out, i = [], 0
    while i < len(sig):
        j = i
        while sig[j] == "a":
            j += 1
        if sig[j] in "({":
            depth, k = 0, j
            while True:
                depth += sig[k] in "({"
                depth -= sig[k] in ")}"
                k += 1
                if depth == 0:
                    break
            j = k
        else:
            j += 1
        out.append(sig[i:j])
        i = j
    return out


COMPLETE_TYPES = [*SIMPLE_SIGS, "v", "as", "au", "ai", "at", "a{sv}", "a{su}", "(su)", "(uu)", "a(uau)"]


# ------------------------------------------------------------------ arguments
def vcpu_index(host: Host) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 3), u32(host.max_vcpus - 1, host.max_vcpus, host.max_vcpus + 1))


def cpu_index(host: Host) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, host.cpus - 1),
                     st.sampled_from([host.cpus, host.cpus + 1, 1023, 1024, 8191, 8192]), u32())


def node_index(host: Host) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, host.nodes - 1), st.sampled_from([host.nodes, host.nodes + 1, 63, 64]),
                     u32())


def cpu_lists(host: Host) -> st.SearchStrategy[list[int]]:
    valid = st.lists(st.integers(0, host.cpus - 1), min_size=1, max_size=host.cpus, unique=True)
    mixed = st.lists(cpu_index(host), max_size=6)
    huge = st.builds(lambda v, n: [v] * n, st.integers(0, host.cpus), st.sampled_from([1000, 70_000]))
    return st.one_of(valid, valid, mixed, st.just([]), huge,
                     st.builds(lambda: list(range(host.cpus + 1))), st.builds(lambda: list(range(1024))))


def int_variant(fits: st.SearchStrategy[int]) -> st.SearchStrategy[Variant]:
    """Any D-Bus integer type: the option's own (u) with values that fit, or
    another type with a value of that type's range (negative, 2^64-1: refused)."""
    own = fits.map(lambda v: Variant("u", v))
    other = st.sampled_from("ynqixt").flatmap(lambda s: boundary_int(*INT_RANGES[s]).map(
        lambda v: Variant(s, v)))
    return st.one_of(own, own, other)


def wrong_variant(right: str) -> st.SearchStrategy[Variant]:
    sigs = [s for s in ("s", "b", "d", "as", "au", "o", "u", "i", "v") if s != right]
    return st.sampled_from(sigs).flatmap(lambda s: value_of(s).map(lambda v: Variant(s, v)))


def payloads() -> st.SearchStrategy[Payload]:
    return st.one_of(st.sampled_from([Payload("tiny"), Payload("empty"), Payload("huge"), Payload("fifo"),
                                      Payload("devnull"), Payload("dir")]),
                     st.binary(min_size=1, max_size=256).map(lambda b: Payload("random", b)))


OPTION_KEYS = ("numa_nodes", "policy", "host_nodes", "payload", "prealloc", "start", "allow_split", "passes")


@st.composite
def create_options(draw: st.DrawFn, host: Host) -> tuple[dict[str, Variant], Payload | None]:
    keys = draw(st.lists(st.one_of(st.sampled_from(OPTION_KEYS), _TEXT), max_size=5, unique=True))
    opts: dict[str, Variant] = {}
    payload = None
    for key in keys:
        if draw(st.integers(0, 9)) == 0:  # a wrong variant type for any key
            opts[key] = draw(wrong_variant({"policy": "s", "host_nodes": "au", "payload": "h"}.get(key, "u")))
        elif key in ("numa_nodes", "passes"):
            opts[key] = draw(int_variant(st.one_of(st.integers(0, 3), u32())))
        elif key == "policy":
            opts[key] = Variant("s", draw(policies()))
        elif key == "host_nodes":
            sig = draw(st.sampled_from(["au", "au", "ai", "at", "aq"]))
            nodes = draw(st.lists(st.one_of(node_index(host), boundary_int(*INT_RANGES[sig[1]])), max_size=4))
            nodes = [n for n in nodes if INT_RANGES[sig[1]][0] <= n <= INT_RANGES[sig[1]][1]]
            opts[key] = Variant(sig, nodes)
        elif key == "payload":
            if draw(st.booleans()):
                payload = draw(payloads())
                opts[key] = Variant("h", 0)
            else:  # a path: the daemon opens no file for a caller
                paths = ["/etc/shadow", "/dev/zero", "", "/proc/self/mem"]
                opts[key] = Variant("s", draw(st.sampled_from(paths)))
        elif key in ("prealloc", "start", "allow_split"):
            opts[key] = Variant("b", draw(st.booleans()))
        else:
            opts[key] = draw(value_of("v"))
    return opts, payload


def _safe_size(memory: int, vcpus: int, runs: bool) -> tuple[int, int]:
    """Started or prefaulted guests stay small (host safety, module doc)."""
    if runs:
        return (memory if memory <= 16 * MiB else 16 * MiB), min(vcpus, 4)
    return memory, vcpus


def memory_sizes() -> st.SearchStrategy[int]:
    small = st.sampled_from([0, 1, 4095, 4096, 4097, 2 * MiB, 8 * MiB, 16 * MiB, 16 * MiB + 4096])
    return st.one_of(small, small, u64(1 << 40, (1 << 40) + 4096, 1 << 48), st.integers(0, 64 * MiB))


# ------------------------------------------------------------------ calls
def manager_calls(host: Host, names: tuple[str, ...]) -> st.SearchStrategy[Call]:
    name = vm_names(names)
    vcpus = st.one_of(st.integers(1, 4), u32(host.max_vcpus, host.max_vcpus + 1))
    m = MANAGER_PATH

    @st.composite
    def create(draw: st.DrawFn) -> Call:
        opts, payload = draw(create_options(host))
        runs = any(k in opts and opts[k].signature == "b" and opts[k].value for k in ("start", "prealloc"))
        memory, n = _safe_size(draw(memory_sizes()), draw(vcpus), runs)
        if runs and opts.get("passes") is None:
            opts["passes"] = Variant("u", 1)
        return Call(m, MANAGER_IFACE, "CreateVM", "suta{sv}", (draw(name), n, memory, opts), METHOD_ERRORS,
                    payload=payload)

    @st.composite
    def create_simple(draw: st.DrawFn) -> Call:
        start = draw(st.booleans())
        memory, n = _safe_size(draw(memory_sizes()), draw(vcpus), start)
        numa = draw(st.one_of(st.integers(0, 3), u32()))
        return Call(m, MANAGER_IFACE, "CreateVMSimple", "sutusb",
                    (draw(name), n, memory, numa, draw(policies()), start), METHOD_ERRORS)

    @st.composite
    def plan(draw: st.DrawFn) -> Call:
        opts, payload = draw(create_options(host))
        return Call(m, MANAGER_IFACE, "PlanVM", "uta{sv}", (draw(vcpus), draw(memory_sizes()), opts),
                    METHOD_ERRORS, payload=payload)

    plan_simple = st.builds(lambda v, mem, nn, p: Call(m, MANAGER_IFACE, "PlanVMSimple", "utus",
                                                       (v, mem, nn, p), METHOD_ERRORS),
                            vcpus, memory_sizes(), st.one_of(st.integers(0, 3), u32()), policies())
    by_name = st.builds(lambda member, n: Call(m, MANAGER_IFACE, member, "s", (n,), METHOD_ERRORS),
                        st.sampled_from(["DestroyVM", "GetVM"]), name)
    reads = st.builds(lambda member: Call(m, MANAGER_IFACE, member, "", (), METHOD_ERRORS),
                      st.sampled_from(["GetReport", "GetSuggestions", "GetTopology", "ListVMs"]))
    return st.one_of(create(), create_simple(), plan(), plan_simple, by_name, reads)


def vm_calls(host: Host, paths: tuple[str, ...]) -> st.SearchStrategy[Call]:
    path = st.one_of(st.sampled_from(paths), st.sampled_from(paths),
                     st.sampled_from([vm_path("ghost"), vm_path("a" * 65), "/org/kvmnuma1/vm",
                                      "/org/kvmnuma1/vm/_2d", "/org/kvmnuma1/vmx"]))
    v, n = vcpu_index(host), node_index(host)
    sizes = st.one_of(st.sampled_from([0, 4096, 2 * MiB, 4 * MiB]), st.integers(0, 4 * MiB),
                      u64(1 << 32, 1 << 40))
    gpas = st.one_of(st.sampled_from([0, 4096, 1 << 20, 1 << 30, (1 << 32) - 4096, 1 << 32]), u64(),
                     st.integers(0, 1 << 32))

    def call(member: str, sig: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[Call]:
        return st.builds(lambda p, *a: Call(p, VM_IFACE, member, sig, tuple(a), METHOD_ERRORS), path, *args)

    return st.one_of(
        call("BindVcpuToNumaNode", "uu", v, n), call("Destroy", ""), call("DisableNuma", ""),
        call("EnableNuma", "u", st.one_of(st.integers(0, 3), u32(64, 65))), call("GetStats", ""),
        call("GetVcpuAffinity", "u", v), call("GetVcpuNumaNode", "u", v), call("MapNumaNode", "uu", n, n),
        call("SetVcpuAffinity", "uau", v, cpu_lists(host)), call("SetupNumaMemory", "utt", n, sizes, gpas),
        call("Start", ""), call("Stop", ""),
    )


def property_calls(paths: tuple[str, ...]) -> st.SearchStrategy[Call]:
    vm = st.sampled_from(paths)
    any_path = st.one_of(st.just(MANAGER_PATH), vm)
    iface = st.sampled_from([MANAGER_IFACE, VM_IFACE, "org.kvmnuma1.Nope", ""])
    prop = st.one_of(st.sampled_from(VM_PROPERTIES + MANAGER_PROPERTIES), _TEXT)

    def props(member: str, sig: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[Call]:
        def make(p: str, *a: Any) -> Call:
            allowed = EMPTY_IFACE_ERRORS if a[0] == "" else PROPERTY_ERRORS
            return Call(p, PROPS_IFACE, member, sig, tuple(a), allowed)
        return st.builds(make, any_path, *args)

    set_policy = st.builds(
        lambda v: Call(MANAGER_PATH, PROPS_IFACE, "Set", "ssv", (MANAGER_IFACE, "DefaultPolicy", v),
                       PROPERTY_ERRORS),
        st.one_of(policies().map(lambda s: Variant("s", s)), wrong_variant("s")))
    return st.one_of(set_policy, set_policy, props("Get", "ss", iface, prop), props("GetAll", "s", iface),
                     props("Set", "ssv", iface, prop, value_of("v")))


@st.composite
def raw_calls(draw: st.DrawFn, paths: tuple[str, ...]) -> Call:
    """A member of the contract with a signature and body that are not its own
    (InvalidArgument), or an unknown member or interface."""
    (iface, member), own = draw(st.sampled_from(sorted(SIGNATURES.items())))
    path = MANAGER_PATH if iface == MANAGER_IFACE else draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["signature", "signature", "signature", "member", "interface"]))
    types = draw(st.lists(st.sampled_from(COMPLETE_TYPES), max_size=5))
    sig = "".join(types)
    body = tuple(draw(value_of(t)) for t in types)
    if kind == "signature":
        if sig == own:
            sig, body = sig + "u", (*body, 0)
        return Call(path, iface, member, sig, body, METHOD_ERRORS, expect=ERR + "InvalidArgument", raw=True)
    if kind == "member":
        return Call(path, iface, member + "X", sig, body, RAW_ERRORS, raw=True)
    return Call(path, "org.kvmnuma1.Bogus", member, sig, body, RAW_ERRORS, raw=True)


def unprivileged(call: Call) -> Call:
    """The same call from a uid without polkit grants: a mutation is refused
    (AccessDenied, or a refusal of its arguments, checked before authorization)."""
    allowed = call.allowed
    if call.mutating:
        allowed = frozenset({ACCESS_DENIED, UNKNOWN_OBJECT, ERR + "InvalidArgument", ERR + "NoSuchVM",
                             ERR + "LimitReached", UNKNOWN_PROPERTY, PROPERTY_READ_ONLY, UNKNOWN_INTERFACE,
                             INVALID_ARGS, UNKNOWN_METHOD, NOT_SUPPORTED} & (allowed | {ACCESS_DENIED}))
    return replace(call, as_user=True, allowed=allowed, payload=None,
                   body=tuple({k: v for k, v in b.items() if k != "payload"} if isinstance(b, dict) else b
                              for b in call.body))


def any_call(host: Host, names: tuple[str, ...], paths: tuple[str, ...], *,
             user: bool = True) -> st.SearchStrategy[Call]:
    root = st.one_of(manager_calls(host, names), manager_calls(host, names), vm_calls(host, paths),
                     vm_calls(host, paths), vm_calls(host, paths), property_calls(paths), raw_calls(paths))
    if not user:
        return root
    return st.one_of(root, root, root, root, root, root, root, root, root, root.map(unprivileged))
