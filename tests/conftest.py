"""Shared fixtures: a tiny example model and small corpora, built locally (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "tiny" / "corpus.jsonl"

# Tests run single-threaded torch where they can: 2 CPU cores are shared with the ranks they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def requires_gpu(test):
    """Marks a test ``gpu`` (``pytest -m gpu`` selects it, as bench/gpu.sh does) and skips it without a GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a 300-token BPE tokenizer trained on the example corpus."""
    from vectorlm.example.tiny_llama import build_example_model

    path = tmp_path_factory.mktemp("tiny-model") / "model"
    return build_example_model(
        CORPUS, path, vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=512
    )


@pytest.fixture(scope="session")
def corpus_rows() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


@pytest.fixture(scope="session")
def packed_dir(tmp_path_factory, tiny_model_dir, corpus_rows) -> Path:
    """The example corpus (first 400 documents) tokenized and packed into 128-token rows."""
    from vectorlm.config import DataConfig
    from vectorlm.data.pack import run_pack
    from vectorlm.data.tokenize import run_tokenize

    root = tmp_path_factory.mktemp("data")
    data = DataConfig(train=str(write_jsonl(root / "train.jsonl", corpus_rows[:400])), eval_fraction=0.1)
    run_tokenize(model_dir=tiny_model_dir, data=data, output_dir=root / "tokenized")
    run_pack(tokenized_dir=root / "tokenized", max_seq_len=128, output_dir=root / "packed")
    return root / "packed"


def run_training(
    output_dir: Path, model_dir: Path, packed: Path, *, num_processes: int = 2, nodes: int = 1, lora=None, **train
) -> dict:
    """Runs a real training job on ``num_processes`` local ranks (over ``nodes`` simulated nodes); returns its
    summary and metric records."""
    from vectorlm.config import LoraSettings, TrainConfig
    from vectorlm.train.job import TrainJob, check_job
    from vectorlm.train.launch import launch_training
    from vectorlm.train.placement import Placement

    train = {"log_every": 1, **train}  # every step's record, which tests compare
    job = TrainJob(model=str(model_dir), packed=str(packed), output_dir=str(output_dir), train=TrainConfig(**train),
                   lora=LoraSettings(**(lora or {})))  # fmt: skip
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    placement = Placement(num_processes, nodes, max(1, 2 // num_processes))
    check_job(job, ranks=placement.ranks)
    launch_training(job, placement=placement, log_path=output_dir / "logs" / "train.log")
    records = [json.loads(line) for line in job.run.metrics.read_text().splitlines()]
    return {
        "summary": json.loads(job.run.summary.read_text()),
        "steps": [r for r in records if "loss" in r],
        "evals": [r for r in records if "eval_loss" in r],
    }


@pytest.fixture
def process_group():
    """A one-rank gloo process group in this process, for looking inside a sharded model."""
    import socket

    from vectorlm.train.distributed import DistributedEnv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield DistributedEnv(0, 1, 0, 1, torch.device("cpu"))
    torch.distributed.destroy_process_group()


def _rank_entry(rank: int, world_size: int, port: int, fn, args, init: dict) -> None:
    from vectorlm.train.distributed import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    env = init_distributed(**init)
    try:
        fn(env, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, init: dict | None = None) -> None:
    """Runs ``fn(env, *args)`` on ``world_size`` fresh gloo ranks (``fn`` must be a module-level function; ``init``:
    keyword arguments of ``init_distributed``); its results come back through files."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(
        _rank_entry, args=(world_size, port, fn, args, init or {}), nprocs=world_size, join=True
    )
