"""kvmnumactl: the command-line client of org.kvmnuma1.

A pure D-Bus client: it knows the bus API and nothing of the core, so it works
against any daemon that speaks the contract (and shows what a third-party tool
would have to do).  The one thing it shares with the daemon is the cpulist
format, so that a list means the same on both sides.

``main`` is here because the ``kvmnumactl`` script names ``kvmnumad.cli:main``.
"""

from kvmnumad.cli.main import main

__all__ = ["main"]
