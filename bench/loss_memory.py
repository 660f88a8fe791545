"""Peak host memory of the loss, plain (full logits) against chunked (vectorlm.train.loss), for training and evaluation.

    .venv/bin/python bench/loss_memory.py                       # vocab 128,256, hidden 256, 4 x 2,048 tokens, fp32
    .venv/bin/python bench/loss_memory.py --vocab 32000 --tokens 4096

Each measurement runs in a process of its own: its peak resident memory (ru_maxrss) above what it held once the
inputs existed. Tensors this large are mmapped by glibc and given back when freed, so the peak follows the live
tensors. Training is forward plus backward; evaluation is the forward pass under no_grad. The loss and gradients are
saved too, so that tests/train/test_loss.py can compare them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def worker(kind: str, mode: str, out: str, *, vocab: int, hidden_size: int, rows: int, length: int) -> None:
    sys.path.insert(0, str(REPO))
    from vectorlm.train.loss import HiddenStates, chunked_loss_sum, plain_loss_sum

    torch.manual_seed(0)
    head = HiddenStates(torch.nn.Linear(hidden_size, vocab, bias=False))
    hidden = torch.randn(rows, length, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length))
    labels[:, ::7] = -100
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.set_grad_enabled(mode == "train"):
        if kind == "plain":
            loss = plain_loss_sum(torch.nn.functional.linear(hidden, head.weight), labels)
        else:
            loss = chunked_loss_sum(hidden, labels, head=head)
        if mode == "train":
            loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"loss": loss.detach(), "hidden": hidden.grad, "weight": head.weight.grad}, out)
    print(json.dumps({"peak_mb": (peak - before) / 1024, "seconds": seconds}))


def measure(kind: str, mode: str, out: Path, *, vocab=128256, hidden_size=256, rows=4, length=2048) -> dict:
    """Runs one measurement in a fresh process; returns its peak memory (MB), seconds, loss and gradients."""
    command = [sys.executable, __file__, "--worker", kind, mode, str(out), "--vocab", str(vocab), "--hidden",
               str(hidden_size), "--rows", str(rows), "--tokens", str(length)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    return {**json.loads(result.stdout), **torch.load(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per row")
    args = parser.parse_args()
    shape = {"vocab": args.vocab, "hidden_size": args.hidden, "rows": args.rows, "length": args.tokens}
    if args.worker:
        worker(*args.worker, **shape)
        return
    print(f"vocab {args.vocab:,}, hidden {args.hidden}, {args.rows} x {args.tokens:,} tokens, fp32")
    print(f"{'mode':>6} {'loss':>8} {'peak MB':>9} {'seconds':>8} {'vs plain':>9}")
    with tempfile.TemporaryDirectory() as scratch:
        for mode in ("train", "eval"):
            plain = measure("plain", mode, Path(scratch) / "p.pt", **shape)
            for kind, result in (
                ("plain", plain),
                ("chunked", measure("chunked", mode, Path(scratch) / "c.pt", **shape)),
            ):
                print(f"{mode:>6} {kind:>8} {result['peak_mb']:>9,.0f} {result['seconds']:>8.1f} "
                      f"{result['peak_mb'] / plain['peak_mb']:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
