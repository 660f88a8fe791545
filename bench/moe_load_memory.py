"""Peak host memory of loading a mixture-of-experts model per rank, against the model's size.

A random Mixtral (per-expert tensors in its safetensors files, one fused parameter per layer in the model) is loaded
on 2 gloo ranks on the CPU, as training loads it: built on the meta device, sharded with FSDP2, then filled. Each
rank measures its peak RSS during the load above its RSS before it (VmHWM, reset through /proc/self/clear_refs):

- ``pieces``: vectorlm's reader, each rank reading only the experts (and other shards) it holds;
- ``rank-0 fallback``: every conversion left to rank 0, which reads and converts a layer's experts and scatters them
  (what conversions other than stacking and concatenating use);
- ``from_pretrained``: transformers loading the whole model in one process, for comparison.

Usage: .venv/bin/python bench/moe_load_memory.py [--hidden 1024] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RANK = """
import json, os, sys, torch, torch.distributed as dist
from pathlib import Path
from vectorlm.train.distributed import build_mesh, init_distributed
from vectorlm.hub.layout import file_layout
from vectorlm.hub.meta_model import build_empty_model, parameter_shapes
from vectorlm.train.base_weights import materialize
from vectorlm.train.model import apply_fsdp
from vectorlm.hub.shards import tensor_shapes, weight_files

def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024

model_dir, blocks, out = sys.argv[1], sys.argv[2] == "pieces", sys.argv[3]
env = init_distributed()
model = build_empty_model(model_dir, attn_implementation="sdpa")
layout = file_layout(model, tensor_shapes(weight_files(Path(model_dir))), parameter_shapes(model), blocks=blocks)
apply_fsdp(model, build_mesh(env, "full"), mixed_precision=False)
dist.barrier()
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
materialize(model, model_dir, env.device, layout=layout, converting_model=model)
dist.barrier()
Path(f"{out}.{env.rank}").write_text(json.dumps({"peak_above_start_mb": status("VmHWM") - before}))
dist.destroy_process_group()
"""

WHOLE = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(status("VmHWM") - before)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from vectorlm.train.launch import local_rank_commands
    from vectorlm.train.placement import Placement

    with tempfile.TemporaryDirectory() as root:
        model_dir = Path(root) / "mixtral"
        config = MixtralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                               num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                               num_local_experts=args.experts, num_experts_per_tok=2)  # fmt: skip
        with torch.device("meta"):
            params = sum(p.numel() for p in MixtralForCausalLM(config).parameters())
        MixtralForCausalLM(config).save_pretrained(model_dir)  # random weights, per-expert tensors on disk
        size_mb = params * 4 / 2**20
        experts_mb = args.experts * 3 * args.hidden * config.intermediate_size * 4 / 2**20
        print(f"Mixtral, hidden {args.hidden}, {args.layers} layers, {args.experts} experts: {params / 1e6:.0f}M "
              f"parameters, {size_mb:,.0f} MB in fp32; one layer's experts {experts_mb:,.0f} MB; 2 ranks")  # fmt: skip
        print(f"{'load':<16} {'rank 0 peak MB':>15} {'rank 1 peak MB':>15} {'of the model':>13}")
        for mode in ("pieces", "rank-0 fallback"):
            out = Path(root) / mode.replace(" ", "_")
            command = [sys.executable, "-c", RANK, str(model_dir), mode.split()[0], str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            ranks = [subprocess.Popen(c, env=e) for c, e in local_rank_commands(command, Placement(2, 1, 1), env)]
            assert all(rank.wait() == 0 for rank in ranks), mode
            peaks = [json.loads(Path(f"{out}.{r}").read_text())["peak_above_start_mb"] for r in range(2)]
            print(f"{mode:<16} {peaks[0]:>15,.0f} {peaks[1]:>15,.0f} {max(peaks) / size_mb:>12.0%}")
        whole = float(subprocess.run([sys.executable, "-c", WHOLE, str(model_dir)], capture_output=True, text=True,
                                     check=True).stdout.split()[-1])  # fmt: skip
        print(f"{'from_pretrained':<16} {whole:>15,.0f} {'(1 process)':>15} {whole / size_mb:>12.0%}")


if __name__ == "__main__":
    main()
