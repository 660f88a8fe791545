"""Process-group setup for one training job, whoever started the ranks (vectorlm/train/launch.py locally, srun under
SLURM)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from vectorlm.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class DistributedEnv:
    """This rank's place in the job, and its process groups.

    The default group (NCCL on GPUs) carries the training step's collectives, under
    ``train.collective_timeout_minutes``. Waits that can be long because some rank does file work (resume planning,
    reading and writing checkpoints and base weights) happen on CPU (gloo) groups under
    ``train.checkpoint_timeout_minutes``, never inside an NCCL collective: ``cpu_group`` for the main thread's
    coordination (barriers, object broadcasts, the step's token counts, stop requests) and ``checkpoint_group`` for
    DCP, whose asynchronous saves run collectives from a background thread.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    cpu_group: dist.ProcessGroup | None = None
    checkpoint_group: dist.ProcessGroup | None = None

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    *,
    collective_timeout_minutes: float = TrainConfig.collective_timeout_minutes,
    checkpoint_timeout_minutes: float = TrainConfig.checkpoint_timeout_minutes,
) -> DistributedEnv:
    """Joins the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

    Ranks started by ``srun`` have SLURM's variables instead, which submitit translates. Uses NCCL with one GPU per
    rank when CUDA is available (the local rank's GPU among those visible: all of the node's, or only its own when
    SLURM binds GPUs to tasks), else gloo on CPU.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # submitit reads SLURM's variables only when told so
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    timeout = timedelta(minutes=collective_timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    file_work = timedelta(minutes=checkpoint_timeout_minutes)
    cpu_group = dist.new_group(backend="gloo", timeout=file_work)
    checkpoint_group = dist.new_group(backend="gloo", timeout=file_work)
    return DistributedEnv(rank, world_size, local_rank, local_world_size, device, cpu_group, checkpoint_group)


def build_mesh(env: DistributedEnv, sharding: str) -> DeviceMesh:
    """The device mesh FSDP2 shards over.

    full: one dimension over every rank. hybrid: (nodes, ranks per node), sharding inside a node where the
    interconnect is fast and only all-reducing gradients across nodes. none: (ranks, 1), every rank a full replica.
    """
    if sharding == "full":
        shape, names = (env.world_size,), ("shard",)
    elif sharding == "hybrid":
        if env.num_nodes < 2:
            raise ConfigError(
                f"train.sharding: hybrid needs ranks on at least 2 nodes; this job has {env.world_size} ranks on one "
                "node, where full sharding does the same with less communication"
            )
        shape, names = (env.num_nodes, env.local_world_size), ("replicate", "shard")
    else:
        assert sharding == "none", sharding  # the schema allows no other value
        shape, names = (env.world_size, 1), ("replicate", "shard")
    return init_device_mesh(env.device.type, shape, mesh_dim_names=names)


def all_reduce_sum(*values: float, device: torch.device, group: dist.ProcessGroup | None = None) -> list[float]:
    """Sums scalars over all ranks in one collective (on a CPU ``group``: no device-to-host synchronisation)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()
