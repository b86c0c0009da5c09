"""CPU topology (NUMA nodes, physical cores) and where the CPU expert threads run.

Read from /sys so no libnuma is needed; tests build a `CpuTopology` by hand to simulate nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")
_SYS_NODE = Path("/sys/devices/system/node")


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' (the kernel's cpulist format) -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass(frozen=True, slots=True)
class CpuTopology:
    """Per NUMA node, its physical cores, each as the tuple of its allowed logical cpus."""

    nodes: dict[int, tuple[tuple[int, ...], ...]]

    @classmethod
    def detect(cls) -> CpuTopology:
        """This machine's topology, limited to the cpus this process may run on."""
        allowed = os.sched_getaffinity(0)
        node_of: dict[int, int] = {}
        for node_dir in sorted(_SYS_NODE.glob("node[0-9]*")):
            try:
                for cpu in parse_cpu_list((node_dir / "cpulist").read_text()):
                    node_of[cpu] = int(node_dir.name[4:])
            except OSError:
                continue
        cores: dict[tuple[int, int], list[int]] = {}  # (node, first sibling) -> cpus
        for cpu in sorted(allowed):
            try:
                siblings = parse_cpu_list(
                    (_SYS_CPU / f"cpu{cpu}/topology/thread_siblings_list").read_text()
                )
            except OSError:
                siblings = [cpu]
            cores.setdefault((node_of.get(cpu, 0), min(siblings)), []).append(cpu)
        nodes: dict[int, list[tuple[int, ...]]] = {}
        for (node, _), cpus in sorted(cores.items()):
            nodes.setdefault(node, []).append(tuple(cpus))
        return cls({n: tuple(c) for n, c in nodes.items()})

    @property
    def physical_cores(self) -> int:
        return sum(len(cores) for cores in self.nodes.values())

    def describe(self) -> str:
        parts = [f"node {n}: {len(c)} cores" for n, c in sorted(self.nodes.items())]
        return f"{self.physical_cores} physical cores ({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Per CPU expert thread: the cpus it is pinned to and its NUMA node (the pool's arguments)."""

    cpus: list[list[int]]
    nodes: list[int]

    @property
    def num_threads(self) -> int:
        return len(self.nodes)


def default_threads(topology: CpuTopology, with_gpu: bool) -> int:
    """Physical cores minus 2 with a GPU (the host thread that launches the GPU's work and the
    CUDA callback thread need their own cores), all of them on the CPU alone."""
    cores = topology.physical_cores
    return max(1, cores - 2) if with_gpu else cores


def plan_workers(topology: CpuTopology, threads: int, binding: str) -> WorkerPlan:
    """`threads` workers spread over the nodes in proportion to their cores.

    binding "core": each worker on one physical core (all its hyperthreads); "numa": each worker
    on any core of its node. NOTE: workers take a node's last cores first, so the first cores
    (where the OS, the Python thread and CUDA's threads usually run) are left free.
    """
    total = topology.physical_cores
    if threads > total:
        raise ValueError(
            f"--moe-cpu-threads {threads} is more than the {total} physical cores this process "
            f"may use ({topology.describe()}); use at most {total}: memory-bound expert kernels "
            "gain nothing from hyperthreads."
        )
    if binding not in ("core", "numa"):
        raise ValueError(f"moe_thread_binding {binding!r} is unknown; choose core or numa.")
    nodes = sorted(topology.nodes)
    # Largest-remainder split of the threads over the nodes, by their core counts.
    shares = {n: threads * len(topology.nodes[n]) / total for n in nodes}
    counts = {n: int(shares[n]) for n in nodes}
    for n in sorted(nodes, key=lambda n: counts[n] - shares[n])[: threads - sum(counts.values())]:
        counts[n] += 1
    cpus: list[list[int]] = []
    worker_nodes: list[int] = []
    for n in nodes:
        cores = topology.nodes[n]
        node_cpus = sorted(c for core in cores for c in core)
        for core in reversed(cores[len(cores) - counts[n] :]):
            cpus.append(list(core) if binding == "core" else node_cpus)
            worker_nodes.append(n)
    return WorkerPlan(cpus, worker_nodes)
