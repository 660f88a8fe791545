"""How long a checkpoint holds training up: written before training continues, or in the background.

    python bench/checkpoint_stall.py --hidden 768 --layers 12 --saves 3      # ~110M parameters, 2 CPU ranks

Builds a random Llama, shards it over 2 gloo ranks, takes one optimizer step (so AdamW state exists), then saves
``--saves`` checkpoints each way with the training job's Checkpointer and reports, per save, the time training was
held up and the time until the checkpoint was complete on disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import run_on_ranks


def save_both_ways(env, model_dir: Path, root: Path, saves: int) -> None:
    import torch

    from vectorlm.config import LoraSettings, TrainConfig
    from vectorlm.data.loader import DataPosition
    from vectorlm.train.checkpoint import Checkpointer
    from vectorlm.train.model import build_model
    from vectorlm.train.step import build_optimizer
    from vectorlm.train.train_state import TrainState

    cfg = TrainConfig()
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
    optimizer = build_optimizer(model, cfg)
    model(input_ids=torch.zeros(1, 64, dtype=torch.long)).logits.float().mean().backward()
    optimizer.step()
    results = {}
    for asynchronous in (False, True):
        checkpointer = Checkpointer(group=env.checkpoint_group, asynchronous=asynchronous, device=env.device)
        held, complete = [], []
        for number in range(saves):
            start = time.perf_counter()
            state = TrainState(step=number, world_size=env.world_size, data=DataPosition(), eval_losses={})
            held.append(checkpointer.save(root / f"async{asynchronous}" / f"step_{number}", model=model,
                                          optimizer=optimizer, train_state=state, settings={}, upstream=root,
                                          keep=1))  # fmt: skip
            checkpointer.wait()
            complete.append(time.perf_counter() - start)
        checkpointer.close()
        results["background" if asynchronous else "blocking"] = {"held": held, "complete": complete}
    if env.rank == 0:
        (root / "results.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    from vectorlm.example.tiny_llama import build_example_model

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()
        model = build_example_model(REPO / "examples/tiny/corpus.jsonl", root / "model", hidden_size=args.hidden,
                                    num_layers=args.layers, num_heads=args.hidden // 64)  # fmt: skip
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        run_on_ranks(save_both_ways, 2, model, root, args.saves)
        results = json.loads((root / "results.json").read_text())
        on_disk = sum(f.stat().st_size for f in (root / "asyncTrue").rglob("*") if f.is_file())
    print(f"model {size / 4e6:.0f}M parameters; checkpoint (weights + AdamW) {on_disk / 1e6:.0f} MB; 2 gloo ranks")
    print(f"{'save':<12} {'training held up (median)':>26} {'complete on disk (median)':>26}")
    for name, r in results.items():
        print(f"{name:<12} {statistics.median(r['held']):>24.2f} s {statistics.median(r['complete']):>24.2f} s")


if __name__ == "__main__":
    main()
