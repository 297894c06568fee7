"""Prometheus metrics of the optimizer's samples (prometheus_client).

Names are prefixed ``kvmnumad_``, in base units (bytes, seconds, ratios),
counters end in ``_total``; labels ``vm``, ``vcpu``, ``node`` and ``cpu`` so
that queries join node_exporter's ``node_memory_numa_*{node=...}`` and
``node_cpu_seconds_total{cpu=...}``.  Every value comes from the latest
sample: a scrape reads memory, never /proc, and costs the daemon nothing
between samples.

Served only when configured (``--metrics-address HOST:PORT``): by one
thread, one request at a time, each bounded by a socket timeout, so a
hostile client holds at most that thread for that long.  ``--metrics-textfile
PATH`` writes the same text after each sample (atomically) for
node_exporter's textfile collector.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmnumad.libc import PAGE_SIZE
from kvmnumad.optimizer.model import Sample

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds a scrape connection may take


class SampleCollector(Collector):
    """The latest sample as metric families."""

    def __init__(self) -> None:
        self.sample: Sample | None = None
        self.samples = 0

    def update(self, sample: Sample) -> None:
        self.sample = sample  # one reference: a scrape sees one whole sample
        self.samples += 1

    def collect(self) -> Iterator[Metric]:
        s = self.sample
        count = CounterMetricFamily("kvmnumad_samples", "Samples taken since the daemon started")
        count.add_metric([], self.samples)
        yield count
        if s is None:
            return
        cost = GaugeMetricFamily("kvmnumad_sample_cpu_seconds", "CPU time the latest sample cost the daemon")
        cost.add_metric([], s.cost_s)
        yield cost
        res = GaugeMetricFamily("kvmnumad_vm_resident_bytes",
                                "Resident guest memory by guest node and host node",
                                labels=["vm", "guest_node", "node"])
        loc = GaugeMetricFamily("kvmnumad_vm_locality_ratio",
                                "Share of a guest node's resident pages on the host node it is mapped to",
                                labels=["vm", "guest_node", "node"])
        cpu_s = CounterMetricFamily("kvmnumad_vcpu_cpu_seconds", "CPU time of the vCPU thread",
                                    labels=["vm", "vcpu"])
        delay = CounterMetricFamily("kvmnumad_vcpu_run_delay_seconds",
                                    "Time the vCPU thread was runnable but waited for a CPU",
                                    labels=["vm", "vcpu"])
        migr = CounterMetricFamily("kvmnumad_vcpu_migrations", "Moves of the vCPU thread between CPUs",
                                   labels=["vm", "vcpu"])
        where = GaugeMetricFamily("kvmnumad_vcpu_last_cpu_info",
                                  "1 for the CPU (and its node) the vCPU last ran on",
                                  labels=["vm", "vcpu", "cpu", "node"])
        aff = GaugeMetricFamily("kvmnumad_vcpu_allowed_cpu_info", "1 for each CPU the vCPU thread may run on",
                                labels=["vm", "vcpu", "cpu"])
        for vm in s.vms.values():
            for r in vm.residency:
                for node, pages in r.pages.items():
                    res.add_metric([vm.name, str(r.guest_node), str(node)], pages * PAGE_SIZE)
                loc.add_metric([vm.name, str(r.guest_node), str(r.host_node)], r.locality)
            for v in vm.vcpus:
                labels = [vm.name, str(v.vcpu)]
                cpu_s.add_metric(labels, v.cpu_time_ns / 1e9)
                delay.add_metric(labels, v.run_delay_ns / 1e9)
                migr.add_metric(labels, v.migrations)
                if v.cpu >= 0:
                    where.add_metric([*labels, str(v.cpu), str(v.node)], 1)
                for c in sorted(v.affinity):
                    aff.add_metric([*labels, str(c)], 1)
        yield from (res, loc, cpu_s, delay, migr, where, aff)
        yield from _node_families(s)


def _node_families(s: Sample) -> Iterator[Metric]:
    busy = GaugeMetricFamily("kvmnumad_node_cpu_busy_ratio", "Busy share of the node's online CPUs since the "
                             "previous sample", labels=["node"])
    online = GaugeMetricFamily("kvmnumad_node_online_cpus", "Online CPUs of the node", labels=["node"])
    free = GaugeMetricFamily("kvmnumad_node_memory_free_bytes", "MemFree of the node", labels=["node"])
    pages = GaugeMetricFamily("kvmnumad_node_vm_resident_bytes",
                              "Resident guest memory of our VMs on the node", labels=["node"])
    vcpus = GaugeMetricFamily("kvmnumad_node_vcpus", "Our vCPUs that last ran on the node", labels=["node"])
    stat = CounterMetricFamily("kvmnumad_node_numastat", "The kernel's numastat counters of the node "
                               "(/sys/devices/system/node/nodeN/numastat)", labels=["node", "counter"])
    for n in s.nodes:
        node = str(n.node)
        busy.add_metric([node], n.busy)
        online.add_metric([node], len(n.online_cpus))
        free.add_metric([node], n.mem_free)
        pages.add_metric([node], n.vm_pages * PAGE_SIZE)
        vcpus.add_metric([node], n.vm_vcpus)
        for name, value in sorted(n.numastat.items()):
            stat.add_metric([node, name], value)
    yield from (busy, online, free, pages, vcpus, stat)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # StreamRequestHandler: a socket timeout per connection

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics: " + format, *args)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class Metrics:
    """The registry, and where it is served or written."""

    def __init__(self, address: str | None = None, textfile: str | None = None) -> None:
        self.collector = SampleCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.textfile = textfile
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        if address is not None:
            host, port = parse_address(address)
            self._server = make_server(host, port, make_wsgi_app(self.registry), handler_class=_QuietHandler)
            self._thread = threading.Thread(target=self._server.serve_forever, name="kvmnumad-metrics",
                                            daemon=True)
            self._thread.start()
            log.info("metrics served on http://%s:%d/metrics", host, self._server.server_port)

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    def update(self, sample: Sample) -> None:
        """After each sample, on the loop: memory only (the textfile is written by write_textfile)."""
        self.collector.update(sample)

    def write_textfile(self) -> None:
        """Blocking (a file write and rename): off the loop."""
        if self.textfile is not None:
            try:
                write_to_textfile(self.textfile, self.registry)
            except OSError as e:
                log.error("metrics textfile %s not written: %s", self.textfile, e)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
