"""Peak memory (RSS) of convert_hf, with and without LoRA, as a fraction of the model's size.

    python bench/export_memory.py --hidden 768 --layers 16        # a ~113M-parameter Llama (fp32: ~450 MB)

Builds a random Llama with the example tokenizer, a consolidated checkpoint of it (as consolidate writes one) and a
LoRA adapter (all-linear, r 16, non-zero), then runs convert_hf in fresh processes: without the smoke test's
generation (the check every size gets) and with it, for a full fine-tune and for LoRA (merged shard by shard). For
comparison, the merge it replaced (the base model loaded with ``from_pretrained``, peft's ``merge_and_unload``,
``save_pretrained``) runs too. Each peak is reported above a baseline process that imports the same libraries and
builds the same empty (meta) model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import sys
import torch
from vectorlm.export.consolidate import weight_shapes
from vectorlm.export.convert import convert_hf
what, consolidated, model, out = sys.argv[1:5]
if what == "baseline":
    weight_shapes(model)
elif what == "peft-merge":
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    PeftModel.from_pretrained(base, consolidated).merge_and_unload().save_pretrained(out)
else:
    adapter = out + "-adapter" if "lora" in what else None
    convert_hf(consolidated, model_dir=model, output_dir=out, adapter_dir=adapter, smoke_test_prompt="Once upon",
               smoke_test_max_bytes=None if what.endswith("generate") else 0)
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def peak_rss_mb(*args: str) -> float:
    """Peak RSS of one child process, as it reports it (VmHWM of its own memory after exec; the rusage of a child
    also counts what it shared with this process between fork and exec)."""
    result = subprocess.run([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, check=True)  # fmt: skip
    return int(result.stdout.split()[-1]) / 1024  # kB


def prepare(root: Path, *, hidden: int, layers: int) -> tuple[Path, Path, Path, int]:
    """The base model, a consolidated full fine-tune of it, and a consolidated LoRA adapter for it."""
    import torch

    from vectorlm.config import LoraSettings, write_stage_config
    from vectorlm.example.tiny_llama import build_example_model
    from vectorlm.hub.meta_model import build_empty_model
    from vectorlm.hub.shards import read_tensors, tensor_shapes, weight_files, write_sharded
    from vectorlm.train.lora import apply_lora, save_adapter

    model = build_example_model(REPO / "examples/tiny/corpus.jsonl", root / "model", hidden_size=hidden,
                                num_layers=layers, num_heads=hidden // 64)  # fmt: skip
    export = {"export": {"dtype": "auto", "max_shard_size": "200MB"}}
    full = root / "consolidated"
    files = weight_files(model)
    index = write_sharded(full, tensor_shapes(files), dtype=torch.float32, max_shard_bytes=200 * 10**6,
                          load=lambda names: read_tensors(files, names))  # fmt: skip
    write_stage_config(full, export)
    lora = LoraSettings(enabled=True, r=16, alpha=32)
    peft_model, initial = apply_lora(build_empty_model(model), lora, seed=0)
    adapter = {k: torch.randn_like(v) * 0.01 for k, v in initial.items()}  # lora_B non-zero: the merge changes W
    (root / "adapter").mkdir()
    save_adapter(peft_model, adapter, root / "adapter", base=str(model))
    write_stage_config(root / "adapter", {**export, "lora": {"enabled": True, "r": 16, "alpha": 32}})
    return model, full, root / "adapter", index["metadata"]["total_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        model, full, adapter, size = prepare(tmp, hidden=args.hidden, layers=args.layers)
        baseline = peak_rss_mb("baseline", str(full), str(model), str(tmp / "x"))
        runs = {
            "full, check only": ("check", full),
            "full, check + generate": ("generate", full),
            "LoRA merge, check only": ("lora-check", adapter),
            "LoRA merge, check + generate": ("lora-generate", adapter),
            "peft merge_and_unload (before)": ("peft-merge", adapter),
        }
        peaks = {
            name: peak_rss_mb(what, str(source), str(model), str(tmp / what)) for name, (what, source) in runs.items()
        }
    print(f"model: {size / 4e6:.0f}M parameters, {size / 1e6:.0f} MB in fp32; baseline process {baseline:.0f} MB")
    print(f"{'convert_hf':<32} {'peak RSS':>9} {'above baseline':>15} {'x model size':>13}")
    for name, peak in peaks.items():
        print(f"{name:<32} {peak:>6.0f} MB {peak - baseline:>12.0f} MB {(peak - baseline) / (size / 1e6):>13.2f}")


if __name__ == "__main__":
    main()
