"""What each D-Bus method and writable property may do, declared where it is written.

Every ``@method()`` of a bus object carries either ``@read_only`` or
``@requires(action, verb=...)``; a writable property's setter is declared
with ``@setter(name)`` and a ``@requires`` of its own.  The Dispatcher reads
the declaration, validates the arguments (``checks``), asks the Authorizer,
and only then runs the method; a member without a declaration is refused
(AccessDenied), so forgetting one closes the door instead of opening it
(firewalld does the same with a default polkit action).

Order under ``@method()`` does not matter: the declaration is kept on the
function dbus-fast calls, whichever decorator came first.

    @method()
    @requires(ACTION_PLACE, verb="set-vcpu-affinity", checks={"cpus": check_cpus})
    async def SetVcpuAffinity(self, vcpu: "u", cpus: "au") -> None: ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_ACCESS = "__kvmnuma_access__"
_SETTER = "__kvmnuma_setter__"
_DBUS_METHOD = "__DBUS_METHOD"  # where dbus-fast (1.84 to 5.x) keeps a method's _Method


@dataclass(frozen=True)
class Access:
    """``action`` None: a read, nobody is asked.  Otherwise the polkit action
    and the verb (polkit detail ``verb``, and what bus/auth.py's owner rule
    looks at).  ``vm`` names the argument that names an existing VM the call
    is about (its owner counts, NoSuchVM before anyone is asked); ``new_vm``
    the argument naming the VM a call creates.  ``checks`` run, in argument
    order, before authorization and replace the argument by what they
    return; ``details`` are arguments (after checks) passed to polkit."""

    action: str | None
    verb: str = ""
    vm: str | None = None
    new_vm: str | None = None
    checks: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    details: tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        return self.action is None


READ_ONLY = Access(None)


def requires(
    action: str,
    *,
    verb: str,
    vm: str | None = None,
    new_vm: str | None = None,
    checks: Mapping[str, Callable[[Any], Any]] | None = None,
    details: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Declare a mutating member: it runs only once ``action`` is granted."""
    access = Access(action, verb, vm, new_vm, dict(checks or {}), details)

    def declare(fn: F) -> F:
        return _declare(fn, access)

    return declare


def read_only(fn: F) -> F:
    """Declare a member that changes nothing: it runs for any caller."""
    return _declare(fn, READ_ONLY)


def setter(prop: str) -> Callable[[F], F]:
    """Mark an async method as the setter of the writable property ``prop``
    (called with the new value, after its declared checks and authorization)."""

    def mark(fn: F) -> F:
        setattr(fn, _SETTER, prop)
        return fn

    return mark


def access_of(fn: Callable[..., Any]) -> Access | None:
    """The declaration of a member, None when it has none (the Dispatcher refuses it)."""
    access = getattr(fn, _ACCESS, None)
    return access if isinstance(access, Access) else None


def declarations(cls: type) -> dict[str, Access | None]:
    """D-Bus member name -> declaration, of every ``@method()`` of ``cls``."""
    found: dict[str, Access | None] = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            inner = getattr(value, "__dict__", {}).get(_DBUS_METHOD)
            if inner is not None:
                found[inner.name] = access_of(inner.fn)
    return found


def setters(cls: type) -> dict[str, Callable[..., Any]]:
    """Property name -> setter function of every ``@setter`` of ``cls``."""
    found: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            prop = getattr(value, _SETTER, None)
            if isinstance(prop, str):
                found[prop] = value
    return found


def parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The D-Bus arguments' names (``self`` left out)."""
    return tuple(inspect.signature(fn).parameters)[1:]


def _declare(fn: F, access: Access) -> F:
    inner = fn.__dict__.get(_DBUS_METHOD)
    target = getattr(inner, "fn", fn)  # the function dbus-fast calls
    if access_of(target) is not None:
        raise TypeError(f"{target.__qualname__} declares its access twice")
    names = parameters(target)
    named = [*access.checks, *access.details, *(a for a in (access.vm, access.new_vm) if a is not None)]
    unknown = [n for n in named if n not in names]
    if unknown:
        raise TypeError(f"{target.__qualname__} has no argument {', '.join(unknown)} (it has {names})")
    setattr(target, _ACCESS, access)
    if target is not fn:
        setattr(fn, _ACCESS, access)
    return fn
