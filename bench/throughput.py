"""Training throughput on one GPU: vectorlm's training path in several configurations against the plain HF Trainer.

    python bench/throughput.py                      # Llama-3.2-1B and -3B shapes, rows of 4,096 tokens, <= 8 minutes
    python bench/throughput.py --models 1b --configs eager,hf --steps 12
    python bench/throughput.py --tiny               # the same code on CPU with a tiny Llama, in under a minute

Method. The models are Llama-3.2-1B and -3B shapes (``SHAPES``), randomly initialised and saved as bf16 safetensors
on scratch space (/dev/shm where it has room): nothing is downloaded. The data are random token ids in documents
whose lengths follow a log-normal distribution (``DOCUMENTS``: median 400 tokens, sigma 1.0, so mean about 660 and
p99 about 4,100 tokens, clipped to [8, 4096]; an assumed long-tailed shape of instruction/chat mixtures, not one
fitted to a corpus), packed into rows of 4,096 tokens by vectorlm's own pack stage (``run_pack``). Every
configuration trains the same rows for ``--steps`` optimizer steps of 8 rows each, bf16 mixed precision with fp32
master weights, fused AdamW, in a process of its own (nothing compiled or fragmented leaks between configurations):

- vectorlm rows run ``python -m vectorlm.train.rank``'s code (``vectorlm.train.rank.run``, one rank, NCCL) with the
  ``TrainConfig`` keys of ``CONFIGS``; tokens/s and MFU are read from ``train/metrics.jsonl`` (one record per step),
  peak memory from ``train/summary.json``. Only the final checkpoint is skipped: it is written after the last timed
  step, and at 3B its weights and AdamW moments (12 bytes per parameter, 39 GB) would cost more time and scratch
  space than the steps.
- The baseline is the plain HF Trainer (bench/hf_baseline.py: ``bf16=True``, sdpa, fused AdamW, the documents of
  the same rows flattened by ``DataCollatorWithFlattening``; gradient checkpointing only when one row per
  micro-batch does not fit otherwise), timed step by step with its real tokens counted. It runs twice
  (``BASELINES``): with one row (4,096 tokens) per micro-batch and with the largest micro-batch that fits. The
  collator makes a micro-batch one sequence, and transformers' sdpa mask for packed sequences is dense over all of
  it, so the HF Trainer's attention work grows with its micro-batch: with one row it equals that of vectorlm's padded
  rows, with more it compares memory at the micro-batch vectorlm uses. Ratios are to the faster of the two.

Each configuration starts from a guessed micro-batch (``first_micro_batch``) and halves it after an out-of-memory
error. The first third of the steps is warm-up (allocation, compilation) and is skipped; the table reports the
median of the remaining steps' tokens/s and MFU. MFU uses one formula for every row: vectorlm's
``metrics.training_flops`` (6 FLOPs per weight per token, LM head included, plus attention within each document,
docs/config.md "MFU") over ``metrics.peak_flops`` (the GPU's dense bf16 peak). Everything shares a time budget
(``--budget``, 8 minutes): 3B is skipped, and the table says so, when 1B suggests it would not finish in the time
left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_LLAMA_3_2 = {
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}  # fmt: skip
# LlamaConfig keyword arguments of the benchmarked shapes (as in the models' config.json files) and of --tiny's.
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, **_LLAMA_3_2},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128, **_LLAMA_3_2},
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "tie_word_embeddings": True,
             "max_position_embeddings": 1024, "rope_theta": 500000.0},
}  # fmt: skip
MODEL_NAMES = {"1b": "Llama-3.2-1B", "3b": "Llama-3.2-3B", "tiny": "tiny Llama"}

# The vectorlm rows of the table: --configs name -> (label, TrainConfig keys). Edit to benchmark other settings.
CONFIGS = {
    "eager": ("eager", {"compile": False, "activation_checkpointing": "none"}),
    # Peak memory at the HF Trainer's micro-batch of one row ("hf" below): the like-for-like comparison.
    "eager-1": (
        "eager, 1 row per micro-batch",
        {"compile": False, "activation_checkpointing": "none", "micro_batch_size": 1},
    ),
    "compiled": ("compiled", {"compile": True, "activation_checkpointing": "none"}),
    "compiled-sac": ("compiled + selective AC", {"compile": True, "activation_checkpointing": "selective"}),
}
# The baseline rows: --configs name -> (label, rows per micro-batch, None for the largest that fits).
BASELINES = {
    "hf": ("HF Trainer, 1 row per micro-batch", 1),
    "hf-fit": ("HF Trainer, largest micro-batch", None),
}


def label_of(config: str) -> str:
    return BASELINES[config][0] if config in BASELINES else CONFIGS[config][0]


@dataclass(frozen=True)
class Setting:
    """The size of a benchmark run: GPU-sized by default, CPU-sized with --tiny."""

    models: tuple[str, ...]
    seq_len: int
    global_rows: int  # rows per optimizer step
    median_length: float  # of the documents' log-normal
    device: str


FULL = Setting(models=("1b", "3b"), seq_len=4096, global_rows=8, median_length=400, device="cuda")
TINY = Setting(models=("tiny",), seq_len=256, global_rows=4, median_length=25, device="cpu")
DOCUMENTS = {"sigma": 1.0, "min_length": 8}  # log-normal sigma; the median scales with the row length
EVAL_ROWS = 8


class Unsupported(Exception):
    """A configuration this vectorlm cannot express: a TrainConfig key or value it does not have."""


@dataclass
class Row:
    """One line of the table."""

    model: str
    config: str
    label: str
    micro_batch: int | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- inputs


def scratch_root(needed_bytes: int) -> str | None:
    """/dev/shm when it has room for the model, data and logs (RAM-backed: loading the weights costs nothing), else
    the default temporary directory."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.2 * needed_bytes:
        return "/dev/shm"
    return None


def num_parameters(shape: dict) -> int:
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    block = h * (2 * q + 2 * kv) + 3 * h * shape["intermediate_size"] + 2 * h
    return vocab * h * (1 if shape["tie_word_embeddings"] else 2) + layers * block + h


def save_model(shape: dict, path: Path, *, seed: int = 0) -> Path:
    """A randomly initialised Llama of ``shape`` in bf16, as released checkpoints are, with a stand-in tokenizer (the
    train stage checks that one exists; training never reads it), as a Hugging Face model directory.

    Initialised as Llama is (normal(0, 0.02) matrices, unit norm weights), but drawn on every core: transformers' own
    initialisation runs on one and takes most of a minute at 3B.
    """
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module a tensor of its own, which unties the embeddings
    params = list(dict.fromkeys(model.parameters()))

    @torch.no_grad()
    def draw(index: int) -> None:
        generator = torch.Generator().manual_seed(seed + index)
        param = params[index]
        param.normal_(0, 0.02, generator=generator) if param.ndim > 1 else param.fill_(1.0)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(draw, range(len(params))))
    model.save_pretrained(path)
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return path


def document_lengths(num_tokens: int, *, setting: Setting, rng: np.random.Generator) -> np.ndarray:
    """Log-normal document lengths adding up to at least ``num_tokens``."""
    mean = setting.median_length * np.exp(DOCUMENTS["sigma"] ** 2 / 2)
    lengths = rng.lognormal(np.log(setting.median_length), DOCUMENTS["sigma"], size=int(1.2 * num_tokens / mean) + 16)
    lengths = np.clip(np.round(lengths), DOCUMENTS["min_length"], setting.seq_len).astype(np.int64)
    return lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]


def make_data(path: Path, *, setting: Setting, num_train_rows: int, vocab_size: int, seed: int = 0) -> dict:
    """Random documents packed into rows by vectorlm's pack stage; returns the length distribution's statistics."""
    import datasets

    from vectorlm.data.pack import run_pack

    rng = np.random.default_rng(seed)
    splits, stats = {}, {}
    for split, rows in (("train", num_train_rows), ("eval", EVAL_ROWS)):
        # 3% spare: the tail rows of best-fit packing are not full.
        lengths = document_lengths(int(1.03 * rows * setting.seq_len), setting=setting, rng=rng)
        tokens = rng.integers(0, vocab_size, size=int(lengths.sum()), dtype=np.int32)
        splits[split] = datasets.Dataset.from_dict({"input_ids": np.split(tokens, np.cumsum(lengths)[:-1])})
        if split == "train":
            stats = {"documents": len(lengths), "median": float(np.median(lengths)), "mean": float(lengths.mean()),
                     "p99": float(np.percentile(lengths, 99))}  # fmt: skip
    datasets.DatasetDict(splits).save_to_disk(str(path / "tokenized"))
    packed = run_pack(tokenized_dir=path / "tokenized", max_seq_len=setting.seq_len, output_dir=path / "packed")
    assert packed["train"]["rows"] >= num_train_rows, f"packed only {packed['train']['rows']} training rows"
    return {**stats, "rows": packed["train"]["rows"], "fill": packed["train"]["fill_fraction"]}


def first_micro_batch(shape: dict, *, setting: Setting, memory_gib: float | None, recompute: bool) -> int:
    """A guess at the largest micro-batch (rows) that fits, as a power of 2 that divides the global batch; an
    out-of-memory error halves it.

    fp32 weights, gradients and AdamW moments take 16 bytes per parameter; each row of tokens adds the activations a
    Llama block keeps for backward, about 2 x (10 x hidden + 4 x intermediate) + 16 x hidden bytes per token and
    layer (half that with recomputation), and the logits with their fp32 copies, about 10 bytes per token and
    vocabulary entry. On CPU (--tiny) half the global batch, so that gradients accumulate over two micro-steps.
    """
    if memory_gib is None:
        return setting.global_rows // 2
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    per_token_layer = 2 * (10 * hidden + 4 * shape["intermediate_size"]) + 16 * hidden
    per_row = setting.seq_len * (layers * per_token_layer * (0.5 if recompute else 1) + 10 * shape["vocab_size"])
    free = 0.9 * memory_gib * 2**30 - 16 * num_parameters(shape)
    rows = max(1, min(setting.global_rows, int(free // per_row)))
    return 2 ** (rows.bit_length() - 1)


# -------------------------------------------------------------------------------------------------------- workers


def run_vectorlm_job(job_file: str) -> None:
    """A vectorlm configuration: ``python -m vectorlm.train.rank JOB`` without the final checkpoint (see the
    docstring)."""
    from vectorlm.train import rank
    from vectorlm.train.job import TrainJob
    from vectorlm.train.trainer import Trainer

    Trainer.save = lambda self, step, *args, **kwargs: self.job.run.checkpoint(step)
    sys.exit(rank.run(TrainJob.load(job_file)))


_GPU_QUERY = """import json, torch
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps(p and [p.name, p.total_memory]))"""


def device_info(*, gpu: bool) -> dict:
    """Library versions, and with ``gpu`` the GPU's name and memory (asked in a subprocess, so that this process,
    whose children train, holds no CUDA context on it)."""
    import accelerate
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}  # fmt: skip
    name = memory = None
    if gpu:
        query = subprocess.run([sys.executable, "-c", _GPU_QUERY], capture_output=True, text=True, check=True)
        name, memory = json.loads(query.stdout) or (None, None)
    return {**info, "gpu": name, "memory_gib": memory / 2**30 if memory else None}


# -------------------------------------------------------------------------------------------------------- the runs


@dataclass
class Run:
    """What every configuration of one benchmark run shares."""

    setting: Setting
    scratch: Path
    packed: Path
    steps: int
    warmup: int
    deadline: float  # time.monotonic() by which everything must be done
    max_run_seconds: float  # for one attempt, so that a configuration that hangs leaves time for the others
    memory_gib: float | None

    @property
    def train_keys(self) -> dict:
        return {"max_steps": self.steps, "global_batch_size": self.setting.global_rows, "lr": 1e-5,
                "scheduler": "cosine", "mixed_precision": True, "eval_max_batches": 1, "log_every": 1,
                "async_checkpoint": False, "seed": 0}  # fmt: skip


def measure(run: Run, *, model: str, model_dir: Path, config: str) -> Row:
    """One row: the configuration trained from its first micro-batch, halved after each out-of-memory error."""
    baseline = config in BASELINES
    overrides = {} if baseline else dict(CONFIGS[config][1])
    fixed = BASELINES[config][1] if baseline else overrides.pop("micro_batch_size", None)
    row = Row(model, config, label_of(config))

    def first(recompute: bool) -> int:
        return fixed or first_micro_batch(SHAPES[model], setting=run.setting, memory_gib=run.memory_gib,
                                          recompute=recompute)  # fmt: skip

    micro_batch = first(recompute=overrides.get("activation_checkpointing") not in (None, False, "none"))
    checkpointing = False  # the HF Trainer's, when one row does not fit without it
    while True:
        timeout = min(run.deadline - time.monotonic(), run.max_run_seconds)
        if timeout < 30:
            row.notes.append("skipped: the time budget is spent")
            return row
        out = run.scratch / f"{model}-{config}-{micro_batch}{'-gc' if checkpointing else ''}"
        out.mkdir(parents=True)
        try:
            if baseline:
                result = _attempt_hf(run, model_dir=model_dir, out=out, micro_batch=micro_batch,
                                     checkpointing=checkpointing, timeout=timeout)  # fmt: skip
            else:
                keys = {**overrides, "micro_batch_size": micro_batch}
                result = _attempt_vectorlm(run, model_dir=model_dir, out=out, keys=keys, timeout=timeout)
        except Unsupported as error:
            row.notes.append(f"not run: {error}")
            return row
        log = (out / "worker.log").read_text(errors="replace")
        if result is not None:
            row.micro_batch, row.tokens_per_second, row.mfu, row.peak_memory_gib, note = micro_batch, *result
            row.notes += [note] if note else []
            if checkpointing:
                row.notes.append("gradient checkpointing (one row did not fit without)")
            shutil.rmtree(out)
            return row
        if "OutOfMemoryError" in log or "CUDA out of memory" in log:
            row.notes.append(f"micro-batch {micro_batch}{' with checkpointing' * checkpointing}: out of memory")
            shutil.rmtree(out)
            if micro_batch > 1:
                micro_batch //= 2
                continue
            if baseline and not checkpointing:
                checkpointing, micro_batch = True, first(recompute=True)
                continue
        print(f"--- {model} {config} failed; the last lines of its log:\n" + "\n".join(log.splitlines()[-30:]),
              file=sys.stderr)  # fmt: skip
        row.notes.append(f"failed: {_last_error(log)}")
        return row


def _attempt_vectorlm(run: Run, *, model_dir: Path, out: Path, keys: dict, timeout: float):
    from vectorlm.config import TrainConfig
    from vectorlm.train.job import TrainJob

    try:
        train = TrainConfig(**{**run.train_keys, **keys})
    except (TypeError, ValueError) as error:
        raise Unsupported(error) from error
    job = TrainJob(model=str(model_dir), packed=str(run.packed), output_dir=str(out), train=train)
    job.run.job.parent.mkdir(parents=True, exist_ok=True)
    job.save(job.run.job)
    command = [__file__, "--run-job", str(job.run.job)]
    if _run_worker(command, distributed=True, out=out, setting=run.setting, timeout=timeout) != 0:
        return None
    records = [json.loads(line) for line in job.run.metrics.read_text().splitlines()]
    steps = [r for r in records if "tokens_per_second" in r and r["step"] > run.warmup]
    summary = json.loads(job.run.summary.read_text())
    chosen = ", ".join(f"{key} {summary[key]}" for key in ("attention", "loss") if summary.get(key))
    return _steady(steps) + (summary["peak_memory_mb"] / 1024, chosen)


def _attempt_hf(run: Run, *, model_dir: Path, out: Path, micro_batch: int, checkpointing: bool, timeout: float):
    spec = {"model": str(model_dir), "packed": str(run.packed), "output_dir": str(out / "hf"),
            "result": str(out / "result.json"), "micro_batch": micro_batch, "global_rows": run.setting.global_rows,
            "steps": run.steps, "lr": run.train_keys["lr"], "gradient_checkpointing": checkpointing}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    command = [str(Path(__file__).with_name("hf_baseline.py")), str(out / "spec.json")]
    if _run_worker(command, distributed=False, out=out, setting=run.setting, timeout=timeout) != 0:
        return None
    result = json.loads((out / "result.json").read_text())
    return _steady(result["steps"][run.warmup :]) + (result["peak_memory_mb"] / 1024, None)


def _steady(steps: list[dict]) -> tuple[float, float | None]:
    """Median tokens/s and MFU of the steps after warm-up."""
    mfu = [s["mfu"] for s in steps if s["mfu"] is not None]
    return float(np.median([s["tokens_per_second"] for s in steps])), float(np.median(mfu)) if mfu else None


_DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run_worker(command: list[str], *, distributed: bool, out: Path, setting: Setting, timeout: float) -> int | None:
    """Runs a Python script, in a process group of its own so that a timeout also ends the compiler's subprocesses;
    returns its exit status, None when it ran out of time. ``distributed``: as rank 0 of 1."""
    env = {key: value for key, value in os.environ.items() if key not in _DISTRIBUTED}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false",
               # The same for every row: expandable segments avoid out-of-memory errors that are only fragmentation
               # (torchtitan sets it too).
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")  # fmt: skip
    # As vectorlm.train.launch starts a rank (the HF Trainer would take these variables for a distributed run and
    # wrap its model in DDP).
    if distributed:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))  # fmt: skip
    if setting.device == "cpu":
        # One inductor compile thread: on 2 cores a pool of compile workers costs more to start than it saves.
        env.update(CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_COMPILE_THREADS="1")
    with (out / "worker.log").open("w") as log:
        process = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\nbench: timed out after {timeout:.0f} s\n")
            return None
        finally:
            if process.poll() is None:  # out of time, or this process stopped (SIGTERM from timeout, Ctrl-C)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if re.match(r"^\w*(Error|Exception|bench:)", line.strip())]
    return (lines[-1] if lines else "no error message")[:200].replace("|", "/")


# ---------------------------------------------------------------------------------------------------- the report


def gpu_slug(info: dict) -> str:
    if info["gpu"] is None:
        return "cpu"
    name = info["gpu"].lower()
    known = re.search(r"\b(gh200|b200|h200|h100|a100|l40s|l4|a10)\b", name)
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-")


CPU_NOTE = ("On CPU the HF Trainer's bf16 is CPU autocast and vectorlm's is FSDP2's bf16 mixed precision; the "
            "numbers only show that the benchmark runs, not how fast anything is.")  # fmt: skip


def format_report(rows: list[Row], *, run: Run, info: dict, data: dict, command: str, seconds: float) -> str:
    """The results as Markdown: how they were measured, then a table per model."""
    setting = run.setting
    device = (f"{info['gpu']} ({info['memory_gib']:.0f} GiB), CUDA {info['cuda']}" if info["gpu"]
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, gloo)")  # fmt: skip
    used = [(label, keys) for name, (label, keys) in CONFIGS.items() if any(r.config == name for r in rows)]
    versions = (f"{date.today()}; {device}; torch {info['torch']}, transformers {info['transformers']}, accelerate "
                f"{info['accelerate']}, Python {info['python']}; {seconds:.0f} s in all.")  # fmt: skip
    method = (
        f"Rows of {setting.seq_len:,} tokens, {setting.global_rows} rows per optimizer step, {run.steps} steps per "
        f"configuration, the first {run.warmup} skipped as warm-up: medians of the other steps. Documents: random "
        f"token ids, lengths log-normal (median {setting.median_length:g}, sigma {DOCUMENTS['sigma']}, clipped to "
        f"[{DOCUMENTS['min_length']}, {setting.seq_len}]): {data['documents']:,} training documents, median "
        f"{data['median']:.0f}, mean {data['mean']:.0f}, p99 {data['p99']:.0f} tokens, packed into {data['rows']} "
        f"rows ({data['fill']:.1%} full). bf16 mixed precision (fp32 master weights), fused AdamW, one process per "
        "row. MFU: vectorlm.train.metrics.training_flops over the GPU's dense bf16 peak, one formula for every row (n/a "
        f"on CPU). Peak memory: {'torch.cuda.max_memory_allocated' if info['gpu'] else 'resident set size'}."
    )  # fmt: skip
    configurations = "; ".join(f"{label}: {', '.join(f'{k} {v}' for k, v in keys.items())}" for label, keys in used)
    lines = [f"# Training throughput: vectorlm against the HF Trainer, one {info['gpu'] or 'CPU process'}", "",
             f"    {command}", "", versions, "", method, "",
             f"vectorlm configurations (TrainConfig keys): {configurations}."]  # fmt: skip
    for model in dict.fromkeys(r.model for r in rows):
        lines += ["", f"## {MODEL_NAMES[model]} shape ({num_parameters(SHAPES[model]):,} parameters)", ""]
        lines += _table([r for r in rows if r.model == model])
    if setting.device == "cpu":
        lines += ["", CPU_NOTE]
    return "\n".join(lines) + "\n"


def _table(rows: list[Row]) -> list[str]:
    rows = sorted(rows, key=lambda r: [*CONFIGS, *BASELINES].index(r.config))
    measured = [r for r in rows if r.config in BASELINES and r.tokens_per_second]
    best = max((r.tokens_per_second for r in measured), default=None)
    lines = [
        "| configuration | micro-batch | tokens/s per GPU | MFU | peak memory GiB | vs best HF Trainer | notes |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        cells = [
            r.label,
            r.micro_batch or "-",
            f"{r.tokens_per_second:,.0f}" if r.tokens_per_second else "-",
            f"{r.mfu:.1%}" if r.mfu else "n/a",
            f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib else "-",
            f"{r.tokens_per_second / best:.2f}x" if best and r.tokens_per_second else "-",
            "; ".join(r.notes),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


# -------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU, a few steps: checks the script")
    parser.add_argument("--models", help="comma-separated, of: 1b, 3b (default both; --tiny: tiny)")
    # A baseline runs second, so that a run cut short by the time budget still has its ratios.
    first, *others = CONFIGS
    baseline, *other_baselines = BASELINES
    default_configs = ",".join([first, baseline, *others, *other_baselines])
    parser.add_argument("--configs", default=default_configs, help="comma-separated, of: %(default)s")
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration (default 10; --tiny: 4)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default %(default)s)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/DATE-throughput-GPU.md)")
    parser.add_argument("--run-job", help=argparse.SUPPRESS)  # a vectorlm row: this script in a process of its own
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2: the first third of the steps is warm-up")
    if args.run_job:
        return run_vectorlm_job(args.run_job)
    start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so that workers are ended too
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of packing and saving, before tqdm is imported
    setting = TINY if args.tiny else FULL
    models = args.models.split(",") if args.models else list(setting.models)
    configs = args.configs.split(",")
    unknown = [m for m in models if m not in SHAPES] + [c for c in configs if c not in CONFIGS and c not in BASELINES]
    if unknown:
        parser.error(f"unknown model or configuration: {', '.join(unknown)}")
    info = device_info(gpu=not args.tiny)
    if not args.tiny and info["gpu"] is None:
        sys.exit("no CUDA GPU: run with --tiny to check the script on CPU")
    steps = args.steps or (4 if args.tiny else 10)
    biggest = max(num_parameters(SHAPES[m]) for m in models)
    with tempfile.TemporaryDirectory(prefix="vectorlm-bench-", dir=scratch_root(4 * biggest)) as scratch:
        scratch = Path(scratch)
        run = Run(setting, scratch, scratch / "data" / "packed", steps, max(1, steps // 3), start + args.budget,
                  0.4 * args.budget, info["memory_gib"])  # fmt: skip
        data = make_data(scratch / "data", setting=setting, num_train_rows=steps * setting.global_rows,
                         vocab_size=min(SHAPES[m]["vocab_size"] for m in models))  # fmt: skip
        rows = bench_models(run, models, configs)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    report = format_report(rows, run=run, info=info, data=data, command=command.strip(),
                           seconds=time.monotonic() - start)  # fmt: skip
    print(report)
    output = args.output or REPO / "bench" / "results" / f"{date.today()}-throughput-{gpu_slug(info)}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(f"written to {output}", file=sys.stderr)
    failed = [r for r in rows if not r.tokens_per_second and not r.notes[-1].startswith("skipped")]
    sys.exit(1 if failed else 0)


def bench_models(run: Run, models: list[str], configs: list[str]) -> list[Row]:
    """Every configuration on every model; a model is skipped when the one before suggests it cannot finish in the
    time left (3B takes about 1.5x as long as 1B: the same start-up and compile costs, 2.6x the FLOPs per token)."""
    rows: list[Row] = []
    previous = 0.0
    for index, model in enumerate(models):
        begin = time.monotonic()
        if index and begin + 1.5 * previous > run.deadline:
            note = (f"skipped: {MODEL_NAMES[models[index - 1]]} took {previous:.0f} s, and "
                    f"{run.deadline - begin:.0f} s of the budget are left")  # fmt: skip
            rows += [Row(model, c, label_of(c), notes=[note]) for c in configs]
            continue
        model_dir = save_model(SHAPES[model], run.scratch / model)
        print(f"bench: {model} saved after {time.monotonic() - begin:.0f} s", file=sys.stderr)
        for config in configs:
            started = time.monotonic()
            rows.append(measure(run, model=model, model_dir=model_dir, config=config))
            print(f"bench: {time.monotonic() - started:.0f} s: {rows[-1]}", file=sys.stderr)
        shutil.rmtree(model_dir)
        previous = time.monotonic() - begin
    return rows


if __name__ == "__main__":
    main()
