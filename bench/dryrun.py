"""How long `snakemake -n` takes, against Snakemake alone, and against an earlier commit, in one run.

    python bench/dryrun.py --compare-with 7874b09 --repeats 5

Three commands in each checkout (this one, and a git worktree of ``--compare-with``), run from its root with its
own code on the path: `snakemake --version` (Snakemake's own start-up: the floor), `snakemake --cores 2 -n` on the
embedded default (`make run` first: the example model must exist), and `snakemake --cores 2 -n --configfile=large.yaml`
for a config pointing at a large model directory (the example model's config and tokenizer with 4 x 5 GB of
safetensors weights, sparse files). Medians of ``--repeats`` runs; the first run with the large model is shown apart
(this checkout reads a sample of each weight file once, then caches its digest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def seconds(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(cwd)}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return time.perf_counter() - start


def large_model(root: Path, example: Path) -> Path:
    """The example model's config and tokenizer with 4 x 5 GB of safetensors weights (sparse: nothing is written)."""
    model = root / "large-model"
    model.mkdir()
    for file in example.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, model / file.name)
    weight_map = {}
    for index in range(1, 5):  # a tensor per file, as long as the file, so that the workflow's checks accept it
        path = model / f"model-{index:05d}-of-00004.safetensors"
        elements = (5 * 10**9 - 256) // 4
        header = json.dumps({"__metadata__": {"format": "pt"}, f"weight_{index}": {
            "dtype": "F32", "shape": [elements], "data_offsets": [0, 4 * elements]}}).encode().ljust(248)  # fmt: skip
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + 4 * elements)
        weight_map[f"weight_{index}"] = path.name
    index_file = {"metadata": {"total_size": 4 * 4 * elements}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index_file))
    return model


def measure(checkout: Path, large_config: Path, repeats: int) -> dict[str, float]:
    snakemake = [sys.executable, "-m", "snakemake"]
    (checkout / ".snakemake" / "vectorlm-fingerprints.json").unlink(missing_ok=True)  # a first run reads afresh
    first_large = seconds([*snakemake, "--cores", "2", "-n", f"--configfile={large_config}"], checkout)
    runs = {
        "snakemake --version": [*snakemake, "--version"],
        "-n, embedded default": [*snakemake, "--cores", "2", "-n"],
        "-n, large model": [*snakemake, "--cores", "2", "-n", f"--configfile={large_config}"],
    }
    result = {name: statistics.median(seconds(c, checkout) for _ in range(repeats)) for name, c in runs.items()}
    return {**result, "-n, large model, first run": first_large}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-with", help="a git revision to measure side by side (in a temporary worktree)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="the workflow to measure (default: this checkout; tests measure a copy)")  # fmt: skip
    args = parser.parse_args()
    if not (args.checkout / "resources" / "tiny-llama").is_dir():
        sys.exit("run `make run` first: the example model must exist")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = large_model(tmp, args.checkout / "resources" / "tiny-llama")
        config = tmp / "large.yaml"
        config.write_text(f"model: {model}\noutput_dir: {tmp}/out\nmax_seq_len: 256\n"
                          f"data:\n  train: {REPO}/examples/tiny/corpus.jsonl\n")  # fmt: skip
        checkouts = {"this checkout": args.checkout}
        if args.compare_with:
            other = tmp / "other"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(other), args.compare_with], cwd=REPO,
                           check=True)  # fmt: skip
            shutil.copytree(args.checkout / "resources", other / "resources")  # the same example model
            checkouts = {args.compare_with: other, **checkouts}
        try:
            results = {name: measure(path, config, args.repeats) for name, path in checkouts.items()}
        finally:
            if args.compare_with:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "other")], cwd=REPO, check=False)
    names = list(checkouts)
    print(f"{'seconds (median of ' + str(args.repeats) + ')':<36}" + "".join(f"{n:>16}" for n in names))
    for row in next(iter(results.values())):
        print(f"{row:<36}" + "".join(f"{results[n][row]:>16.2f}" for n in names))


if __name__ == "__main__":
    main()
