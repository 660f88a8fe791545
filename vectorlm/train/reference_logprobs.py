"""The reference_logprobs stage: the reference model's log-probability of every completion of the packed preference
pairs, computed once, by a forward pass sharded with FSDP2 over the train rule's ranks, and cached.

DPO compares the policy's log-probabilities of a pair's completions with the reference model's. The reference's
depend only on the reference model and the packed rows, so they are an artifact of their own: written into the cache
at a key made of both (vectorlm/pipeline/cache_keys.py) and shared by every experiment with the same reference and
data (another ``dpo.beta``, another learning rate, LoRA on the same base). Training then holds one model, not two.

The result is a DatasetDict beside its ``stats.json``: for each split, a ``logps`` list per packed row, one summed
log-probability per document of the row (the chosen completion's, then the rejected one's, pair after pair), in
float64. Each rank computes a share of the rows and writes it; the main rank gathers them in row order.

    python -m vectorlm.train.reference_logprobs JOB.yaml    # one rank (started by :func:`run_reference_logprobs`)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import yaml

from vectorlm.config import LoraSettings, TrainConfig, to_plain, write_stage_config
from vectorlm.data.arrow import list_array, partial_dir, ranges
from vectorlm.data.loader import BatchShape, fetch
from vectorlm.log import Progress, setup_logging
from vectorlm.packed import STATS_FILE
from vectorlm.train.attention import check_pairs_apart, model_and_attention
from vectorlm.train.distributed import DistributedEnv, init_distributed
from vectorlm.train.launch import job_error, run_ranks
from vectorlm.train.model import build_model, computed_settings
from vectorlm.train.placement import Placement
from vectorlm.train.preference import sequence_logps
from vectorlm.train.rank import die_with_launcher
from vectorlm.train.step import to_device, token_logps

log = logging.getLogger(__name__)

JOB_FILE = "job.yaml"  # in the scratch directory beside the output while the stage runs


@dataclass(frozen=True)
class ReferenceJob:
    """The reference model, the packed pairs, the cache entry to write, the reference model's ``digest`` (recorded)
    and the train settings the forward runs with (micro-batch size, attention, precision, sharding)."""

    model: str
    packed: str
    output_dir: str
    digest: str
    train: TrainConfig = field(default_factory=TrainConfig)
    trust_remote_code: bool = False

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(to_plain(self), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceJob:
        raw = yaml.safe_load(Path(path).read_text())
        return cls(**{**raw, "train": TrainConfig(**raw["train"])})


def compute_on_rank(job: ReferenceJob, env: DistributedEnv, scratch: Path) -> None:
    """This rank's share of the rows of every split: each row's documents' summed log-probabilities, written to
    ``scratch/{split}.rank{r}.npz``. Every rank runs the same number of forward passes (FSDP's all-gathers are
    collective), padding with the last row."""
    model_class, attention, config = model_and_attention(job.model, job.train.attention, env.device,
                                                         trust_remote_code=job.trust_remote_code)  # fmt: skip
    check_pairs_apart(model_class, config, attention)  # before any weight is read
    settings = dataclasses.replace(computed_settings(job.train, env), objective="dpo", compile=False,
                                   activation_checkpointing="none")  # fmt: skip
    model, _ = build_model(job.model, env, train=settings, lora=LoraSettings(), attention=attention,
                           trust_remote_code=job.trust_remote_code)  # fmt: skip
    model.eval()
    packed = datasets.load_from_disk(job.packed)
    stats = json.loads((Path(job.packed) / STATS_FILE).read_text())
    shape = BatchShape(job.train.micro_batch_size, stats["max_seq_len"])
    flatten = attention == "flash_attention_2"
    for split in ("train", "eval"):
        rows = packed[split]
        per_round = env.world_size * job.train.micro_batch_size
        num_rounds = math.ceil(len(rows) / per_round)
        progress = (
            Progress(len(rows), desc=f"reference log-probabilities ({split})", unit="rows") if env.is_main else None
        )
        mine, values, counts = [], [], []
        for round_index in range(num_rounds):
            start = round_index * per_round + env.rank * job.train.micro_batch_size
            indices = np.arange(start, min(start + job.train.micro_batch_size, len(rows)))
            batch = fetch(rows, indices if len(indices) else np.array([len(rows) - 1]), flatten=flatten,
                          shape=shape, pairs=True)  # fmt: skip
            with torch.no_grad():
                logps = sequence_logps(token_logps(model, to_device(batch, env.device)), batch["sequence_ids"].to(
                    env.device), len(batch["sequence_lengths"]))  # fmt: skip
            if len(indices):
                mine.append(indices)
                values.append(logps.cpu().numpy())
                counts.append(batch["row_sequences"])
            if progress:
                progress.update(min(per_round, len(rows) - round_index * per_round))
        if progress:
            progress.close()
        np.savez(scratch / f"{split}.rank{env.rank}.npz", rows=_concat(mine, np.int64), counts=_concat(counts, np.int64),
                 values=_concat(values, np.float64))  # fmt: skip


def _concat(parts: list, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=dtype).reshape(-1) for p in parts]) if parts else np.zeros(0, dtype)


def gather(scratch: Path, output: Path, *, world_size: int, packed: datasets.DatasetDict) -> dict[str, Any]:
    """The ranks' shares in row order, as one DatasetDict of ``logps`` lists at ``output``; returns the rows of each
    split and a digest of the values (what a training run records of its reference)."""
    splits, digest = {}, hashlib.sha256()
    for split in ("train", "eval"):
        parts = [np.load(scratch / f"{split}.rank{r}.npz") for r in range(world_size)]
        rows = np.concatenate([p["rows"] for p in parts])
        counts = np.concatenate([p["counts"] for p in parts])
        values = np.concatenate([p["values"] for p in parts])
        if not np.array_equal(np.sort(rows), np.arange(len(packed[split]))):
            raise RuntimeError(f"the ranks' shares do not cover every {split} row once")
        order = np.argsort(rows, kind="stable")
        starts = np.cumsum(counts) - counts
        ordered = values[ranges(starts[order], counts[order])]
        digest.update(split.encode() + counts[order].tobytes() + ordered.tobytes())
        column = list_array(ordered, counts[order], pa.float64())
        splits[split] = datasets.Dataset(pa.Table.from_arrays([column], names=["logps"]))
    datasets.DatasetDict(splits).save_to_disk(str(output))
    return {"rows": {split: len(rows) for split, rows in splits.items()}, "content_digest": digest.hexdigest()[:32]}


def run(job_file: str | Path) -> int:
    """One rank of the stage (within the process group given by the environment); returns the exit status."""
    job = ReferenceJob.load(job_file)
    env = init_distributed(collective_timeout_minutes=job.train.collective_timeout_minutes,
                           checkpoint_timeout_minutes=job.train.checkpoint_timeout_minutes)  # fmt: skip
    setup_logging(rank=env.rank)
    try:
        compute_on_rank(job, env, Path(job_file).parent)
        dist.barrier(group=env.cpu_group)
        return 0
    finally:
        dist.destroy_process_group()


def run_reference_logprobs(job: ReferenceJob, *, placement: Placement, log_path: str | Path) -> dict:
    """Computes the reference log-probabilities of ``job`` on ``placement``'s ranks into ``job.output_dir``, with its
    ``stats.json`` (the packed rows' fingerprint, the reference's digest) and resolved config; returns the stats.

    Raises:
        RuntimeError: when the ranks fail, naming the cause and the log.
    """
    output = Path(job.output_dir)
    start = time.perf_counter()
    with partial_dir(output) as scratch:
        job.save(scratch / JOB_FILE)
        status, tail = run_ranks(__name__, scratch / JOB_FILE, placement=placement, log_path=log_path)
        if status != 0:
            raise RuntimeError(f"reference_logprobs failed: {job_error(tail)} (exit status {status}; the ranks' "
                               f"output is in {log_path})")  # fmt: skip
        packed = datasets.load_from_disk(job.packed)
        gathered = gather(scratch, scratch / "result", world_size=placement.ranks, packed=packed)
        packed_stats = json.loads((Path(job.packed) / STATS_FILE).read_text())
        stats = {**gathered, "packed_fingerprint": packed_stats["fingerprint"], "reference_digest": job.digest,
                 "reference_model": job.model, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
        (scratch / "result" / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        write_stage_config(scratch / "result", {"dpo": {"reference_model": job.model}}, upstream=job.packed)
        if output.exists():
            shutil.rmtree(output)
        (scratch / "result").rename(output)
    log.info("reference log-probabilities of %s rows in %.1f s: %s", stats["rows"], stats["seconds"], output)
    return stats


def main(argv: list[str] | None = None) -> None:
    die_with_launcher()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="job YAML written by run_reference_logprobs")
    sys.exit(run(parser.parse_args(argv).job))


if __name__ == "__main__":
    main()
