"""Checkpoints, kills and resumption with real multi-rank runs: the resumed model must be the uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import run_training
from vectorlm.config import ConfigError, ExportConfig, LoraSettings, TrainConfig
from vectorlm.export.consolidate import consolidate
from vectorlm.train.checkpoint import list_checkpoints, problem_with
from vectorlm.train.checkpoint_reader import SafeFileSystemReader, UnsafeCheckpointError
from vectorlm.train.job import TrainJob
from vectorlm.train.preemption import PREEMPTED_EXIT_CODE

# fp32 so that runs which should compute the same thing agree to the last bit on one world size.
RUN = {"max_steps": 24, "lr": 3e-3, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 2,
       "mixed_precision": False, "checkpoint_every": 4, "keep_checkpoints": 2, "eval_every": 8, "seed": 3,
       "log_every": 1}  # fmt: skip


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a DCP checkpoint, read in this single process."""
    reader = SafeFileSystemReader(str(checkpoint))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {k[len("model.") :]: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
               if k.startswith("model.")}  # fmt: skip
    dcp.load({"model": tensors}, storage_reader=reader)
    return tensors


def max_difference(a: Path, b: Path) -> float:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def start_job(
    output_dir: Path, model_dir: Path, packed: Path, *, ranks: int = 2, threads: int = 2, job: TrainJob | None = None,
    lora: dict | None = None, **train,
) -> subprocess.Popen:  # fmt: skip
    """A training job (``job``, or one made of ``train`` and ``lora`` settings) in its own process group, as
    Snakemake starts it, its ranks sharing ``threads`` CPU threads."""
    job = job or TrainJob(model=str(model_dir), packed=str(packed), output_dir=str(output_dir),
                          train=TrainConfig(**train), lora=LoraSettings(**(lora or {})))  # fmt: skip
    (output_dir / "train").mkdir(parents=True, exist_ok=True)
    job.save(output_dir / "train" / "job.yaml")
    command = [sys.executable, "-m", "vectorlm.train.launch", str(output_dir / "train" / "job.yaml"), "--ranks",
               str(ranks), "--threads", str(threads), "--log", str(output_dir / "train.log")]  # fmt: skip
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    metrics = output_dir / "train" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(json.loads(line).get("step", -1) >= step for line in metrics.read_text().splitlines()
                                     if line.endswith("}")):  # fmt: skip
            return
        assert process.poll() is None, f"training ended (status {process.returncode}) before step {step}"
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} within {timeout} s")


def wait_for_checkpoint(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until a complete checkpoint of ``step`` or later exists (saves finish in the background, later on a busy
    machine: a kill before that leaves none to resume from)."""
    deadline = time.monotonic() + timeout
    while not any(int(d.name.split("_")[1]) >= step and (d / "train_state.json").is_file()
                  for d in (output_dir / "checkpoints").glob("step_*")):  # fmt: skip
        assert process.poll() is None and time.monotonic() < deadline, f"no checkpoint of step {step} or later"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, packed_dir):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_training(out, tiny_model_dir, packed_dir, **RUN)


def test_checkpoints_at_intervals_and_only_the_newest_kept(reference):
    out, _ = reference
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [20, 24]
    assert not list((out / "checkpoints").glob(".*partial"))
    state = json.loads((out / "checkpoints" / "step_20" / "train_state.json").read_text())
    assert state["final"] is False and state["data"] == {"epoch": 0, "offset": 160}
    assert state["world_size"] == 2 and set(state["eval_losses"]) == {"0", "8", "16"}
    assert (out / "checkpoints" / "step_20" / "rng" / "rank_1.cpu").stat().st_size > 0
    assert all(problem_with(path) is None for _, path in list_checkpoints(out / "checkpoints"))


def test_sigkill_at_a_random_step_then_rerun_gives_the_same_model(reference, tmp_path, tiny_model_dir, packed_dir):
    ref_out, ref = reference
    kill_at = random.Random().randint(5, 22)
    process = start_job(tmp_path, tiny_model_dir, packed_dir, **RUN)
    wait_for_step(tmp_path, kill_at, process)
    wait_for_checkpoint(tmp_path, 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_log = (tmp_path / "train.log").read_text()
    assert "summary" not in killed_log and not (tmp_path / "train" / "summary.json").exists()

    resumed = run_training(tmp_path, tiny_model_dir, packed_dir, **RUN)
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "resumed from" in log, f"killed at step {kill_at}"
    difference = max_difference(tmp_path / "checkpoints" / "step_24", ref_out / "checkpoints" / "step_24")
    print(f"killed at step {kill_at}: max abs weight difference {difference}")
    assert difference <= 1e-6, f"killed at step {kill_at}: max abs weight difference {difference}"
    steps = [s["step"] for s in resumed["steps"]]
    assert steps == list(range(1, 25)), "each step is recorded exactly once in metrics.jsonl"
    assert resumed["summary"]["final_eval_loss"] == pytest.approx(ref["summary"]["final_eval_loss"], abs=1e-6)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_sigterm_checkpoints_and_a_different_world_size_continues(reference, tmp_path, tiny_model_dir, packed_dir,
                                                                  first, second):  # fmt: skip
    _, ref = reference
    process = start_job(tmp_path, tiny_model_dir, packed_dir, ranks=first, **RUN)
    wait_for_step(tmp_path, 6, process)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE
    log = (tmp_path / "train.log").read_text()
    assert "received SIGTERM: saved a checkpoint at step" in log
    stopped_at = max(step for step, _ in list_checkpoints(tmp_path / "checkpoints"))
    assert stopped_at >= 6

    resumed = run_training(tmp_path, tiny_model_dir, packed_dir, num_processes=second, **RUN)
    assert f"world size {first} -> {second}: data position kept" in (tmp_path / "logs" / "train.log").read_text()
    # The same rows in the same order: per-step losses equal the uninterrupted run's (to reduction-order rounding).
    losses = {s["step"]: s["loss"] for s in resumed["steps"]}
    reference_losses = {s["step"]: s["loss"] for s in ref["steps"]}
    for step in range(stopped_at + 1, 25):
        assert losses[step] == pytest.approx(reference_losses[step], rel=1e-4), step


def test_damaged_newest_checkpoint_is_reported_and_the_previous_used(reference, tmp_path, tiny_model_dir, packed_dir):
    ref_out, _ = reference
    process = start_job(tmp_path, tiny_model_dir, packed_dir, **RUN)
    wait_for_step(tmp_path, 14, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    newest_step, newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (tmp_path / "checkpoints" / ".step_99.partial").mkdir()  # what a save killed halfway leaves

    run_training(tmp_path, tiny_model_dir, packed_dir, **RUN)
    log = (tmp_path / "logs" / "train.log").read_text()
    assert f"checkpoint {newest} is damaged ({shard.name} is truncated" in log and f"{newest}.invalid" in log
    assert f"step_{newest_step - 4} (step {newest_step - 4})" in log and ".step_99.partial" in log
    assert max_difference(tmp_path / "checkpoints" / "step_24", ref_out / "checkpoints" / "step_24") <= 1e-6


def test_interrupted_run_refuses_changed_data_and_accepts_changed_lr(tmp_path, tiny_model_dir, packed_dir):
    process = start_job(tmp_path, tiny_model_dir, packed_dir, **RUN)
    wait_for_step(tmp_path, 5, process)
    wait_for_checkpoint(tmp_path, 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # The ranks' own error is the job's error line.
    with pytest.raises(RuntimeError, match=r"training failed: vectorlm.config_schema.ConfigError: refusing to resume"):
        run_training(tmp_path, tiny_model_dir, packed_dir, **{**RUN, "seed": 4})
    assert "refusing to resume from" in (tmp_path / "logs" / "train.log").read_text()
    assert "since then seed changed (seed: 3 -> 4)" in (tmp_path / "logs" / "train.log").read_text()

    run_training(tmp_path, tiny_model_dir, packed_dir, **{**RUN, "lr": 1e-3})
    assert "with changed settings: train.lr 0.003 -> 0.001" in (tmp_path / "logs" / "train.log").read_text()


def test_finished_run_is_not_retrained_and_a_changed_one_starts_anew(reference, tmp_path, tiny_model_dir, packed_dir):
    ref_out, ref = tmp_path / "run", reference[1]
    shutil.copytree(reference[0], ref_out)
    again = run_training(ref_out, tiny_model_dir, packed_dir, **{**RUN, "eval_every": 12})
    assert again["summary"] == {**ref["summary"], "checkpoint": str(ref_out / "checkpoints" / "step_24")}
    assert "already finished with these settings; nothing to train" in (ref_out / "logs" / "train.log").read_text()

    longer = run_training(ref_out, tiny_model_dir, packed_dir, **{**RUN, "max_steps": 28})
    assert "continuing the finished run" in (ref_out / "logs" / "train.log").read_text()
    assert longer["summary"]["step"] == 28 and [s["step"] for s in longer["steps"]][-1] == 28

    changed = run_training(ref_out, tiny_model_dir, packed_dir, **{**RUN, "max_steps": 28, "lr": 1e-3})
    archived = list((ref_out / "checkpoints" / "archive").glob("*/step_28"))
    assert len(archived) == 1 and changed["steps"][0]["step"] == 1
    assert (
        "is a finished run with other settings (train.lr 0.003 -> 0.001)"
        in (ref_out / "logs" / "train.log").read_text()
    )


def test_metadata_unpickler_refuses_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle posix.system"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not Path("pwned").exists()


def test_checkpoint_data_files_must_lie_inside_it(reference, tmp_path):
    checkpoint = tmp_path / "step_24"
    shutil.copytree(reference[0] / "checkpoints" / "step_24", checkpoint)
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # written by this test's own reference run
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../elsewhere.distcp"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match=r"a data file lies outside the checkpoint \(\.\./\.\./elsewhere"):
        SafeFileSystemReader(str(checkpoint)).read_metadata()
    with pytest.raises(UnsafeCheckpointError):  # refused: it cannot be read here, which is no damage to set aside
        problem_with(checkpoint)


class CreatesFile:
    """Unpickling this creates ``path``: the proof that a checkpoint entry ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_of_pickles_runs_no_code_on_resume_or_consolidation(reference, tmp_path, tiny_model_dir,
                                                                          packed_dir):  # fmt: skip
    """Every entry of the newest checkpoint, under its real name, replaced by a pickle that would create a file."""
    ref_out, _ = reference
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(ref_out, out)
    crafted = out / "checkpoints" / "step_24"
    names = SafeFileSystemReader(str(crafted)).read_metadata().state_dict_metadata
    for file in [*crafted.glob("*.distcp"), crafted / ".metadata"]:
        file.unlink()
    dcp.save({name: CreatesFile(marker) for name in names}, checkpoint_id=str(crafted), no_dist=True)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="is a BytesStorageMetadata, not a tensor"):
        SafeFileSystemReader(str(crafted)).read_metadata()

    with pytest.raises(UnsafeCheckpointError):
        consolidate(crafted, model_dir=tiny_model_dir, output_dir=tmp_path / "consolidated", export=ExportConfig())
    assert not marker.exists()

    # The run's final checkpoint cannot be read here (refused): the run stops, naming it, and leaves it as it is.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(RuntimeError, match=r"training failed: .*UnsafeCheckpointError: .*step_24/\.metadata: entry"):
        run_training(out, tiny_model_dir, packed_dir, **RUN)
    assert not marker.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_refusal_reaches_every_rank_before_any_work(tmp_path, tiny_model_dir, packed_dir):
    process = start_job(tmp_path, tiny_model_dir, packed_dir, **RUN)
    wait_for_step(tmp_path, 5, process)
    wait_for_checkpoint(tmp_path, 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(RuntimeError):
        run_training(tmp_path, tiny_model_dir, packed_dir, **{**RUN, "max_steps": 3, "warmup_steps": 1})
    assert "is not below train.max_steps (3)" in (tmp_path / "logs" / "train.log").read_text()


# --- faults: what is damaged is set aside, what cannot be read here stops the run, nothing is ever lost ----------


def copied_checkpoints(reference, tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(reference[0] / "checkpoints", root)
    shutil.copy(root / "step_24" / "train_state.json", tmp_path / "reference_state.json")
    return root


def plan(root: Path):
    """plan_start as rank 0 asks it, with the settings the reference ran with (as its final checkpoint says)."""
    from vectorlm.train.resume import plan_start

    state = json.loads((root.parent / "reference_state.json").read_text())
    return plan_start(root, fingerprint=state["fingerprint"], train=state["train"], max_steps=24)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def rewrite_metadata(checkpoint: Path, edit) -> None:
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # written by this module's own training run
    edit(metadata)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_checkpoint_that_cannot_be_read_here_stops_the_run_and_is_left_where_it_is(reference, tmp_path, monkeypatch):
    """Before, such a checkpoint was renamed .invalid, then the one before it, and training restarted from step 0."""
    import collections
    import errno

    from vectorlm.train import checkpoint
    from vectorlm.train.checkpoint_reader import CheckpointUnreadable

    root = copied_checkpoints(reference, tmp_path)
    before = names(root)
    original = (root / "step_24" / ".metadata").read_bytes()

    def other_classes(metadata):  # what a checkpoint of another torch version may hold
        metadata.storage_meta = collections.OrderedDict()

    rewrite_metadata(root / "step_24", other_classes)
    with pytest.raises(CheckpointUnreadable, match=r"step_24/\.metadata: refusing to unpickle collections.OrderedDict"):
        plan(root)
    assert names(root) == before
    (root / "step_24" / ".metadata").write_bytes(original)

    def io_error(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "read_metadata_file", io_error)
    with pytest.raises(CheckpointUnreadable, match="Input/output error"):
        plan(root)
    monkeypatch.undo()
    state = json.loads((root / "step_24" / "train_state.json").read_text())
    (root / "step_24" / "train_state.json").write_text(json.dumps({**state, "version": 99}))
    with pytest.raises(CheckpointUnreadable, match="is of version 99; this vectorlm reads versions 0 to 1"):
        plan(root)
    assert names(root) == before


@pytest.mark.parametrize("fault", ["transform", "oversized item", "symbolic link", "fifo"])
def test_a_crafted_checkpoint_is_refused_before_anything_is_read(reference, tmp_path, tiny_model_dir, fault):
    """A decompression transform (a few bytes expanding to gigabytes), an item longer than its tensor, a link to
    another checkpoint's file, a FIFO that would block a reader forever: refused by resume planning and by
    consolidation alike, and nothing is moved."""
    from vectorlm.train.checkpoint_reader import CheckpointUnreadable

    root = copied_checkpoints(reference, tmp_path)
    crafted = root / "step_24"
    if fault == "transform":
        rewrite_metadata(crafted, lambda m: setattr(next(iter(m.storage_data.values())), "transform_descriptors",
                                                    ["zstd"]))  # fmt: skip
        message = r"declares the transforms \['zstd'\]"
    elif fault == "oversized item":
        rewrite_metadata(crafted, lambda m: setattr(next(iter(m.storage_data.values())), "length", 2**31))
        message = "more than its tensor block can take"
    elif fault == "symbolic link":
        shard = next(crafted.glob("*.distcp"))
        shard.unlink()
        shard.symlink_to(root / "step_20" / shard.name)
        message = "is a symbolic link"
    else:
        os.mkfifo(crafted / "rng" / "rank_0.cuda")
        message = "is not a regular file"
    before = names(root)
    with pytest.raises(CheckpointUnreadable, match=message):
        plan(root)
    with pytest.raises(CheckpointUnreadable, match=message):
        consolidate(crafted, model_dir=tiny_model_dir, output_dir=tmp_path / "c", export=ExportConfig())
    assert names(root) == before


def test_damaged_checkpoints_are_set_aside_never_deleted_and_none_left_means_no_fresh_start(reference, tmp_path):
    from vectorlm.train.resume import NoUsableCheckpoint

    root = copied_checkpoints(reference, tmp_path)
    (root / "step_24" / "rng" / "rank_1.cpu").write_bytes(b"")  # damaged: its random number generator state
    found = plan(root)
    assert found.action == "resume" and found.checkpoint == str(root / "step_20")
    assert names(root) == ["step_20", "step_24.invalid"]
    shard = next((root / "step_20").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(NoUsableCheckpoint, match="none can be resumed .*step_20.invalid, step_24.invalid.*mv "):
        plan(root)
    with pytest.raises(NoUsableCheckpoint):  # a rerun does not start from the base model either
        plan(root)
    shutil.copytree(reference[0] / "checkpoints" / "step_24", root / "step_24")
    (root / "step_24" / "train_state.json").write_text("{")  # damaged again: set aside beside the first
    with pytest.raises(NoUsableCheckpoint):
        plan(root)
    assert names(root) == ["step_20.invalid", "step_24.invalid", "step_24.invalid-2"]


def _damage(checkpoint: Path, fault: str) -> None:
    state = json.loads((checkpoint / "train_state.json").read_text())
    if fault == "truncated .metadata":
        (checkpoint / ".metadata").write_bytes((checkpoint / ".metadata").read_bytes()[:40])
    elif fault == "missing tensor file":
        next(checkpoint.glob("*.distcp")).unlink()
    elif fault == "config copy not YAML":
        (checkpoint / "vectorlm_config.yaml").write_text("train: [lr: {\n")
    elif fault == "config copy missing":
        (checkpoint / "vectorlm_config.yaml").unlink()
    elif fault == "config copy without train settings":
        (checkpoint / "vectorlm_config.yaml").write_text("lora: {}\n")
    elif fault == "step of another directory":
        (checkpoint / "train_state.json").write_text(json.dumps({**state, "step": 23}))
    elif fault == "more ranks than RNG states":
        (checkpoint / "train_state.json").write_text(json.dumps({**state, "world_size": 5}))
    elif fault == "train state of another type":
        (checkpoint / "train_state.json").write_text(json.dumps({**state, "final": "yes"}))


@pytest.mark.parametrize("fault", ["truncated .metadata", "missing tensor file", "config copy not YAML",
                                   "config copy missing", "config copy without train settings",
                                   "step of another directory", "more ranks than RNG states",
                                   "train state of another type"])  # fmt: skip
def test_any_damaged_file_of_a_checkpoint_sets_it_aside_and_the_previous_one_is_resumed(reference, tmp_path, caplog,
                                                                                          fault):  # fmt: skip
    """Every file a checkpoint holds is checked on read; a damaged one never fails planning, on any rerun."""
    root = copied_checkpoints(reference, tmp_path)
    _damage(root / "step_24", fault)
    with caplog.at_level("WARNING", logger="vectorlm.train.checkpoint"):
        found = plan(root)
    assert found.action == "resume" and found.checkpoint == str(root / "step_20")
    assert names(root) == ["step_20", "step_24.invalid"]
    assert any(f"checkpoint {root / 'step_24'} is damaged (" in record.getMessage() for record in caplog.records)
    assert plan(root).checkpoint == str(root / "step_20")  # and on the next attempt


def test_a_checkpoint_that_fails_to_load_is_set_aside_and_the_previous_one_resumed(reference, tmp_path,
                                                                                    tiny_model_dir, packed_dir):  # fmt: skip
    """Every file of the newest checkpoint is there and long enough, but a stored item does not load (its zip
    record's signature is gone): the ranks agree, set it aside and load the one before, and train on exactly as a run
    resumed from that one does. Before, the failure crashed every rerun."""
    ref_out, _ = reference
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    for out in (clean, faulty):
        shutil.copytree(ref_out, out)
        (out / "train" / "summary.json").unlink()
    shutil.rmtree(clean / "checkpoints" / "step_24")  # resumes from step 20
    newest = faulty / "checkpoints" / "step_24"
    info = next(iter(pickle.loads((newest / ".metadata").read_bytes()).storage_data.values()))
    shard = newest / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + 4] = b"XXXX"
    shard.write_bytes(bytes(data))
    assert problem_with(newest) is None  # nothing a check of the files can see

    longer = {**RUN, "max_steps": 28}  # a finished run continued: step 24 is loaded, and fails
    resumed = run_training(faulty, tiny_model_dir, packed_dir, **longer)
    log = (faulty / "logs" / "train.log").read_text()
    assert f"checkpoint {newest} is damaged (it failed to load on rank" in log and "resumed from" in log
    assert (faulty / "checkpoints" / "step_24.invalid").is_dir()
    expected = run_training(clean, tiny_model_dir, packed_dir, **longer)
    losses = {s["step"]: s["loss"] for s in resumed["steps"]}
    assert [losses[s["step"]] for s in expected["steps"] if s["step"] > 20] == pytest.approx(
        [s["loss"] for s in expected["steps"] if s["step"] > 20], abs=1e-6
    )


def test_a_finished_run_s_summary_is_rebuilt_from_the_run_directory(reference, tmp_path, tiny_model_dir, packed_dir):
    """What the checkpoint's train state says never chooses a path: a summary that names another checkpoint (which
    consolidate would export) is not copied."""
    ref_out, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    final = out / "checkpoints" / "step_24"
    state = json.loads((final / "train_state.json").read_text())
    lie = {**state["summary"], "checkpoint": "/elsewhere/checkpoints/step_24", "initial_eval_loss": 123.0}
    (final / "train_state.json").write_text(json.dumps({**state, "summary": lie}))
    again = run_training(out, tiny_model_dir, packed_dir, **RUN)
    assert "already finished with these settings" in (out / "logs" / "train.log").read_text()
    assert again["summary"]["checkpoint"] == str(final)
    assert again["summary"]["initial_eval_loss"] == pytest.approx(ref["summary"]["initial_eval_loss"])
    assert again["summary"]["final_eval_loss"] == pytest.approx(ref["summary"]["final_eval_loss"])


def test_new_base_weights_with_the_same_config_do_not_resume_the_old_run(reference, tmp_path, tiny_model_dir,
                                                                         packed_dir):  # fmt: skip
    """Before, the resume check hashed only config.json: a run (or a LoRA adapter) trained on other weights went on."""
    from safetensors.torch import load_file, save_file

    from vectorlm.train.resume import plan_start, run_fingerprint
    from vectorlm.train.train_state import TrainState

    root = copied_checkpoints(reference, tmp_path)
    (root / "step_24").rename(root / "moved")  # step_20: an interrupted run
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    state = TrainState.read(root / "step_20")
    same = run_fingerprint(model_dir=model, packed_dir=packed_dir, seed=RUN["seed"])
    assert same == state.fingerprint
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    changed = run_fingerprint(model_dir=model, packed_dir=packed_dir, seed=RUN["seed"])
    assert changed["model_config"] == same["model_config"] and changed["model_weights"] != same["model_weights"]
    with pytest.raises(ConfigError, match="since then model_weights changed"):
        plan_start(root, fingerprint=changed, train=state.train, max_steps=24)
    legacy = {k: v for k, v in state.fingerprint.items() if k != "model_weights"}  # written before it was recorded
    (root / "step_20" / "train_state.json").write_text(
        TrainState(**{**state.__dict__, "fingerprint": legacy}).to_json()
    )
    assert plan_start(root, fingerprint=changed, train=state.train, max_steps=24).action == "resume"


@pytest.mark.parametrize(
    ("error", "cannot_read"),
    [
        (FileNotFoundError("step_24/__0_0.distcp"), False),
        (EOFError("Ran out of input"), False),
        (UnicodeDecodeError("utf-8", b"\x80", 0, 1, "invalid start byte"), False),
        (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"), False),
        (PermissionError("step_24/__0_0.distcp"), True),
        (OSError(5, "Input/output error"), True),
        (MemoryError(), True),
        (RuntimeError("Missing key in checkpoint state_dict: model.layers.0.mlp.up_proj.weight."), True),
        (ValueError("something else"), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_a_load_failure_is_damage_only_with_evidence_of_damaged_content(error, cannot_read):
    """Out of memory, a timeout or a renamed parameter must not set good checkpoints aside one after another: a
    failure to load is damage only when the content is (a missing file, a record cut short or unreadable as one);
    the same holds inside DCP's wrapper of the ranks' failures."""
    from torch.distributed.checkpoint.api import CheckpointException

    from vectorlm.train.rank import unreadable

    assert unreadable(error) == cannot_read
    assert unreadable(CheckpointException("load failed", {0: (error, None)})) == cannot_read
    assert unreadable(CheckpointException("load failed", {0: (error, None), 1: (PermissionError("x"), None)}))


def test_a_setting_added_since_a_checkpoint_reads_as_its_default():
    """A checkpoint of a version without train.objective was an SFT run: it repeats exactly, not a changed run."""
    from types import SimpleNamespace

    from vectorlm.config import TrainConfig, to_plain
    from vectorlm.train.resume import recorded_train, repeats_exactly

    train = to_plain(TrainConfig())
    older = SimpleNamespace(train={k: v for k, v in train.items() if k != "objective"}, world_size=2)
    assert recorded_train(older)["objective"] == "sft"
    assert repeats_exactly(older, train=train, world_size=2)
    assert not repeats_exactly(older, train={**train, "objective": "dpo"}, world_size=2)
