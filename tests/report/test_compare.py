"""Runs compared side by side: the table a learning-rate sweep needs, and the loss figure."""

from __future__ import annotations

import json

import numpy as np
import yaml

from vectorlm.report.compare import main


def fake_run(root, name: str, *, lr: float, losses: list[float], finished: bool = True):
    """A run's output_dir as training leaves it: metrics, summary, the job and the packed data's settings."""
    run = root / name
    (run / "train").mkdir(parents=True)
    (run / "packed").mkdir()
    records = [{"step": 0, "eval_loss": losses[0] + 1}]
    for step, loss in enumerate(losses, start=1):
        records.append({"step": step, "loss": loss, "tokens_per_second": 1000.0 * step, "mfu": 0.1 * step})
    records.append({"step": len(losses), "eval_loss": losses[-1] + 0.5})
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (run / "train" / "summary.json").write_text(json.dumps({"final_eval_loss": losses[-1] + 0.5}))
    job = {"model": "m", "packed": f"{run}/packed", "output_dir": str(run), "train": {"lr": lr, "seed": 0}}
    (run / "train" / "job.yaml").write_text(yaml.safe_dump(job))
    (run / "packed" / "vectorlm_config.yaml").write_text(yaml.safe_dump({"model": "m", "max_seq_len": 256}))
    return run


def test_a_learning_rate_sweep_side_by_side(tmp_path, capsys):
    runs = [fake_run(tmp_path, "lr-1e-4", lr=1e-4, losses=[5.0, 4.0, 3.5]),
            fake_run(tmp_path, "lr-1e-3", lr=1e-3, losses=[5.0, 3.0, 2.0], finished=False)]  # fmt: skip
    figure = tmp_path / "out" / "compare.png"
    main([str(r) for r in runs] + ["--output", str(figure)])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| run | final eval loss | tokens/s | MFU | steps | train.lr |"  # only what differs
    assert table[2] == f"| {runs[0]} | 4.0000 | 2,000 | 20.0% | 3 | 0.0001 |"
    assert table[3] == f"| {runs[1]} | 2.5000 | 2,000 | 20.0% | 3 | 0.001 |"  # in progress: as far as it got
    import matplotlib.image

    pixels = matplotlib.image.imread(figure)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 700
    assert np.std(pixels[..., :3]) > 0.05  # lines and labels, not a blank canvas
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50  # two colours anti-aliased, text, grid
