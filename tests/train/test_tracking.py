"""Experiment tracking: each backend's own files, read back, hold what train/metrics.jsonl holds, also after a kill
and a resume; a backend that is not installed fails before any job starts."""

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

from tests.conftest import REPO, run_training, write_jsonl
from tests.train.test_resume import start_job, wait_for_checkpoint, wait_for_step
from vectorlm.config import TrainConfig
from vectorlm.run_dir import RunDir
from vectorlm.train.job import TrainJob
from vectorlm.train.metrics_log import read_metrics
from vectorlm.train.tracking import hyperparameters

RUN = {"max_steps": 10, "lr": 3e-3, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 2,
       "checkpoint_every": 3, "eval_every": 4, "seed": 5, "log_every": 1}  # fmt: skip
ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The user's environment must not send these runs anywhere."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def expected(output_dir: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of the metrics file: what every tracker must hold."""
    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(output_dir / "train" / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step" and value is not None:
                assert record["step"] not in series.setdefault(key, {}), f"step {record['step']} twice in the file"
                series[key][record["step"]] = float(value)
    return series


def tensorboard_runs(output_dir: Path) -> dict[str, tuple[dict[str, dict[int, float]], dict[str, object]]]:
    """{run directory: ({tag: {step: value}}, hyperparameters)} read from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = {}
    for directory in sorted((output_dir / "tracking" / "tensorboard").iterdir()):
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        events.Reload()
        series: dict[str, dict[int, float]] = {}
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                assert event.step not in series.setdefault(tag, {}), f"{tag}: step {event.step} twice"
                series[tag][event.step] = event.value
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        hparams = {
            k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()
        }
        runs[directory.name] = (series, hparams)
    return runs


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", a magic number, a version), then LevelDB's log
    format (32 KiB blocks; records of crc32c, little-endian length, type: full, first, middle or last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, payload = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if block - pos % block < 7 or kind == 0:  # a block's zero-filled tail
            pos += block - pos % block
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(payload)
            payload = b""


def wandb_runs(output_dir: Path) -> dict[str, tuple[dict[str, dict[int, float]], dict[str, object]]]:
    """{run id: ({key: {step: value}}, config)} read from the offline run directories (a resumed run adds one)."""
    runs: dict[str, tuple[dict, dict]] = {}
    rows: dict[str, list[int]] = {}
    for path in sorted((output_dir / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")):
        series, config = runs.setdefault(path.stem.removeprefix("run-"), ({}, {}))
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                rows.setdefault(path.stem, []).append(items["_step"])
                step = items.pop("step")  # the training step; _step numbers the rows
                for key, value in items.items():
                    if not key.startswith("_"):
                        assert step not in series.setdefault(key, {}), f"{key}: step {step} twice"
                        series[key][step] = value
            elif record.WhichOneof("record_type") in ("run", "config"):  # the config comes with the run record
                updates = record.run.config.update if record.HasField("run") else record.config.update
                config.update({item.key: json.loads(item.value_json) for item in updates})
    for run, numbers in rows.items():  # a resumed run continues the row numbers: W&B drops rows that go back
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"{run}: rows {numbers}"
    return runs


def mlflow_runs(output_dir: Path) -> dict[str, tuple[dict[str, dict[int, float]], dict[str, str]]]:
    """{run id: ({metric: {step: value}}, params)} read from the local store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'tracking' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vectorlm")
    runs = {}
    for run in client.search_runs([experiment.experiment_id]):
        series: dict[str, dict[int, float]] = {}
        for key in run.data.metrics:
            for point in client.get_metric_history(run.info.run_id, key):
                assert point.step not in series.setdefault(key, {}), f"{key}: step {point.step} twice"
                series[key][point.step] = point.value
        runs[run.info.run_id] = (series, run.data.params)
    return runs


def assert_same_series(tracked: dict[str, dict[int, float]], output_dir: Path) -> None:
    want = expected(output_dir)
    assert tracked.keys() == want.keys()
    for key, points in want.items():
        assert tracked[key].keys() == points.keys(), key
        for step, value in points.items():  # TensorBoard stores float32
            assert tracked[key][step] == pytest.approx(value, rel=1e-6, abs=1e-30), f"{key} at step {step}"


def train_state(output_dir: Path) -> dict:
    return json.loads((output_dir / "checkpoints" / f"step_{RUN['max_steps']}" / "train_state.json").read_text())


def test_every_backend_holds_the_metrics_file_and_the_config(tmp_path, tiny_model_dir, packed_dir):
    run_training(tmp_path, tiny_model_dir, packed_dir, report_to=ALL, **RUN)
    want = expected(tmp_path)
    assert {"loss", "eval_loss", "lr", "grad_norm", "tokens_per_second", "peak_memory_mb", "skipped_steps"} <= set(want)
    assert sorted(want["eval_loss"]) == [0, 4, 8, 10] and sorted(want["loss"]) == list(range(1, 11))
    ids = train_state(tmp_path)["tracking"]

    (tb_id, (series, hparams)), *others = tensorboard_runs(tmp_path).items()
    assert not others and tb_id == ids["tensorboard"]
    assert_same_series(series, tmp_path)
    assert hparams["train.lr"] == pytest.approx(3e-3) and hparams["train.report_to"] == str(ALL)

    (wandb_id, (series, config)), *others = wandb_runs(tmp_path).items()
    assert not others and wandb_id == ids["wandb"]
    assert_same_series(series, tmp_path)
    assert config["train"]["lr"] == 3e-3 and config["data"]["eval_fraction"] == 0.1

    (mlflow_id, (series, params)), *others = mlflow_runs(tmp_path).items()
    assert not others and mlflow_id == ids["mlflow"]
    assert_same_series(series, tmp_path)
    assert params["train.lr"] == "0.003" and params["train.max_steps"] == "10"


def test_a_killed_run_resumes_the_same_tracked_runs_without_duplicates(tmp_path, tiny_model_dir, packed_dir):
    """Killed after a checkpoint (so steps are redone on resume) with two backends; resumed with a third, which
    receives the earlier records too."""
    job = TrainJob(model=str(tiny_model_dir), packed=str(packed_dir), output_dir=str(tmp_path),
                   train=TrainConfig(**RUN, report_to=["tensorboard", "wandb"]))  # fmt: skip
    process = start_job(tmp_path, tiny_model_dir, packed_dir, job=job)
    wait_for_step(tmp_path, 5, process)  # past the checkpoint of step 3: at least steps 4 and 5 are trained twice
    wait_for_checkpoint(tmp_path, 3, process)
    # The ranks stop (W&B's writer does not); once W&B has written what the metrics file holds, all is killed. What
    # W&B has not written when a job is killed outright (at most its last second) is lost: not tested here.
    subprocess.run(["pkill", "-STOP", "-g", str(process.pid), "-f", "vectorlm.train.rank"], check=True)
    deadline = time.monotonic() + 5
    while (
        next(iter(wandb_runs(tmp_path).values()), ({}, {}))[0].get("loss", {}).keys()
        != expected(tmp_path)["loss"].keys()
    ):
        assert time.monotonic() < deadline, "W&B did not write its records within 5 s"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = tensorboard_runs(tmp_path)
    assert len(first) == 1 and max(next(iter(first.values()))[0]["loss"]) >= 5

    run_training(tmp_path, tiny_model_dir, packed_dir, report_to=ALL, **RUN)
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "resumed from" in log and "tensorboard: continuing run" in log and "mlflow: new run" in log
    ids = train_state(tmp_path)["tracking"]
    assert ids["tensorboard"] in first
    for read in (tensorboard_runs, wandb_runs, mlflow_runs):
        runs = read(tmp_path)
        assert list(runs) == [ids[read.__name__.split("_")[0]]], "one tracked run across both attempts"
        assert_same_series(next(iter(runs.values()))[0], tmp_path)
    assert len(list((tmp_path / "tracking" / "wandb").glob("offline-run-*"))) == 2, "each attempt syncs on its own"


def test_hyperparameters_are_dotted_plain_values():
    config = {"train": {"lr": 1e-4, "betas": [0.9, 0.95], "max_steps": None}, "model": "m"}
    assert hyperparameters(config) == {"train.lr": 1e-4, "train.betas": "[0.9, 0.95]", "train.max_steps": "None",
                                       "model": "m"}  # fmt: skip


@pytest.mark.workflow
def test_a_missing_backend_fails_before_any_job(tmp_path, corpus_rows):
    """The workflow, in a Python where wandb cannot be imported."""
    from tests.test_workflow import TINY

    hidden = tmp_path / "site"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    write_jsonl(tmp_path / "corpus.jsonl", corpus_rows[:50])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "report_to": ["wandb"]}}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--cores", "2", f"--configfile={config}", "all"],
        env={**os.environ, "PYTHONPATH": f"{hidden}:{REPO}"}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "train.report_to asks for wandb, which is not installed" in result.stdout + result.stderr
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()


def test_a_resume_with_other_settings_rewrites_the_redone_steps_in_new_tracked_runs(tmp_path, tiny_model_dir,
                                                                                     packed_dir):  # fmt: skip
    """Killed after the checkpoint of step 3, resumed with another learning rate: steps 4 on are trained differently,
    so the file drops the interrupted attempt's records of them and the trackers start new runs."""
    job = TrainJob(model=str(tiny_model_dir), packed=str(packed_dir), output_dir=str(tmp_path),
                   train=TrainConfig(**RUN, report_to=["tensorboard", "mlflow"]))  # fmt: skip
    process = start_job(tmp_path, tiny_model_dir, packed_dir, job=job)
    wait_for_step(tmp_path, 5, process)
    wait_for_checkpoint(tmp_path, 3, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first_lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "train" / "metrics.jsonl") if "lr" in r}

    run_training(tmp_path, tiny_model_dir, packed_dir, report_to=["tensorboard", "mlflow"], **{**RUN, "lr": 1e-3})
    assert (
        "their records are written anew, and trackers start new runs" in (tmp_path / "logs" / "train.log").read_text()
    )
    lr = expected(tmp_path)["lr"]
    assert sorted(lr) == list(range(1, 11))
    assert lr[3] == pytest.approx(first_lr[3]) and lr[5] != pytest.approx(first_lr[5])  # kept, then trained anew
    ids = train_state(tmp_path)["tracking"]
    for read in (tensorboard_runs, mlflow_runs):
        runs = read(tmp_path)
        assert len(runs) == 2, "the interrupted attempt's run stays as it was"
        assert_same_series(runs[ids[read.__name__.split("_")[0]]][0], tmp_path)


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from vectorlm.train import tracking

    class Broken(tracking.Backend):
        def __init__(self, root, **_):
            self.run_id, self.location, self.points = "broken", str(root), []

        def log(self, step, values):
            if step == 2:
                raise OSError("disk full")
            self.points.append(step)

        def close(self, outcome):
            pass

    class Unreachable(Broken):
        def __init__(self, root, **_):
            raise ConnectionError("no network")

    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", Broken)
    monkeypatch.setitem(tracking.BACKENDS, "wandb", Unreachable)
    trackers = tracking.Trackers(["tensorboard", "wandb"], run=RunDir(tmp_path), run_ids={}, config={}, earlier=[])
    assert list(trackers.backends) == ["tensorboard"] and "wandb: cannot track this run" in caplog.text
    broken = trackers.backends["tensorboard"]
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0})
    assert broken.points == [1] and not trackers.backends and "stopped tracking at step 2" in caplog.text
