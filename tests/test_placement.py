"""Roles from hosts: the shards spread over the nodes, the bundles numbered in order; task 0
on the node where jax.distributed puts the coordinator."""

import os

import pytest

from gorila_jax.wire import rendezvous
from gorila_jax.wire.placement import place


def test_one_host_keeps_the_first_processes_as_shards():
    placement = place(["a"] * 5, 2)
    assert placement.shard_processes == (0, 1)
    assert placement.bundle_processes == (2, 3, 4)
    assert [placement.worker_of(i) for i in range(5)] == [None, None, 0, 1, 2]
    assert [placement.shard_of(i) for i in range(5)] == [0, 1, None, None, None]
    assert place(["a"] * 3, 1).describe() == "server on a (process 0); bundles 1-2 on a"


def test_shards_go_one_per_node_when_srun_packs_the_tasks():
    """`srun -N 2 -n 6`: tasks 0-2 on h1, 3-5 on h2 (block): shard 1 must be on h2, which
    "processes 0..S-1" would have put on h1 too."""
    hosts = ["h1", "h1", "h1", "h2", "h2", "h2"]
    placement = place(hosts, 2)
    assert placement.shard_processes == (0, 3)
    assert placement.bundle_processes == (1, 2, 4, 5)
    assert [placement.hosts[p] for p in placement.shard_processes] == ["h1", "h2"]
    assert placement.describe() == (
        "shard 0 on h1 (process 0); shard 1 on h2 (process 3); bundles 1-2 on h1; bundles 3-4 on h2"
    )


def test_more_shards_than_nodes_go_round_robin_and_cyclic_layouts_too():
    cyclic = ["h1", "h2", "h1", "h2", "h1", "h2"]  # --distribution=cyclic
    assert place(cyclic, 2).shard_processes == (0, 1)
    assert place(["h1", "h1", "h2", "h2", "h3"], 4).shard_processes == (0, 2, 4, 1)


def test_a_run_with_no_room_for_a_bundle_is_refused():
    with pytest.raises(ValueError, match="cannot hold 2 server shard"):
        place(["a", "b"], 2)


def test_each_host_gets_an_aggregator_for_its_bundles():
    """`srun -N 2 -n 7`, 2 shards, --aggregate-per-host: after the shards, the first task
    left on each node aggregates the bundles of that node; the server's workers are the
    aggregators, and the bundles keep their numbers in process order."""
    hosts = ["h1", "h1", "h1", "h1", "h2", "h2", "h2"]
    placement = place(hosts, 2, aggregate=True)
    assert placement.shard_processes == (0, 4)
    assert placement.aggregator_processes == (1, 5)
    assert placement.bundle_processes == (2, 3, 6)
    assert placement.server_workers == 2
    assert [placement.aggregator_for(w) for w in range(3)] == [0, 0, 1]
    assert placement.workers_of(0) == (0, 1) and placement.workers_of(1) == (2,)
    assert [placement.aggregator_of(i) for i in range(7)] == [None, 0, None, None, None, 1, None]
    assert [placement.worker_of(i) for i in range(7)] == [None, None, 0, 1, None, None, 2]
    assert "aggregator 2 on h2 (process 5)" in placement.describe()
    assert place(hosts, 2).server_workers == 5 and place(hosts, 2).aggregator_for(0) is None


def test_an_aggregator_with_no_bundle_beside_it_is_refused():
    with pytest.raises(ValueError, match="h2 has one process besides the server shards"):
        place(["h1", "h1", "h1", "h2", "h2"], 2, aggregate=True)


SLURM_STEP = {
    "SLURM_JOB_ID": "42",
    "SLURM_STEP_NODELIST": "h[1-2]",
    "SLURM_JOB_NODELIST": "h[1-2]",
}


@pytest.mark.parametrize(
    "procid, node, refused",
    [("0", "h1", False), ("0", "h2", True), ("1", "h2", False), ("2", "h1", False)],
)
def test_task_0_off_the_steps_first_node_stops_in_one_line(monkeypatch, procid, node, refused):
    """jax.distributed puts a SLURM step's coordinator on its first node, which task 0 must
    run on (a SLURM_HOSTFILE with --distribution=arbitrary can put it elsewhere: jax then
    failed to bind with a traceback and the other tasks waited 2 minutes for it)."""
    for name in [n for n in os.environ if n.startswith(("SLURM", "JAX_COORDINATOR"))]:
        monkeypatch.delenv(name)
    for name, value in {**SLURM_STEP, "SLURM_PROCID": procid, "SLURMD_NODENAME": node}.items():
        monkeypatch.setenv(name, value)
    if not refused:
        rendezvous.check_task_0_on_the_first_node()
        return
    with pytest.raises(rendezvous.RendezvousError, match="task 0 runs on h2") as caught:
        rendezvous.check_task_0_on_the_first_node()
    assert "first node, h1" in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h2:1234")  # the user's choice stands
    rendezvous.check_task_0_on_the_first_node()
