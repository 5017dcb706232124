"""Which process of a run plays which role, from the hosts the processes run on.

A run of N processes has S server shards and N - S bundles. Under SLURM the tasks' hosts
come from how the job was laid out (`srun -N 2 -n 6` packs tasks 0-2 on the first node
and 3-5 on the second), so "processes 0..S-1 are the shards" would put every shard on
the first node. `place` spreads the shards over the hosts instead: the first process of
each host in turn (in the order the hosts first appear), then the second of each, until S
are chosen; the other processes are the bundles, numbered in process order. On one host
(a local run, a single node) that is processes 0..S-1, as before.

With `--aggregate-per-host`, the first process left on each host after the shards is that
host's aggregator (`gorila_jax.aggregator`): the bundles of the host push to it, and it
alone pushes to the shards, so the server's workers are the aggregators.
"""

from __future__ import annotations

from typing import NamedTuple


class Placement(NamedTuple):
    """The role of every process of a run."""

    hosts: tuple[str, ...]  # per process index, the host it runs on
    shard_processes: tuple[int, ...]  # per shard, its process index
    bundle_processes: tuple[int, ...]  # per bundle (worker 0, 1, ...), its process index
    aggregator_processes: tuple[int, ...] = ()  # per aggregator, its process index

    @property
    def server_workers(self) -> int:
        """How many workers push to the shards: the aggregators, or else the bundles."""
        return len(self.aggregator_processes or self.bundle_processes)

    def aggregator_of(self, index: int) -> int | None:
        """The aggregator process `index` is, or None."""
        processes = self.aggregator_processes
        return processes.index(index) if index in processes else None

    def aggregator_for(self, worker: int) -> int | None:
        """The aggregator bundle `worker` pushes to (the one on its host), or None when the
        run has no aggregators."""
        host = self.hosts[self.bundle_processes[worker]]
        for aggregator, process in enumerate(self.aggregator_processes):
            if self.hosts[process] == host:
                return aggregator
        return None

    def workers_of(self, aggregator: int) -> tuple[int, ...]:
        """The bundles (worker numbers) that push to `aggregator`."""
        return tuple(
            w for w in range(len(self.bundle_processes)) if self.aggregator_for(w) == aggregator
        )

    def shard_of(self, index: int) -> int | None:
        """The shard process `index` is, or None for a bundle."""
        return self.shard_processes.index(index) if index in self.shard_processes else None

    def worker_of(self, index: int) -> int | None:
        """The worker number (0-based) of the bundle process `index`, or None for a shard or
        an aggregator."""
        return self.bundle_processes.index(index) if index in self.bundle_processes else None

    def describe(self) -> str:
        """Where each role landed, for the run's log: one line."""
        single = len(self.shard_processes) == 1
        parts = [
            f"{'server' if single else f'shard {k}'} on {self.hosts[p]} (process {p})"
            for k, p in enumerate(self.shard_processes)
        ]
        parts += [
            f"aggregator {a + 1} on {self.hosts[p]} (process {p})"
            for a, p in enumerate(self.aggregator_processes)
        ]
        by_host: dict[str, list[int]] = {}
        for worker, process in enumerate(self.bundle_processes):
            by_host.setdefault(self.hosts[process], []).append(worker + 1)
        parts += [
            f"bundle{'s' if len(numbers) > 1 else ''} {_ranges(numbers)} on {host}"
            for host, numbers in by_host.items()
        ]
        return "; ".join(parts)


def place(hosts: list[str] | tuple[str, ...], shards: int, *, aggregate: bool = False) -> Placement:
    """The roles of processes on `hosts` (one entry per process index), `shards` of them
    shards spread over the hosts round-robin, and with `aggregate` the first process left
    on each host its aggregator. ValueError (one line) when there is no bundle left, or a
    host would have an aggregator and no bundle."""
    if not 0 <= shards < len(hosts):
        raise ValueError(
            f"{len(hosts)} process(es) cannot hold {shards} server shard(s) and a bundle"
        )
    queues: dict[str, list[int]] = {}
    for index, host in enumerate(hosts):
        queues.setdefault(host, []).append(index)
    chosen: list[int] = []
    while len(chosen) < shards:
        for waiting in queues.values():
            if waiting and len(chosen) < shards:
                chosen.append(waiting.pop(0))
    aggregators: list[int] = []
    if aggregate:
        for host, waiting in queues.items():
            if len(waiting) == 1:
                raise ValueError(
                    f"--aggregate-per-host: {host} has one process besides the server shards, "
                    "and its aggregator needs a bundle beside it; start one more there"
                )
            if waiting:
                aggregators.append(waiting[0])
    taken = set(chosen) | set(aggregators)
    bundles = tuple(i for i in range(len(hosts)) if i not in taken)
    return Placement(tuple(hosts), tuple(chosen), bundles, tuple(sorted(aggregators)))


def _ranges(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> "1-3, 5"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
