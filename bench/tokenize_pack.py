"""Throughput of the tokenize and pack stages against the tokenizer alone and VectorLM-style preprocessing.

    python bench/tokenize_pack.py --megabytes 10 20 40 --model resources/tiny-llama

For each corpus size (generated like examples/tiny/corpus.jsonl), in fresh processes so that peak memory is each
run's own:
- tokenizer alone: the fast tokenizer's batched encode (1000 texts a call) over texts already in memory;
  every pipeline loads the tokenizer and calls the datasets JSON loader once on a one-row file before its clock
  starts (imports and first-call initialisation are not throughput);
- vectorlm: run_tokenize + run_pack as the workflow calls them (reading the .jsonl, writing both datasets);
- VectorLM-style: datasets.map tokenization, then grouping with ``sum(examples["input_ids"], [])`` per batch of
  1000 and cutting blocks of max_seq_len (VectorLM's/run_clm's preprocessing), kept in a Dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tiny"))
from make_corpus import story

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

peak_anon = 0
def watch_anonymous_memory():  # RssAnon: memory the process owns, not file pages it maps (page cache)
    global peak_anon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon = max(peak_anon, int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=watch_anonymous_memory, daemon=True).start()
kind, corpus, model, max_seq_len, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
import datasets
from transformers import AutoTokenizer
# Imports and first-call initialisation stay outside the timings, for every pipeline: loading the tokenizer, and the
# datasets JSON loader's first call (a one-row file), which costs ~0.2 s once per process whatever the corpus size.
AutoTokenizer.from_pretrained(model)
(out / "warm.jsonl").write_text('{"text": "warm up"}\n')
datasets.load_dataset("json", data_files=str(out / "warm.jsonl"), split="train", cache_dir=str(out / "warm"))
if kind == "tokenizer":
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model).backend_tokenizer
    texts = [json.loads(line)["text"] for line in open(corpus)]
    start = time.perf_counter()
    tokens = sum(len(e.ids) for i in range(0, len(texts), 1000)
                 for e in tokenizer.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False))
elif kind == "vectorlm":
    from vectorlm.config import DataConfig
    from vectorlm.data.pack import run_pack
    from vectorlm.data.tokenize import run_tokenize
    start = time.perf_counter()
    stats = run_tokenize(model_dir=model, data=DataConfig(train=corpus), output_dir=out / "tok")
    run_pack(tokenized_dir=out / "tok", max_seq_len=max_seq_len, output_dir=out / "packed")
    tokens = stats["train"]["tokens"] + stats["eval"]["tokens"]
else:
    import datasets
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=str(out / "cache"))
    ids = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    def group(examples):
        joined = {k: sum(examples[k], []) for k in examples}
        total = len(joined["input_ids"]) // max_seq_len * max_seq_len
        return {k: [v[i:i + max_seq_len] for i in range(0, total, max_seq_len)] for k, v in joined.items()}
    blocks = ids.map(group, batched=True, batch_size=1000)
    tokens = sum(len(x) for x in ids["input_ids"])
seconds = time.perf_counter() - start
time.sleep(0.05)
print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_anon_mb": peak_anon / 1024}))
"""


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    rng, written = random.Random(seed), 0
    with path.open("w") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": story(rng)}) + "\n"
            f.write(line)
            written += len(line)
    return written


def measure(kind: str, corpus: Path, model: str, max_seq_len: int, out: Path) -> dict:
    """Runs one pipeline in a fresh process; returns tokens, seconds, its peak RSS (file pages it maps included) and
    its peak anonymous RSS (what it allocates)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(corpus), model, str(max_seq_len), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{kind} failed"
    return {**json.loads(output), "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, nargs="+", default=[10])
    parser.add_argument("--model", default="resources/tiny-llama", help="model directory (for its tokenizer)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--skip-vectorlm-style", action="store_true")
    args = parser.parse_args()
    print(f"{'corpus':>10} {'tokens':>12} {'pipeline':>16} {'seconds':>8} {'tokens/s':>12} {'vs tokenizer':>13} "
          f"{'peak RSS MB':>12} {'anon MB':>8}")  # fmt: skip
    for megabytes in args.megabytes:
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            tmp = Path(tmp)
            write_corpus(tmp / "corpus.jsonl", megabytes)
            kinds = ["tokenizer", "vectorlm"] + ([] if args.skip_vectorlm_style else ["vectorlm-style"])
            results = {kind: measure(kind, tmp / "corpus.jsonl", args.model, args.max_seq_len, tmp) for kind in kinds}
        base = results["tokenizer"]["tokens"] / results["tokenizer"]["seconds"]
        for kind, r in results.items():
            rate = r["tokens"] / r["seconds"]
            print(f"{megabytes:>8.0f}MB {r['tokens']:>12,} {kind:>16} {r['seconds']:>8.2f} {rate:>12,.0f} "
                  f"{rate / base:>12.0%} {r['peak_rss_mb']:>12,.0f} {r['peak_anon_mb']:>8,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
