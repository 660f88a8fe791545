"""Which trainings wait for the estimate's fit check, and what the check does with the estimate."""

from __future__ import annotations

import json

import pytest
import yaml

from vectorlm.config import ConfigError, LoraSettings, TrainConfig, to_plain
from vectorlm.pipeline.preflight import check_fit, trains_anew
from vectorlm.run_dir import RunDir


def test_only_a_training_that_runs_anew_waits_for_the_estimate(tmp_path):
    run = RunDir(tmp_path)
    train, lora = to_plain(TrainConfig(max_steps=10)), to_plain(LoraSettings())
    assert trains_anew(run, train=train, lora=lora)  # nothing ran here
    run.job.parent.mkdir(parents=True)
    run.job.write_text(yaml.safe_dump({"model": "m", "train": train, "lora": lora}))
    assert trains_anew(run, train=train, lora=lora)  # started, never finished
    run.summary.write_text("{}")
    assert not trains_anew(run, train=train, lora=lora)
    assert not trains_anew(run, train={**train, "keep_checkpoints": 5, "checkpoint_every": 3}, lora=lora)  # operational
    assert trains_anew(run, train={**train, "lr": 1.0e-5}, lora=lora)
    assert trains_anew(run, train=train, lora={**lora, "enabled": True})


def test_the_fit_check_stops_only_a_run_that_does_not_fit_when_told_to(tiny_model_dir, tmp_path):
    from vectorlm.config import ExportConfig
    from vectorlm.estimate.run_estimate import estimate_stage

    kwargs = {"train": TrainConfig(max_steps=10, micro_batch_size=2, global_batch_size=4), "lora": LoraSettings(),
              "export": ExportConfig(), "max_seq_len": 64, "resources": {"tasks": 2}}  # fmt: skip
    small, large, cpu = tmp_path / "small.json", tmp_path / "large.json", tmp_path / "cpu.json"
    estimate_stage(tiny_model_dir, small, settings={"gpu": "H100", "gpu_memory": "1GB"}, **kwargs)
    estimate_stage(tiny_model_dir, large, settings={"gpu": "H100"}, **kwargs)
    estimate_stage(tiny_model_dir, cpu, settings={}, **kwargs)
    assert [json.loads(p.read_text())["memory"]["fits"] for p in (small, large, cpu)] == [False, True, None]
    check_fit(small, check="warn")
    with pytest.raises(ConfigError, match=r"more than the 0.9 GiB of a H100 \(estimate.gpu_memory\); train was not"):
        check_fit(small, check="error")
    check_fit(large, check="error")
    check_fit(cpu, check="error")
