"""Peak memory (RSS) of the consolidate stage on a checkpoint shaped like training's (model + AdamW state).

    python bench/consolidate_memory.py --hidden 768 --layers 12 --vocab 32000     # ~110M parameters
    python bench/consolidate_memory.py --checkpoint results/tiny/checkpoints/step_200 --model resources/tiny-llama

Builds a random Llama of the given size (unless --checkpoint is given), writes a DCP checkpoint of it from a
one-rank process group, then runs consolidate in a fresh process and reports its peak RSS against a baseline
process that imports the same libraries and builds the same empty (meta) model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, resource
from vectorlm.config import ExportConfig
from vectorlm.export.consolidate import consolidate, weight_shapes
if sys.argv[1] == "baseline":
    weight_shapes(sys.argv[3])
else:
    consolidate(sys.argv[2], model_dir=sys.argv[3], output_dir=sys.argv[4], export=ExportConfig())
"""


def peak_rss_mb(*args: str) -> float:
    """Peak RSS of one child process (wait4 gives that child's own rusage)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args])
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child failed: {args}"
    return usage.ru_maxrss / 1024  # KiB on Linux


def write_checkpoint(root: Path, *, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """A random model saved as HF, then one DCP checkpoint of it with AdamW state, as training writes it."""
    script = f"""
import torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
from vectorlm.train.distributed import init_distributed, build_mesh
from vectorlm.hub.meta_model import build_empty_model
from vectorlm.train.base_weights import materialize, weight_layout
from vectorlm.train.model import apply_fsdp
from vectorlm.train.step import build_optimizer
from vectorlm.config import TrainConfig
from vectorlm.train.checkpoint import Checkpointer
from vectorlm.train.train_state import TrainState
from vectorlm.data.loader import DataPosition
config = LlamaConfig(vocab_size={vocab}, hidden_size={hidden}, intermediate_size={hidden * 8 // 3 // 8 * 8},
                     num_hidden_layers={layers}, num_attention_heads={hidden // 64}, num_key_value_heads={hidden // 64})
LlamaForCausalLM(config).save_pretrained("{root}/model")
env = init_distributed()
model = build_empty_model("{root}/model", attn_implementation="sdpa")
layout = weight_layout(model, "{root}/model")
apply_fsdp(model, build_mesh(env, "full"), mixed_precision=False)
materialize(model, "{root}/model", env.device, layout=layout)
optimizer = build_optimizer(model, TrainConfig())
checkpointer = Checkpointer(group=None, asynchronous=False, device=env.device)
state = TrainState(step=1, world_size=1, data=DataPosition(), eval_losses={{}})
checkpointer.save(__import__("pathlib").Path("{root}/ckpt"), model=model, optimizer=optimizer, train_state=state,
                  settings={{}}, upstream="{root}", keep=1)
checkpointer.close()
print("parameters:", sum(p.numel() for p in model.parameters()))
dist.destroy_process_group()
"""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    return root / "ckpt", root / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--checkpoint", help="an existing training checkpoint (then --model is its base model)")
    parser.add_argument("--model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        if args.checkpoint:
            checkpoint, model = Path(args.checkpoint), Path(args.model)
        else:
            checkpoint, model = write_checkpoint(Path(tmp), hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        baseline = peak_rss_mb("baseline", str(checkpoint), str(model))
        peak = peak_rss_mb("consolidate", str(checkpoint), str(model), f"{tmp}/out")
    print(f"model weights: {weights / 1e6:.0f} MB (fp32 safetensors)")
    print(f"baseline process (imports + meta model): {baseline:.0f} MB peak RSS")
    print(
        f"consolidate: {peak:.0f} MB peak RSS, {peak - baseline:.0f} MB above baseline "
        f"= {(peak - baseline) / (weights / 1e6):.2f} x the model"
    )


if __name__ == "__main__":
    main()
