"""LoRA against full fine-tuning on the same data and settings: trainable parameters, peak memory, tokens/s,
checkpoint size.

    python bench/lora_vs_full.py --hidden 768 --layers 12 --steps 6          # a ~90M-parameter Llama, 2 CPU ranks

Builds a random Llama of the given size with the example tokenizer, packs the example corpus, and trains it twice
with the same TrainConfig: all weights, then LoRA (all-linear, r 16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import run_training
from vectorlm.config import DataConfig
from vectorlm.data.pack import run_pack
from vectorlm.data.tokenize import run_tokenize
from vectorlm.example.tiny_llama import build_example_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        model = build_example_model(REPO / "examples/tiny/corpus.jsonl", tmp / "model", hidden_size=args.hidden,
                                    num_layers=args.layers, num_heads=args.hidden // 64)  # fmt: skip
        run_tokenize(model_dir=model, data=DataConfig(train=str(REPO / "examples/tiny/corpus.jsonl")),
                     output_dir=tmp / "tok")  # fmt: skip
        run_pack(tokenized_dir=tmp / "tok", max_seq_len=256, output_dir=tmp / "packed")
        train = {"max_steps": args.steps, "lr": 1e-4, "micro_batch_size": 4, "global_batch_size": 16, "log_every": 1}
        results = {}
        for name, lora in (("full", None), ("lora", {"enabled": True, "r": 16, "alpha": 32})):
            run = run_training(tmp / name, model, tmp / "packed", num_processes=args.ranks, lora=lora, **train)
            checkpoint = Path(run["summary"]["checkpoint"])
            results[name] = {
                **run["summary"],
                "checkpoint_mb": sum(f.stat().st_size for f in checkpoint.rglob("*")) / 1e6,
            }
    print(f"{'':6} {'parameters':>12} {'trainable':>12} {'tokens/s':>10} {'peak RSS rank 0':>16} {'checkpoint':>11}")
    for name, r in results.items():
        print(f"{name:6} {r['parameters']:>12,} {r['trainable_parameters']:>12,} {r['tokens_per_second']:>10,.0f} "
              f"{r['peak_memory_mb']:>13,.0f} MB {r['checkpoint_mb']:>8,.1f} MB")  # fmt: skip
    print(json.dumps(results, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
