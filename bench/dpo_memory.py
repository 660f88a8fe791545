"""Peak memory of a DPO training step with cached reference log-probabilities against SFT on the same tokens, and
against DPO that holds the reference model beside the policy (what frameworks without a cached reference do).

    .venv/bin/python bench/dpo_memory.py                   # Llama, hidden 768, 6 layers, vocab 32,000: 2 x 1,024 tokens
    .venv/bin/python bench/dpo_memory.py --layers 4 --rows 2

Each measurement runs in a process of its own: one rank, the model built and sharded as training builds it
(vectorlm.train.model.build_model, fp32, train.loss chunked), two optimizer steps on the same packed rows of
preference pairs. The peak is the process's resident memory (ru_maxrss) above what it held once the policy existed
(and, for the two-model baseline, the reference model too: its weights are counted in the peak). On a GPU,
bench/gpu.sh runs the same with ``--device cuda`` and torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sft", "dpo-cached", "dpo-two-models")


def make_model(path: Path, *, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)


def pair_rows(*, rows: int, width: int, vocab: int, seed: int = 0) -> list[dict]:
    """Packed rows of pairs (chosen, rejected: prompt 32 tokens, completions 96 tokens), as pack writes them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        ids, labels, positions = [], [], []
        while len(ids) + 256 <= width:
            prompt = rng.integers(0, vocab, 32).tolist()
            for _side in range(2):
                completion = rng.integers(0, vocab, 96).tolist()
                ids += prompt + completion
                labels += [-100] * 32 + completion
                positions += list(range(128))
        out.append({"input_ids": np.array(ids), "labels": np.array(labels), "position_ids": np.array(positions)})
    return out


def worker(kind: str, model_dir: str, *, rows: int, width: int, vocab: int, device: str) -> None:
    sys.path.insert(0, str(REPO))
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29581"})
    import torch
    from transformers import get_scheduler

    from vectorlm.config import DpoSettings, LoraSettings, TrainConfig
    from vectorlm.data.loader import collate
    from vectorlm.train.distributed import init_distributed
    from vectorlm.train.model import build_model
    from vectorlm.train.preference import PreferenceObjective, sequence_logps
    from vectorlm.train.step import TokenObjective, build_optimizer, to_device, token_logps, train_step

    env = init_distributed()
    dpo = kind != "sft"
    cfg = TrainConfig(micro_batch_size=rows, global_batch_size=rows, mixed_precision=False, loss="chunked",
                      objective="dpo" if dpo else "sft", lr=1e-5)  # fmt: skip
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler("constant", optimizer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = None
    if kind == "dpo-two-models":  # the reference held beside the policy, run in every step
        reference, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
        reference.eval().requires_grad_(False)
    batch = collate(pair_rows(rows=rows, width=width, vocab=vocab), flatten=False, pairs=True)
    batch["reference_logps"] = torch.randn(len(batch["sequence_lengths"]), dtype=torch.float64) - 100
    batch = to_device(batch, env.device)
    start = time.perf_counter()
    objective = PreferenceObjective(DpoSettings()) if dpo else TokenObjective()
    for _ in range(2):
        if reference is not None:
            with torch.no_grad():
                batch["reference_logps"] = sequence_logps(token_logps(reference, batch), batch["sequence_ids"],
                                                          len(batch["sequence_lengths"]))  # fmt: skip
        count = batch[objective.count]
        output = train_step(model, optimizer, scheduler, [batch], loss_scale=1 / count, cfg=cfg, objective=objective)
        output.loss_sum.item()
    seconds = (time.perf_counter() - start) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = (peak - before) / 1024
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20  # everything, the policy's weights included
    print(json.dumps({"peak_mb": peak_mb, "seconds": seconds, "tokens": int(batch["num_tokens"]),
                      "pairs": int(batch["num_pairs"])}))  # fmt: skip


def measure(kind: str, model_dir: Path, **shape) -> dict:
    command = [sys.executable, __file__, "--worker", kind, str(model_dir), "--rows", str(shape["rows"]),
               "--tokens", str(shape["width"]), "--vocab", str(shape["vocab"]), "--device", shape["device"]]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    shape = {"rows": args.rows, "width": args.tokens, "vocab": args.vocab, "device": args.device}
    if args.worker:
        worker(*args.worker, **shape)
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        make_model(model_dir, hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab:,}; {args.rows} x {args.tokens:,} "
              f"tokens of preference pairs per step, fp32, one rank on {args.device}")  # fmt: skip
        print(f"{'step':>15} {'peak MB':>9} {'s/step':>7} {'vs sft':>7}")
        sft = measure("sft", model_dir, **shape)
        for kind in KINDS:
            result = sft if kind == "sft" else measure(kind, model_dir, **shape)
            print(f"{kind:>15} {result['peak_mb']:>9,.0f} {result['seconds']:>7.2f} "
                  f"{result['peak_mb'] / sft['peak_mb']:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
