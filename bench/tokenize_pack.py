"""Throughput of the tokenize and pack stages on a generated corpus of a given size.

    python bench/tokenize_pack.py --megabytes 10 --model resources/tiny-llama

Prints tokens/s of each stage and of both together (wall time of the library calls the workflow makes).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tiny"))
from make_corpus import story  # noqa: E402

from vectorlm.config import DataConfig  # noqa: E402
from vectorlm.data.pack import run_pack  # noqa: E402
from vectorlm.data.tokenize import run_tokenize  # noqa: E402


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    rng, written = random.Random(seed), 0
    with path.open("w") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": story(rng)}) + "\n"
            f.write(line)
            written += len(line)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=10)
    parser.add_argument("--model", default="resources/tiny-llama", help="model directory (for its tokenizer)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = write_corpus(tmp / "corpus.jsonl", args.megabytes)
        start = time.perf_counter()
        stats = run_tokenize(model_dir=args.model, data=DataConfig(train=str(tmp / "corpus.jsonl")), output_dir=tmp / "tok")
        tokenize_seconds = time.perf_counter() - start
        run_pack(tokenized_dir=tmp / "tok", max_seq_len=args.max_seq_len, output_dir=tmp / "packed")
        total_seconds = time.perf_counter() - start
    tokens = stats["train"]["tokens"] + stats["eval"]["tokens"]
    print(f"corpus: {size / 1e6:.1f} MB, {tokens:,} tokens ({args.model})")
    print(f"tokenize:        {tokenize_seconds:6.1f} s  {tokens / tokenize_seconds:12,.0f} tokens/s")
    print(f"pack:            {total_seconds - tokenize_seconds:6.1f} s  {tokens / (total_seconds - tokenize_seconds):12,.0f} tokens/s")
    print(f"tokenize + pack: {total_seconds:6.1f} s  {tokens / total_seconds:12,.0f} tokens/s")


if __name__ == "__main__":
    main()
