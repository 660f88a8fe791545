import pytest

from vectorlm.config import ConfigError, TrainConfig
from vectorlm.train.launch import in_slurm_allocation, srun_command
from vectorlm.train.placement import Placement, check_train_resources

TRAIN = TrainConfig(global_batch_size=64, micro_batch_size=2)


def test_local_default():
    assert check_train_resources({"tasks": 2}, train=TRAIN, threads=2) == Placement(2, 1, 1)


def test_one_node_four_gpus():
    resources = {"tasks": 4, "nodes": 1, "gres": "gpu:4", "tasks_per_gpu": 1, "cpus_per_task": 8}
    assert check_train_resources(resources, train=TRAIN, threads=32) == Placement(4, 1, 8)


def test_two_nodes_hybrid_with_typed_gres():
    resources = {"tasks": 8, "nodes": 2, "gres": "'gpu:a100:4'", "tasks_per_gpu": 1, "cpus_per_gpu": 6}
    placement = check_train_resources(resources, train=TrainConfig(global_batch_size=64, sharding="hybrid"), threads=1)
    assert placement == Placement(8, 2, 6) and placement.ranks_per_node == 4


@pytest.mark.parametrize(
    ("resources", "train", "message"),
    [
        ({"tasks": 6, "nodes": 4}, TRAIN, r"tasks \(6\) must be divisible by nodes \(4\)"),
        ({"tasks": 4, "nodes": 2, "gpu": 3, "tasks_per_gpu": 1}, TRAIN, r"gpu \(3\) is not divisible by nodes \(2\)"),
        ({"tasks": 4, "gres": "gpu:8", "tasks_per_gpu": 1}, TRAIN, r"tasks \(4\) must equal the GPUs requested \(8\)"),
        ({"tasks": 4, "gres": "gpu:4"}, TRAIN, "needs tasks_per_gpu: 1 with GPUs"),
        ({"tasks": 4, "gres": "gpu:many", "tasks_per_gpu": 1}, TRAIN, "does not end in a GPU count"),
        ({"tasks": 4}, TrainConfig(sharding="hybrid", global_batch_size=8), r"hybrid .* needs resources nodes >= 2"),
        ({"tasks": 3}, TRAIN, r"global_batch_size \(64\) must be divisible by .* x world size \(3\)"),
    ],
)
def test_resources_that_cannot_work(resources, train, message):
    with pytest.raises(ConfigError, match=message):
        check_train_resources(resources, train=train, threads=4)


def test_srun_command_spans_nodes():
    command = srun_command(["python", "-m", "vectorlm.train.rank", "job.yaml"], Placement(8, 2, 6))
    assert command[:7] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=6",
                           "--kill-on-bad-exit=0", "--wait=60"]  # fmt: skip
    assert command[-1] == "job.yaml"


def test_srun_only_inside_an_allocation_and_not_inside_a_step(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    assert not in_slurm_allocation()
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert in_slurm_allocation()
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert not in_slurm_allocation()
