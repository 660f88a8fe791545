"""The workflow on a real (single-node) SLURM cluster through the Snakemake SLURM executor plugin.

tests/slurm/cluster.sh brings the cluster up (as root: it installs Debian packages and starts munge, MariaDB,
slurmdbd, slurmctld and slurmd). Every snakemake call is bounded with `timeout -s INT` (snakemake ignores SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, write_jsonl

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"
CONFIG = {
    "model": "resources/tiny-llama",
    "output_dir": "results/slurm",
    "max_seq_len": 128,
    "data": {"train": "corpus.jsonl", "eval_fraction": 0.1},
    "train": {"max_steps": 60, "lr": 3.0e-3, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 2,
              "eval_every": 30, "log_every": 1, "checkpoint_every": 5},
    "export": {"smoke_test_prompt": "Once upon"},
}  # fmt: skip


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("starting SLURM needs root (CI runs as root)")
    subprocess.run(["bash", str(CLUSTER), "up"], check=True, timeout=600)


def snakemake_command(workdir: Path, *args: str, timeout: int = 900) -> list[str]:
    return [
        "timeout", "-s", "INT", "-k", "30", str(timeout), sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), f"--configfile={workdir / 'config.yaml'}",
        *args,
    ]  # fmt: skip


def sacct(job_id: str) -> dict[str, tuple[str, str, str]]:
    """{job or step id: (tasks, state, exit code)} of one SLURM job."""
    out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "--format=JobID,NTasks,State,ExitCode"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return {fields[0]: tuple(fields[1:]) for fields in (line.split("|") for line in out.splitlines())}


def train_jobs(workdir: Path) -> list[str]:
    """SLURM job ids of the train rule's attempts, oldest first (the plugin names their logs by job id)."""
    logs = (workdir / ".snakemake" / "slurm_logs" / "rule_train").glob("*.log")
    return sorted((p.stem for p in logs), key=int)


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory, corpus_rows):
    """The whole DAG through the test profile; the first train attempt is sent SIGUSR1 mid-run, as SLURM does
    before a time limit, and the profile's retry resumes it."""
    workdir = tmp_path_factory.mktemp("slurm")
    write_jsonl(workdir / "corpus.jsonl", corpus_rows[:300])
    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    output = open(workdir / "snakemake.out", "w")  # noqa: SIM115 (closed in the finally below, after snakemake)
    start = time.monotonic()
    process = subprocess.Popen(
        snakemake_command(workdir, "--profile", str(TEST_PROFILE), "--verbose", "all"),
        stdout=output, stderr=subprocess.STDOUT,
    )  # fmt: skip
    metrics = workdir / "results" / "slurm" / "train" / "metrics.jsonl"
    try:
        while not (metrics.is_file() and '"step": 12,' in metrics.read_text()):
            assert process.poll() is None, (workdir / "snakemake.out").read_text()[-5000:]
            assert time.monotonic() - start < 600, "training did not reach step 12"
            time.sleep(0.2)
        (first_attempt,) = train_jobs(workdir)
        subprocess.run(["scancel", "--signal=USR1", first_attempt], check=True)
        assert process.wait(timeout=900) == 0, (workdir / "snakemake.out").read_text()[-5000:]
    finally:
        if process.poll() is None:  # stop snakemake (SIGINT: it ignores SIGTERM) and its jobs
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        output.close()
    return workdir, time.monotonic() - start


def test_dag_runs_through_slurm_with_a_two_task_train_step(slurm_run):
    workdir, seconds = slurm_run
    print(f"SLURM DAG run: {seconds:.0f} s")
    out = workdir / "results" / "slurm"
    model = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    assert model.config.num_hidden_layers == 4
    *_, last = train_jobs(workdir)
    steps = sacct(last)
    assert steps[f"{last}.0"][:2] == ("2", "COMPLETED"), steps
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 60
    log = (out / "logs" / "train.log").read_text()
    assert f"with srun in SLURM job {last}: srun --nodes=1 --ntasks=2 --ntasks-per-node=2" in log


def test_sigusr1_checkpoints_and_the_retry_resumes(slurm_run):
    workdir, _ = slurm_run
    first, *later = train_jobs(workdir)
    assert later, "the profile's retry should have resubmitted train"
    steps = sacct(first)
    assert steps[f"{first}.0"][0] == "2" and steps[f"{first}.0"][2] == "75:0", steps  # exit 75: checkpointed
    first_log = (workdir / ".snakemake" / "slurm_logs" / "rule_train" / f"{first}.log").read_text()
    assert "received SIGUSR1: saved a checkpoint at step" in first_log
    assert "resumed from results/slurm/checkpoints/step_" in (workdir / "results/slurm/logs/train.log").read_text()


def test_train_sbatch_line_carries_tasks_and_the_warning_signal(slurm_run):
    workdir, _ = slurm_run
    calls = [line for line in (workdir / "snakemake.out").read_text().splitlines()
             if line.startswith("sbatch call:") and "--comment rule_train" in line]  # fmt: skip
    assert calls
    assert "--nodes=1 --ntasks=2 --cpus-per-task=1 --signal=USR1@60" in calls[0], calls[0]
    print(calls[0].split(" --wrap=")[0])


def test_gpu_request_path_of_the_shipped_profile(slurm_run, tmp_path):
    """profiles/slurm itself, sized down to the test cluster's 2 fake GPUs and 2 CPUs: SLURM accepts the GPU request
    (--gres, --ntasks-per-gpu, --cpus-per-task), and the ranks of the srun step see the job's GPUs (each then takes
    the one of its local rank)."""
    workdir, _ = slurm_run
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["set-resources"]["train"].update(tasks=2, gres="gpu:2", cpus_per_task=1, mem_mb=3000, runtime=10)
    profile["default-resources"].update(mem_mb=1500, cpus_per_task=1, runtime=15)
    profile["set-threads"]["train"] = 2
    profile.update({"latency-wait": 5, "slurm-init-seconds-before-status-checks": 2,
                    "slurm-keep-successful-logs": True})  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(profile))
    result = subprocess.run(
        snakemake_command(workdir, "--profile", str(tmp_path), "--forcerun", "train", "--verbose", "--", "train"),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    call = next(line for line in result.stdout.splitlines() + result.stderr.splitlines()
                if line.startswith("sbatch call:") and "rule_train" in line)  # fmt: skip
    assert "--ntasks-per-gpu=1" in call and "--gres=gpu:2" in call and "--cpus-per-task=1" in call, call
    assert "--signal=USR1@300" in call
    print(call.split(" --wrap=")[0])
    log = (workdir / "results" / "slurm" / "logs" / "train.log").read_text()
    expected = ("0@vm:cpu(local rank 0, CUDA_VISIBLE_DEVICES=0,1), "
                "1@vm:cpu(local rank 1, CUDA_VISIBLE_DEVICES=0,1)")  # fmt: skip
    assert expected in log.replace(os.uname().nodename, "vm")


def test_evaluate_gets_the_profiles_gpus_in_one_process(slurm_run, tmp_path):
    """The shipped profile's evaluate job, given 2 (fake) GPUs: one task that sees both, as a model spread over a
    node's GPUs needs (the plugin would otherwise ask for a task per GPU)."""
    workdir, _ = slurm_run
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["set-resources"]["evaluate"].update(gres="gpu:2", cpus_per_task=1, mem_mb=3000, runtime=10)
    profile["default-resources"].update(mem_mb=1500, cpus_per_task=1, runtime=15)
    profile.update({"latency-wait": 5, "slurm-init-seconds-before-status-checks": 2,
                    "slurm-keep-successful-logs": True})  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(profile))
    config = {**CONFIG, "evaluate": {"prompts": ["Once upon"], "max_new_tokens": 4}}
    (workdir / "evaluate.yaml").write_text(yaml.safe_dump(config))
    command = snakemake_command(workdir, "--profile", str(tmp_path), "--verbose", "--", "evaluate")
    command[command.index(f"--configfile={workdir / 'config.yaml'}")] = f"--configfile={workdir / 'evaluate.yaml'}"
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    call = next(line for line in result.stdout.splitlines() + result.stderr.splitlines()
                if line.startswith("sbatch call:") and "rule_evaluate" in line)  # fmt: skip
    assert "--gres=gpu:2" in call and "--ntasks-per-gpu" not in call, call
    log = (workdir / "results" / "slurm" / "logs" / "evaluate.log").read_text()
    assert "for evaluation on cpu (CUDA_VISIBLE_DEVICES=0,1)" in log  # fake GPUs: torch finds none and uses the CPU
    generations = (workdir / "results" / "slurm" / "evaluate" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in generations] == ["Once upon"]
