"""kvmnumad: the daemon entry point.

Order matters here and is the reason this file exists:
1. the vCPU kick signal is installed in the main thread (Python only allows
   it there; VMs are created on worker threads later);
2. the VMs come back before anything the restore does not need is imported
   (asyncio, dbus-fast, pyudev, the bus layer: main()); the udev monitor
   starts after that and the topology is read once more, so no hotplug event
   falls between the restore's read and the monitor;
3. the bus name is requested only when the core is ready, and READY=1 is sent
   only once the name is owned: a client activated by the name never sees a
   half-started daemon;
4. on SIGTERM: STOPPING=1, the name is released first (no new calls), then
   the VMs are stopped and every fd closed;
5. guests outlive the process (kvmnumad/handover.py): fds inherited from an
   earlier process are taken before anything else opens fds, each VM comes
   back on its memory before the name is requested, and what nobody claims
   is released.  Under systemd every memfd is in the fd store from its
   creation on, and SIGTERM pauses and saves every VM there; Reexec() does the
   same across an exec of this very process.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# Only what bringing the VMs back needs is imported here: after a crash or a
# restart the guests wait for it.  The bus, udev, asyncio and the optimizer's
# timer come after the restore (see main()), each imported where it is used.
from kvmnumad import __version__, handover, holder, persist, quotas, sdnotify
from kvmnumad.adopt.records import AdoptionRecords
from kvmnumad.events import VmAdded
from kvmnumad.journal import setup_logging
from kvmnumad.kvm.runner import install_kick_signal
from kvmnumad.manager import Manager
from kvmnumad.numa.topology import read_topology
from kvmnumad.optimizer.balance import Thresholds
from kvmnumad.optimizer.model import Sample
from kvmnumad.optimizer.timer import DEFAULT_PERIOD
from kvmnumad.state import StateStore
from kvmnumad.vm.migration import CHUNK_PAGES

if TYPE_CHECKING:
    import asyncio

    from dbus_fast.aio import MessageBus

    from kvmnumad.adopt.autoadopt import AutoAdopter
    from kvmnumad.adopt.watch import ExitWatcher
    from kvmnumad.bus.auth import Authorizer
    from kvmnumad.hotplug import HotplugMonitor
    from kvmnumad.metrics import Metrics
    from kvmnumad.optimizer.balance import Move
    from kvmnumad.optimizer.timer import PeriodicTimer, SamplingTimer
    from kvmnumad.privatebus import PrivateBus

log = logging.getLogger("kvmnumad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvmnumad", description="KVM VMs with NUMA-aware placement, on D-Bus.")
    p.add_argument("--bus", default="private",
                   help="system, session, private (a dbus-daemon of its own: the default) or a D-Bus address")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where VM definitions are kept (default: none for private/session buses, "
                        "/var/lib/kvmnumad for the system bus)")
    p.add_argument("--config-dir", type=Path, default=quotas.DEFAULT_CONFIG_DIR,
                   help=f"where {quotas.FILE_NAME} is read from, at start and on SIGHUP "
                        f"(default: {quotas.DEFAULT_CONFIG_DIR})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-target", default="auto", choices=["auto", "journal", "stderr"])
    p.add_argument("--demo", action="store_true", help="create and start a demo VM (2 guest nodes, 4 vCPUs)")
    p.add_argument("--kvm", default="/dev/kvm", help=argparse.SUPPRESS)
    p.add_argument("--address-file", type=Path, default=None,
                   help="write the bus address here once the name is owned (for scripts and tests)")
    p.add_argument("--version", action="version", version=f"kvmnumad {__version__}")
    p.add_argument("--sample-interval", type=float, default=None,
                   help=f"seconds between samples of every VM (default: {DEFAULT_PERIOD:g}, "
                        f"or sample-interval in {CONFIG_FILE})")
    p.add_argument("--balance-interval", type=float, default=None,
                   help=f"seconds between automatic balancing passes (default: {DEFAULT_BALANCE_PERIOD:g}, "
                        f"or balance-interval in {CONFIG_FILE})")
    p.add_argument("--balance-dwell", type=float, default=None,
                   help=f"seconds a guest node the balancer moved stays put (default: {DEFAULT_DWELL:g}, "
                        f"or balance-dwell in {CONFIG_FILE})")
    p.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                   help=f"serve Prometheus metrics there (default: none; metrics-address in {CONFIG_FILE})")
    p.add_argument("--metrics-textfile", default=None, metavar="PATH",
                   help="write the metrics there after each sample, for node_exporter's textfile collector")
    p.add_argument("--migration-chunk-pages", type=int, default=CHUNK_PAGES, metavar="PAGES",
                   help=f"pages of address space a migration job moves per step, between which Cancel "
                        f"takes effect (default: {CHUNK_PAGES})")
    return p.parse_args(argv)


CONFIG_FILE = "kvmnumad.conf"  # in --config-dir: a [kvmnumad] section with the same keys as the options
CONFIG_KEYS = ("sample-interval", "metrics-address", "metrics-textfile", "balance-interval", "balance-dwell")
_SECONDS_KEYS = ("sample-interval", "balance-interval", "balance-dwell")
DEFAULT_BALANCE_PERIOD = 10.0  # seconds between balancing passes
DEFAULT_DWELL = Thresholds().dwell_s


def apply_config_file(args: argparse.Namespace) -> None:
    """Options the command line left unset, from kvmnumad.conf (if any)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(args.config_dir / CONFIG_FILE)
    except (configparser.Error, UnicodeDecodeError) as e:
        log.error("%s ignored: %s", args.config_dir / CONFIG_FILE, e)
        return
    section = parser["kvmnumad"] if parser.has_section("kvmnumad") else {}
    for key in CONFIG_KEYS:
        attr = key.replace("-", "_")
        if getattr(args, attr) is None and key in section:
            value: object = section[key]
            try:
                setattr(args, attr, float(str(value)) if key in _SECONDS_KEYS else value)
            except ValueError:
                raise SystemExit(f"kvmnumad: {key} in {CONFIG_FILE} must be a number, "
                                 f"got {value!r}") from None
    if args.sample_interval is None:
        args.sample_interval = DEFAULT_PERIOD
    if not args.sample_interval > 0:
        raise SystemExit(f"kvmnumad: sample-interval must be positive, got {args.sample_interval}")
    if args.balance_interval is None:
        args.balance_interval = DEFAULT_BALANCE_PERIOD
    if args.balance_dwell is None:
        args.balance_dwell = DEFAULT_DWELL
    if not args.balance_interval > 0 or not args.balance_dwell >= 0:
        raise SystemExit(f"kvmnumad: balance-interval must be positive and balance-dwell not negative, got "
                         f"{args.balance_interval} and {args.balance_dwell}")
    if args.metrics_address is not None:
        from kvmnumad import metrics  # noqa: PLC0415 -- prometheus_client only when configured

        try:
            metrics.parse_address(args.metrics_address)
        except ValueError as e:
            raise SystemExit(f"kvmnumad: {e}") from None


@dataclass
class Restored:
    """What the restore phase leaves to serve(): the core with its VMs back."""

    manager: Manager
    inherited: handover.Inherited
    record: handover.HandoverRecord | None
    held: holder.Holder | None
    under_systemd: bool
    signals: list[int] = field(default_factory=list)  # SIGTERM/SIGINT that came before the loop ran


def restore(args: argparse.Namespace, signals: list[int]) -> Restored:
    """Bring the VMs back, before the bus stack is even imported: after a
    crash or a restart the guests wait for this and for nothing else.  On
    failure every VM made so far is shut down again (its memory stays in the
    fd store, its definition in the state directory)."""
    # First, before any other fd is opened: what an earlier process left.
    inherited = handover.Inherited.from_environ()
    record = inherited.take_record()
    held = inherited.take_holder()  # the previous image's address space, until its VMs run again
    under_systemd = bool(os.environ.get("NOTIFY_SOCKET"))
    state_dir = args.state_dir
    if state_dir is None and args.bus == "system":
        state_dir = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/kvmnumad"))
    sdnotify.notify("STATUS=starting")
    manager = Manager(args.kvm)
    try:
        manager.migration_chunk_pages = max(1, args.migration_chunk_pages)
        _load_quotas(manager, args.config_dir)  # before any caller can create a VM
        if under_systemd:
            # Before the first VM exists (restored ones included): a crash at
            # any later point finds every memfd in the store.
            manager.subscribe(handover.FdStore(manager))
        resumed: list[str] = []
        if record is not None:
            # A paused handover: each VM continues on its memory with its vCPU state.
            resumed = handover.restore_record(manager, record, inherited)
        if held is not None:
            held.let_go()  # its VMs run again: the old address space may go (reaped in serve)
        if state_dir is not None:
            # Saved VMs come back before the name is requested: a client that
            # finds org.kvmnuma1 finds every VM it had.  Persistence is wired
            # only after restore, so a failed restore rewrites nothing.
            store = StateStore(state_dir)
            crash = handover.CrashResume(inherited)  # memfds kept by the fd store through a crash
            known = persist.restore(manager, store, crash, frozenset(resumed))
            crash.finish(manager)
            manager.subscribe(persist.Persister(manager, store, known))
            adoptions = AdoptionRecords(manager, state_dir)  # processes adopted before, if still there
            adoptions.reattach()
            manager.subscribe(adoptions)
            restored = [vm.name for vm in manager.list_vms()]
            if restored:
                log.info("restored VMs: %s", ", ".join(restored))
        inherited.release_rest()  # memory of VMs whose definition is gone: freed, not leaked
    except BaseException:
        manager.shutdown()
        raise
    return Restored(manager, inherited, record, held, under_systemd, signals)


async def serve(args: argparse.Namespace, core: Restored) -> int:
    import asyncio  # noqa: PLC0415 -- after the restore (module docstring of main)

    from kvmnumad.adopt.watch import ExitWatcher  # noqa: PLC0415
    from kvmnumad.bus.service import connect, start_service  # noqa: PLC0415
    from kvmnumad.demo import create_demo  # noqa: PLC0415
    from kvmnumad.hotplug import HotplugMonitor, RepinQueue  # noqa: PLC0415
    from kvmnumad.privatebus import PrivateBus  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if core.signals:  # asked to stop while the VMs came back: stop now, through the orderly path
        stop.set()
    # SIGHUP is systemctl reload's (and a closed terminal's) signal: without a
    # handler it would kill the daemon and every VM without the orderly stop.
    # It re-reads the quotas (quotas.conf in --config-dir).
    manager = core.manager
    manager_ref: list[Manager] = [manager]
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, manager_ref, args.config_dir)
    reexec_wanted: list[bool] = []

    def request_reexec() -> None:
        reexec_wanted.append(True)
        stop.set()

    record, held, under_systemd = core.record, core.held, core.under_systemd
    if held is not None:
        _reap_holder(loop, held)

    private: PrivateBus | None = None
    bus_spec = args.bus
    service = None
    bus: MessageBus | None = None
    hotplug: HotplugMonitor | None = None
    sampler: SamplingTimer | None = None
    balancing: PeriodicTimer[list[Move]] | None = None
    metrics: Metrics | None = None  # (the type only: imported when configured)
    exits: ExitWatcher | None = None
    adopter: AutoAdopter | None = None
    repins = RepinQueue(manager.on_topology_changed)
    try:
        if bus_spec == "private":
            if record is not None and record.private_bus is not None:
                private = PrivateBus.adopt(**record.private_bus)  # our own bus, kept across Reexec
            else:
                private = PrivateBus()
            bus_spec = private.address
        try:
            hotplug = HotplugMonitor(repins.request)
            hotplug.start(loop)
            # The restore read the topology before the monitor ran: read it
            # once more, so that no hotplug falls between the two unseen.
            if set(read_topology().online_cpus()) != set(manager.online_cpus()):
                repins.request("CPU hotplug during the start")
        except Exception as e:  # no netlink (e.g. a restricted sandbox): run without, say so
            log.warning("CPU hotplug monitoring unavailable: %s", e)
            hotplug = None
        exits = ExitWatcher(manager, loop)  # adopted VMs go when their processes do
        bus = await connect(bus_spec)
        service = await start_service(manager, bus, await _authorizer(bus, args.bus))
        sampler, metrics = _start_sampling(loop, manager, service.publish_sample, args)
        balancing = _start_balancing(loop, manager, sampler, args)
        service.on_reexec = request_reexec
        adopter = await _start_auto_adopt(manager, args.config_dir, loop)
        if args.demo:
            await asyncio.to_thread(create_demo, manager)
        if args.address_file:  # whole or absent: a reader polls for it (rename is atomic)
            partial = args.address_file.with_name(args.address_file.name + ".partial")
            partial.write_text(bus_spec + "\n")
            partial.replace(args.address_file)
        log.info("kvmnumad %s serving org.kvmnuma1 on %s", __version__, bus_spec)
        sdnotify.notify("READY=1", f"STATUS=serving org.kvmnuma1, {len(manager.list_vms())} VM(s)")
        watchdog = sdnotify.Watchdog()
        watchdog.start()
        if private is not None:
            _print_howto(private.address)
        lost = await _until_stopped_or_lost(stop, bus)
        watchdog.stop()
        if reexec_wanted and lost is None:
            log.info("re-executing in place, keeping %d VM(s)", len(manager.list_vms()))
            sdnotify.notify("RELOADING=1", "STATUS=re-executing, VMs paused")
        else:
            sdnotify.notify("STOPPING=1", "STATUS=stopping" if lost is None else f"STATUS=bus lost: {lost}")
        if lost is not None:
            # Unreachable is not alive: exit non-zero so that systemd's
            # Restart=on-failure brings the daemon (and its saved VMs) back.
            log.error("lost the connection to the bus (%s): stopping with exit status 1", lost)
            return 1
        log.info("stopping")
        return 0
    finally:
        if sampler is not None:
            sampler.close()
        if balancing is not None:
            balancing.close()
        if metrics is not None:
            metrics.close()
        if adopter is not None:
            adopter.stop()
        if exits is not None:
            exits.close()
        if hotplug is not None:
            hotplug.stop()
        await repins.drain()
        if service is not None:
            await service.stop()
        if bus is not None:
            bus.disconnect()  # before its private dbus-daemon goes away
            with contextlib.suppress(Exception):
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        saved = None
        if reexec_wanted or under_systemd:
            # The name is gone already: pause and save each VM only now, so
            # that its pause is as short as the hand-over itself.
            saved = await asyncio.to_thread(handover.prepare, manager)
            if not reexec_wanted:
                handover.to_fd_store(saved)  # systemctl restart: the next process resumes them
        if held is not None:
            held.reap()  # an earlier Reexec's holder still unmapping: the next image would not know it
        if saved is not None and reexec_wanted:
            handover.keep_address_space()
        await asyncio.to_thread(manager.shutdown)
        if saved is not None and reexec_wanted:
            if private is not None:
                saved.record.private_bus = private.describe()
            handover.reexec(saved)  # does not return
        if saved is not None:
            saved.close()
        if private is not None:
            private.close()


def _reap_holder(loop: asyncio.AbstractEventLoop, held: holder.Holder) -> None:
    """The holder let go by the restore exits, unmapping the previous image's
    address space as it does (about 1 s per GiB of resident guest memory
    here, on its own, off the pause); reaped once its pidfd says it exited."""
    try:
        pidfd = os.pidfd_open(held.pid)
    except OSError:  # not our child any more: reaped already
        held.reap()
        return

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        log.info("the previous image's address space is released (holder %d gone, %.0f ms after its release)",
                 held.pid, held.reap())

    loop.add_reader(pidfd, exited)


def _start_sampling(loop: asyncio.AbstractEventLoop, manager: Manager, publish: Callable[[Sample], None],
                    args: argparse.Namespace) -> tuple[SamplingTimer, Metrics | None]:
    """The optimizer's timer, feeding the bus and, when configured, the metrics."""
    from kvmnumad.optimizer.timer import SamplingTimer  # noqa: PLC0415 -- after the restore

    timer = SamplingTimer(loop, manager.take_sample, args.sample_interval)
    timer.subscribe(publish)
    metrics = None
    if args.metrics_address is not None or args.metrics_textfile is not None:
        from kvmnumad.metrics import Metrics  # noqa: PLC0415 -- prometheus_client only when configured

        metrics = Metrics(args.metrics_address, args.metrics_textfile)
        timer.subscribe(metrics.update)
        if metrics.textfile is not None:
            write = metrics.write_textfile

            def write_off_loop(_sample: Sample) -> None:
                loop.run_in_executor(None, write)

            timer.subscribe(write_off_loop)
    manager.subscribe(lambda event: timer.wake() if isinstance(event, VmAdded) else None)
    timer.start()
    return timer, metrics


def _start_balancing(loop: asyncio.AbstractEventLoop, manager: Manager, sampler: SamplingTimer,
                     args: argparse.Namespace) -> PeriodicTimer[list[Move]]:
    """The balancing timer (rebalance.py): a pass each period while some VM
    has AutoBalance on (asleep otherwise), and at once on an event that may
    call for one: a VM added, AutoBalance switched, hotplug, a host node's load
    or free memory crossing its threshold in the sampler's figures."""
    from kvmnumad.events import Aspect, Event, TopologyChanged, VmChanged  # noqa: PLC0415 -- after the restore
    from kvmnumad.optimizer.balance import crossings  # noqa: PLC0415
    from kvmnumad.optimizer.timer import PeriodicTimer  # noqa: PLC0415

    balancer = manager.balancer
    balancer.thresholds = dataclasses.replace(balancer.thresholds, dwell_s=args.balance_dwell)
    timer: PeriodicTimer[list[Move]] = PeriodicTimer(loop, balancer.run, args.balance_interval,
                                                         from_start=True)

    def on_event(event: Event) -> None:
        if isinstance(event, (VmAdded, TopologyChanged)) or (
                isinstance(event, VmChanged) and Aspect.BALANCING in event.aspects):
            timer.trigger()

    previous: list[Sample] = []

    def on_sample(sample: Sample) -> None:
        crossed = crossings(previous[0].nodes if previous else None, sample.nodes, balancer.thresholds)
        previous[:] = [sample]
        if crossed and balancer.balanced():
            log.debug("balancing pass now: %s", "; ".join(crossed))
            timer.trigger()

    manager.subscribe(on_event)
    sampler.subscribe(on_sample)
    timer.start()
    return timer


async def _start_auto_adopt(manager: Manager, config_dir: Path,
                            loop: asyncio.AbstractEventLoop) -> AutoAdopter | None:
    """Auto-adopt (kvmnumad/adopt/autoadopt.py) when adopt.conf asks for it."""
    import asyncio  # noqa: PLC0415 -- after the restore

    from kvmnumad.adopt import autoadopt  # noqa: PLC0415
    from kvmnumad.adopt.autoadopt import AutoAdopter  # noqa: PLC0415

    try:
        config = await asyncio.to_thread(autoadopt.load, config_dir)
    except (OSError, ValueError) as e:
        log.error("auto-adopt off: %s", e)
        return None
    if not config.enabled:
        return None
    adopter = AutoAdopter(manager, config)
    try:
        adopter.start(loop)
    except OSError as e:  # no CAP_NET_ADMIN: the proc connector refuses
        log.warning("auto-adopt off: the proc connector refused (%s)", e)
        return None
    return adopter


def _on_sighup(manager_ref: list[Manager], config_dir: Path) -> None:
    if not manager_ref:
        log.info("SIGHUP before the core is up: the quotas are read once it is")
        return
    log.info("SIGHUP: reloading the configuration (the daemon keeps running)")
    _load_quotas(manager_ref[0], config_dir)


def _load_quotas(manager: Manager, config_dir: Path) -> None:
    """At start and on reload.  A file that cannot be read or parsed leaves
    the quotas in force (at start: the built-in ones), never none at all."""
    try:
        loaded = quotas.load(config_dir)
    except (OSError, UnicodeDecodeError, quotas.QuotaError) as e:
        log.error("quotas not changed, still from %s: %s", manager.quotas.source, e)
        return
    manager.set_quotas(loaded)
    d = loaded.default
    log.info("quotas from %s: default vms=%s vcpus=%s memory=%s regions=%s, %d uid(s) of their own",
             loaded.source, d.vms, d.vcpus, d.memory, d.regions, len(loaded.by_uid))


async def _until_stopped_or_lost(stop: asyncio.Event, bus: MessageBus) -> str | None:
    """Wait for SIGTERM/SIGINT (None) or for the bus connection to go (why)."""
    import asyncio  # noqa: PLC0415 -- after the restore

    stopping = asyncio.ensure_future(stop.wait())
    # shielded: cancelling our wait must not cancel the bus's own disconnect future
    lost = asyncio.shield(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    try:
        await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        lost.cancel()
    if stop.is_set() or not lost.done() or lost.cancelled():
        return None
    error = lost.exception()
    return f"{type(error).__name__}: {error}" if error is not None else "disconnected"


async def _authorizer(bus: MessageBus, bus_kind: str) -> Authorizer:
    """Root passes; others go to polkit on the system bus (where polkitd lives)."""
    from kvmnumad.bus.auth import make_authorizer  # noqa: PLC0415 -- after the restore

    return await make_authorizer(bus, use_polkit=bus_kind == "system")


def _print_howto(address: str) -> None:
    print(
        "\nkvmnumad is serving org.kvmnuma1 on a private bus.\n"
        f"  export KVMNUMAD_BUS='{address}'\n"
        f"  busctl --address='{address}' tree org.kvmnuma1\n"
        f"  busctl --address='{address}' call org.kvmnuma1 /org/kvmnuma1 org.kvmnuma1.Manager ListVMs\n"
        f"  busctl --address='{address}' get-property org.kvmnuma1 /org/kvmnuma1/vm/demo "
        "org.kvmnuma1.VM VcpuAffinity\n"
        f"  .venv/bin/kvmnumactl --bus '{address}' list\n"
        f"  .venv/bin/kvmnumactl --bus '{address}' show demo\n"
        "Ctrl-C stops the daemon, its VMs and the bus.\n",
        flush=True,
    )


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: each vCPU costs 2 fds (its vCPU fd
    and the dup its kvm_run mmap keeps), 1 more while the sampler keeps its
    schedstat open, and each VM a few more; systemd's default soft limit (1024) stops at about 70
    VMs of 4 vCPUs.  The hard limit stays as the unit (LimitNOFILE=) set it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the soft fd limit %d to the hard one %d: %s", soft, hard, e)
    else:
        log.debug("soft fd limit raised from %d to %d", soft, hard)


def main(argv: list[str] | None = None) -> int:
    """Two phases: the VMs come back first (:func:`restore`, with only the
    core imported), then asyncio, the bus, udev and the optimizer are
    imported and serve.  Under TCG the interpreter imports about 0.1 s of
    host CPU in 1.5-3 s, and a guest waits for every one of them."""
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_target)
    apply_config_file(args)
    raise_fd_limit()
    install_kick_signal()
    # Until the loop's handlers take over: SIGTERM or SIGINT during the restore
    # is kept and acted on through the orderly stop once the loop runs (their
    # default action would end every VM unsaved); SIGHUP is ignored (the
    # restore reads the quotas anyway).
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        core = restore(args, early)
    except Exception as e:
        log.exception("kvmnumad failed: %s", e)
        return 1
    import asyncio  # noqa: PLC0415 -- after the restore

    try:
        return asyncio.run(serve(args, core))
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        log.exception("kvmnumad failed: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
