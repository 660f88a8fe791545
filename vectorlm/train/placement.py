"""How many ranks a training job runs, on how many nodes, and whether the train rule's resources can work.

Kept free of torch so that the Snakefile can check the resources when it builds the DAG, before any job is
submitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vectorlm.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Placement:
    """Where a job's ranks run: how many, on how many nodes, with how many CPU threads each."""

    ranks: int
    nodes: int = 1
    cpus_per_rank: int = 1

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nodes


def _gpus(resources: Mapping[str, Any], nodes: int) -> int | None:
    """GPUs requested in total: ``gres`` ("gpu:4" or "gpu:a100:4") is per node, ``gpu`` is for the whole job."""
    gres = str(resources.get("gres") or "").strip("'\"")
    if gres.startswith("gpu"):
        count = gres.split(":")[-1]
        if not count.isdigit():
            raise ConfigError(f"resources: train gres {gres!r} does not end in a GPU count (e.g. gpu:4)")
        return int(count) * nodes
    gpu = resources.get("gpu")
    return int(gpu) if gpu else None


def check_train_resources(resources: Mapping[str, Any], *, train: TrainConfig, threads: int) -> Placement:
    """The placement the train rule's resources ask for, after checking that it can work.

    Checked before anything is submitted: ranks divide evenly over nodes; with GPUs, one rank per GPU, the same
    number of GPUs on every node and ``tasks_per_gpu: 1``; hybrid sharding has at least two nodes; and the global
    batch divides over the ranks.

    Raises:
        ConfigError: naming the resource (or config key) and what would work.
    """
    ranks, nodes = int(resources.get("tasks") or 1), int(resources.get("nodes") or 1)
    if ranks % nodes:
        raise ConfigError(f"resources: train tasks ({ranks}) must be divisible by nodes ({nodes}): every node runs "
                          "the same number of ranks")  # fmt: skip
    gpus = _gpus(resources, nodes)
    if gpus is not None:
        if resources.get("gpu") and gpus % nodes:
            raise ConfigError(f"resources: train gpu ({gpus}) is not divisible by nodes ({nodes}); ask for GPUs per "
                              "node with gres: gpu:N instead")  # fmt: skip
        if gpus != ranks:
            raise ConfigError(f"resources: train tasks ({ranks}) must equal the GPUs requested ({gpus}): one rank "
                              "per GPU")  # fmt: skip
        if int(resources.get("tasks_per_gpu") or 0) != 1:
            raise ConfigError("resources: train needs tasks_per_gpu: 1 with GPUs (without it the SLURM plugin asks for "
                              "`tasks` tasks per GPU and the job can never start)")  # fmt: skip
    if train.sharding == "hybrid" and nodes < 2:
        raise ConfigError(f"train.sharding: hybrid shards within a node and replicates across nodes, so it needs "
                          f"resources nodes >= 2 (got {nodes}); use full on one node")  # fmt: skip
    train.grad_accumulation_steps(ranks)
    cpus = resources.get("cpus_per_task") or (resources.get("cpus_per_gpu") if gpus else None)
    return Placement(ranks=ranks, nodes=nodes, cpus_per_rank=int(cpus) if cpus else max(1, threads // ranks))
