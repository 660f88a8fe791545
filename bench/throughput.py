"""Training throughput on one GPU: vectorlm against the Hugging Face Trainer, both measured in the same run.

    python bench/throughput.py                      # Llama-3.2-1B shape, rows of 4,096 tokens: ~6.5 min on an H100
    python bench/throughput.py --models 1b,3b       # and the 3B shape, in the budget's time left
    python bench/throughput.py --configs compiled,hf-best
    python bench/throughput.py --tiny               # the same code on CPU with a tiny Llama: under 3 min on 2 cores

The rows, in the order they run (a run cut short by its time budget still has the headline ratio):

- ``compiled``: vectorlm as it is meant to run: decoder blocks and loss compiled, ``train.loss`` and
  ``train.attention`` on ``auto`` (our fused loss; flex attention on a GPU without flash-attn), no activation
  checkpointing, the largest micro-batch that ``first_micro_batch`` expects to fit (halved after an out-of-memory).
- ``hf-best``: the HF Trainer at its best (bench/hf_baseline.py): ``bf16=True``, sdpa, fused AdamW, padding-free
  packing by ``DataCollatorWithFlattening``, plus ``use_liger_kernel`` (GPU only) and ``torch_compile`` of each decoder
  block (accelerate's regional compilation with dynamic shapes: compiled once, as vectorlm's blocks are).
- ``hf-default``: the HF Trainer as a user configures it by default: the same without Liger and compilation.
- ``eager``: vectorlm not compiled.

Other rows on request (``--configs``): ``compiled-sac`` (selective activation checkpointing), ``compiled-liger``
(vectorlm with Liger's loss) and ``hf-best-fit`` (the HF best with the largest micro-batch that fits). The HF rows
run one row (4,096 tokens) per micro-batch because more is slower there: the collator makes a micro-batch one
sequence, and transformers' sdpa mask over packed documents is dense, so sdpa computes every pair of tokens in it:
attention work per token grows with the micro-batch (at 1B, 22% of the matmuls' FLOPs with one row, 170% with 8).

Method. The models are Llama-3.2 shapes (``SHAPES``), randomly initialised and saved as bf16 safetensors on scratch
space (/dev/shm where it has room): nothing is downloaded. The data are random token ids in documents whose lengths
follow a log-normal distribution (median 400 tokens, sigma 1.0: mean about 660, p99 about 4,100, clipped to [8,
4096]; an assumed long-tailed shape of instruction/chat mixtures), packed into rows of 4,096 tokens by vectorlm's own
pack stage. Every row trains the same packed rows, ``global_rows`` per optimizer step (the same tokens per step on
every row), bf16 mixed precision with fp32 master weights, fused AdamW, in a process of its own (nothing compiled or
fragmented leaks between rows). A process trains ``warmup`` steps, then ``repeats`` timed windows of ``window`` steps
each: the table gives the median window's tokens/s and the windows' spread ((max - min) / median). Compilation happens
in the first steps, so compile time is reported apart: the warm-up steps' time beyond that of as many timed steps.

- vectorlm rows run ``vectorlm.train.rank.run`` (one rank, NCCL) on the ``TrainConfig`` keys of ``CONFIGS``, without
  evaluations or the final checkpoint (neither is training). Each step's time and FLOPs come from its
  ``train/metrics.jsonl`` record (one per step, after a device synchronisation); the loss, activation checkpointing and
  compilation it used are read from its log, its attention from ``train/summary.json``.
- HF rows time each optimizer step after a device synchronisation and count its real tokens and FLOPs.

MFU: one formula for every row, ``vectorlm.train.metrics.training_flops`` (6 FLOPs per weight per token, LM head
included, plus attention within each document; docs/config.md "MFU"), over two peaks: the data sheet's
(``metrics.peak_flops``) and a bf16 matmul measured on the spot (``metrics.measured_matmul_peak``).

Time budget (``--budget``, default 480 s; bench/gpu.sh gives it what is left of its 9 minutes). At 1B on an H100, 8
rows of 4,096 tokens per step, 3 + 3 x 20 steps per row, estimated as FLOPs per step (2.5e14) over an assumed
MFU, plus start-up (imports, NCCL, reading the weights: ~15 s) and compilation: ``compiled`` ~110 s (~60 s to compile,
0.55 s per step at 45% MFU), ``hf-best`` ~115 s (~55 s of compilation and Liger's Triton kernels, 0.7 s per step),
``hf-default`` ~70 s (0.9 s per step), ``eager`` ~65 s (0.75 s per step), and ~30 s for the model, the data and the
measured peak: ~390 s. A row is skipped, and the table says so, when less than a minute is left for it; each row
may take at most 45% of the budget.
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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
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

# vectorlm rows: --configs name -> (label, TrainConfig keys). Attention and loss stay on auto unless named here.
CONFIGS = {
    "compiled": ("vectorlm, compiled", {"compile": True, "activation_checkpointing": "none"}),
    "eager": ("vectorlm, eager", {"compile": False, "activation_checkpointing": "none"}),
    "compiled-sac": ("vectorlm, compiled, selective AC", {"compile": True, "activation_checkpointing": "selective"}),
    "compiled-liger": (
        "vectorlm, compiled, Liger loss",
        {"compile": True, "activation_checkpointing": "none", "loss": "liger"},
    ),
}


@dataclass(frozen=True)
class Baseline:
    """An HF Trainer row: rows per micro-batch (None: the largest that fits), Liger's kernels, compiled blocks."""

    label: str
    micro_batch: int | None
    liger: bool
    compile: bool


BASELINES = {
    "hf-best": Baseline("HF Trainer, best", 1, liger=True, compile=True),
    "hf-default": Baseline("HF Trainer, default", 1, liger=False, compile=False),
    "hf-best-fit": Baseline("HF Trainer, best, largest micro-batch", None, liger=True, compile=True),
}
DEFAULT_CONFIGS = ("compiled", "hf-best", "hf-default", "eager")  # the order they run in


def label_of(config: str) -> str:
    return BASELINES[config].label if config in BASELINES else CONFIGS[config][0]


@dataclass(frozen=True)
class Setting:
    """The size of a benchmark run: GPU-sized by default, CPU-sized with --tiny."""

    models: tuple[str, ...]
    seq_len: int
    global_rows: int  # rows per optimizer step
    median_length: float  # of the documents' log-normal
    device: str
    warmup: int  # steps before the timed windows
    window: int  # steps per timed window
    repeats: int  # timed windows
    compile_backend: str
    budget: float  # seconds for everything, by default

    @property
    def steps(self) -> int:
        return self.warmup + self.repeats * self.window


FULL = Setting(models=("1b",), seq_len=4096, global_rows=8, median_length=400, device="cuda", warmup=3, window=20,
               repeats=3, compile_backend="inductor", budget=480)  # fmt: skip
# On 2 cores inductor's C++ code generation takes minutes for the compiled rows (it timed out a compiled row after
# 192 s): --tiny compiles with aot_eager, which traces the same graphs (fullgraph, dynamic shapes, recompilations)
# and runs them without generating code.
TINY = Setting(models=("tiny",), seq_len=256, global_rows=4, median_length=25, device="cpu", warmup=2, window=20,
               repeats=3, compile_backend="aot_eager", budget=170)  # fmt: skip
DOCUMENTS = {"sigma": 1.0, "min_length": 8}  # log-normal sigma; the median scales with the row length
EVAL_ROWS = 8
MIN_ROW_SECONDS = {"cuda": 60, "cpu": 20}  # a row is skipped with less time left


class Unsupported(Exception):
    """A configuration this vectorlm cannot express: a TrainConfig key or value it does not have."""


@dataclass
class Row:
    """One line of the table."""

    model: str
    config: str
    label: str
    settings: dict[str, str] = field(default_factory=dict)  # attention, loss, compile, checkpointing
    micro_batch: int | None = None
    tokens_per_step: float | None = None
    windows: list[float] = field(default_factory=list)  # tokens/s of each timed window
    flops_per_second: float | None = None  # of the median window
    compile_seconds: float | None = None  # the warm-up steps' excess over timed steps
    seconds: float | None = None  # the row's processes, start to end
    peak_memory_gib: float | None = None
    estimated_gib: float | None = None  # rule estimate's traced peak for this row's settings (vectorlm rows)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float | None:
        return float(np.median(self.windows)) if self.windows else None

    @property
    def spread(self) -> float | None:
        return (max(self.windows) - min(self.windows)) / self.tokens_per_second if self.windows else None


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


def run_vectorlm_job(job_file: str, *, compile_backend: str) -> None:
    """A vectorlm row: ``python -m vectorlm.train.rank JOB`` without evaluations or the final checkpoint (neither is
    training, and each costs compilation or minutes of writing at 3B), logging every step's FLOP/s as its ``mfu``."""
    import torch

    from vectorlm.train import rank
    from vectorlm.train.job import TrainJob
    from vectorlm.train.trainer import Trainer

    Trainer.save = lambda self, step, *args, **kwargs: self.job.run.checkpoint(step)
    Trainer.evaluate = lambda self, step: self.eval_losses.__setitem__(step, float("nan"))
    build = Trainer.build

    def build_with_flops(self: Trainer) -> None:
        build(self)
        self.meter.peak = 1.0  # MFU over a peak of 1 FLOP/s: the FLOP/s, which the benchmark divides by each peak

    Trainer.build = build_with_flops
    if compile_backend != "inductor":  # every torch.compile of the run, Module.compile's included
        compile_ = torch.compile
        torch.compile = lambda *args, **kwargs: compile_(*args, **{**kwargs, "backend": compile_backend})
    sys.exit(rank.run(TrainJob.load(job_file)))


_DEVICE_QUERY = """import json, sys, torch
sys.path.insert(0, sys.argv[1])
from vectorlm.train.metrics import measured_matmul_peak, peak_flops
if torch.cuda.is_available():
    device = torch.device("cuda", 0)
    properties = torch.cuda.get_device_properties(device)
    print(json.dumps([properties.name, properties.total_memory, peak_flops(device), measured_matmul_peak(device)]))
else:
    print(json.dumps(None))"""


def device_info(*, gpu: bool) -> dict:
    """Library versions; the GPU's name, memory, data-sheet bf16 peak and measured bf16 matmul peak (asked in a
    subprocess, so that this process, whose children train, holds no CUDA context); on CPU an fp32 matmul peak."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in ("torch", "transformers", "accelerate", "liger-kernel"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    if not gpu:
        from vectorlm.train.metrics import measured_matmul_peak

        measured = measured_matmul_peak(torch.device("cpu"), size=512)
        return {**versions, "gpu": None, "memory_gib": None, "nominal_peak": None, "measured_peak": measured}
    query = subprocess.run([sys.executable, "-c", _DEVICE_QUERY, str(REPO)], capture_output=True, text=True,
                           check=True)  # fmt: skip
    name, memory, nominal, measured = json.loads(query.stdout) or (None, None, None, None)
    return {**versions, "gpu": name, "memory_gib": memory / 2**30 if memory else None, "nominal_peak": nominal,
            "measured_peak": measured}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- the runs


@dataclass
class Run:
    """What every row of one benchmark run shares."""

    setting: Setting
    scratch: Path
    packed: Path
    deadline: float  # time.monotonic() by which everything must be done
    max_row_seconds: float  # for one row, so that a row that hangs leaves time for the others
    memory_gib: float | None
    compile_backend: str

    @property
    def train_keys(self) -> dict:
        return {"max_steps": self.setting.steps, "global_batch_size": self.setting.global_rows, "lr": 1e-5,
                "scheduler": "cosine", "mixed_precision": True, "eval_max_batches": 1, "log_every": 1,
                "async_checkpoint": False, "seed": 0}  # fmt: skip


def measure(run: Run, *, model: str, model_dir: Path, config: str) -> Row:
    """One row: the configuration trained from its first micro-batch, halved after each out-of-memory error (the HF
    rows at one row per micro-batch turn gradient checkpointing on instead)."""
    baseline = BASELINES.get(config)
    overrides = {} if baseline else dict(CONFIGS[config][1])
    fixed = baseline.micro_batch if baseline else overrides.pop("micro_batch_size", None)
    row = Row(model, config, label_of(config))
    started = time.monotonic()
    micro_batch = fixed or first_micro_batch(
        SHAPES[model], setting=run.setting, memory_gib=run.memory_gib,
        recompute=overrides.get("activation_checkpointing") not in (None, "none"),
    )  # fmt: skip
    checkpointing = False  # the HF Trainer's, when one row per micro-batch does not fit without it
    while True:
        timeout = min(run.deadline - time.monotonic(), run.max_row_seconds - (time.monotonic() - started))
        if timeout < MIN_ROW_SECONDS[run.setting.device]:
            row.notes.append("skipped: the time budget is spent")
            return row
        out = run.scratch / f"{model}-{config}-{micro_batch}{'-gc' if checkpointing else ''}"
        out.mkdir(parents=True)
        try:
            if baseline:
                result = _attempt_hf(run, baseline, model_dir=model_dir, out=out, micro_batch=micro_batch,
                                     checkpointing=checkpointing, timeout=timeout)  # fmt: skip
            else:
                keys = {**overrides, "micro_batch_size": micro_batch}
                result = _attempt_vectorlm(run, model_dir=model_dir, out=out, keys=keys, timeout=timeout)
        except Unsupported as error:
            row.notes.append(f"not run: {error}")
            return row
        row.seconds = time.monotonic() - started
        log = (out / "worker.log").read_text(errors="replace")
        if result is not None:
            steps, row.settings, row.peak_memory_gib, notes = result
            if not baseline:
                row.estimated_gib = estimated_peak_gib(run, model_dir=model_dir, keys=keys)
            row.micro_batch = micro_batch
            row.windows, row.flops_per_second, row.compile_seconds, row.tokens_per_step = summarise(steps, run.setting)
            row.notes += notes
            shutil.rmtree(out)
            return row
        if "OutOfMemoryError" in log or "CUDA out of memory" in log:
            row.notes.append(f"micro-batch {micro_batch}{' with checkpointing' * checkpointing}: out of memory")
            shutil.rmtree(out)
            if micro_batch > 1:
                micro_batch //= 2
                continue
            if baseline and not checkpointing:
                checkpointing = True
                micro_batch = fixed or first_micro_batch(SHAPES[model], setting=run.setting,
                                                         memory_gib=run.memory_gib, recompute=True)  # fmt: skip
                continue
        print(f"--- {model} {config} failed; the last lines of its log:\n" + "\n".join(log.splitlines()[-30:]),
              file=sys.stderr)  # fmt: skip
        row.notes.append(f"failed: {_last_error(log)}")
        return row


def estimated_peak_gib(run: Run, *, model_dir: Path, keys: dict) -> float:
    """What rule estimate predicts for a vectorlm row: the traced peak of one rank (vectorlm.estimate.memory), which
    torch.cuda.max_memory_allocated measures (the allowance for the CUDA context and fragmentation is not in either)."""
    from vectorlm.config import LoraSettings, TrainConfig
    from vectorlm.estimate.memory import step_memory

    train = TrainConfig(**{**run.train_keys, **keys})
    memory, _ = step_memory(model_dir, train=train, lora=LoraSettings(), max_seq_len=run.setting.seq_len,
                            world_size=1, ranks_per_node=1)  # fmt: skip
    return memory.peak / 2**30


def summarise(steps: list[dict], setting: Setting) -> tuple[list[float], float, float, float]:
    """From each step's ``seconds``, ``tokens`` and ``flops``: the tokens/s of each timed window, the FLOP/s of the
    median window, the compile time (the warm-up steps' excess over as many timed steps) and the mean tokens per
    timed step."""
    if len(steps) < setting.steps:
        raise RuntimeError(f"{len(steps)} steps timed, {setting.steps} expected")
    timed = steps[setting.warmup : setting.steps]
    windows = [timed[i * setting.window : (i + 1) * setting.window] for i in range(setting.repeats)]
    seconds = [sum(s["seconds"] for s in window) for window in windows]
    rates = [sum(s["tokens"] for s in window) / t for window, t in zip(windows, seconds, strict=True)]
    median = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
    flops = sum(s["flops"] for s in windows[median]) / seconds[median]
    step_seconds = sum(seconds) / len(timed)
    compile_seconds = sum(s["seconds"] for s in steps[: setting.warmup]) - setting.warmup * step_seconds
    return rates, flops, max(compile_seconds, 0.0), float(np.mean([s["tokens"] for s in timed]))


_BUILT = re.compile(r"\bloss (\S+), activation checkpointing (\S+), (.+?)\s*$", re.MULTILINE)


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
    command = [__file__, "--run-job", str(job.run.job), "--compile-backend", run.compile_backend]
    if _run_worker(command, distributed=True, out=out, setting=run.setting, timeout=timeout) != 0:
        return None
    records = [json.loads(line) for line in job.run.metrics.read_text().splitlines()]
    steps = []
    for record in sorted((r for r in records if "tokens_per_second" in r), key=lambda r: r["step"]):
        seconds = record["tokens"] / record["tokens_per_second"]
        steps.append({"seconds": seconds, "tokens": record["tokens"], "flops": record["mfu"] * seconds})
    summary = json.loads(job.run.summary.read_text())
    return steps, _settings_of(run, (out / "worker.log").read_text(errors="replace"), summary), \
        summary["peak_memory_mb"] / 1024, []  # fmt: skip


def _settings_of(run: Run, log: str, summary: dict) -> dict[str, str]:
    """The attention, loss, compilation and checkpointing a vectorlm run used, as it recorded them."""
    built = _BUILT.findall(log)
    loss, checkpointing, compiled = built[-1] if built else ("?", "?", "?")
    names = {"not compiled": "none", "decoder blocks and loss compiled": f"blocks + loss ({run.compile_backend})"}
    return {"attention": summary.get("attention") or "?", "loss": loss, "compile": names.get(compiled, compiled),
            "checkpointing": checkpointing}  # fmt: skip


def _attempt_hf(run: Run, baseline: Baseline, *, model_dir: Path, out: Path, micro_batch: int, checkpointing: bool,
                timeout: float):  # fmt: skip
    spec = {"model": str(model_dir), "packed": str(run.packed), "output_dir": str(out / "hf"),
            "result": str(out / "result.json"), "micro_batch": micro_batch, "global_rows": run.setting.global_rows,
            "steps": run.setting.steps, "lr": run.train_keys["lr"], "gradient_checkpointing": checkpointing,
            "liger": baseline.liger, "compile": baseline.compile, "compile_backend": run.compile_backend}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    command = [str(Path(__file__).with_name("hf_baseline.py")), str(out / "spec.json")]
    if _run_worker(command, distributed=False, out=out, setting=run.setting, timeout=timeout) != 0:
        return None
    result = json.loads((out / "result.json").read_text())
    return result["steps"], result["settings"], result["peak_memory_mb"] / 1024, result["notes"]


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


CPU_NOTE = ("On CPU the numbers only show that the benchmark runs, not how fast anything is: the compiled rows use "
            "aot_eager (traced, not code-generated), Liger is left out (it needs a GPU), and both trainers compute in "
            "fp32 where the CPU has no native bf16. MFU against the data sheet is n/a; against the measured peak it is "
            "against an fp32 matmul of 512 x 512.")  # fmt: skip
TARGETS = {"mfu": 0.5, "ratio": 1.5}  # of vectorlm's best row at 1B / 4k on one H100 (issue 23)


def format_report(rows: list[Row], *, run: Run, info: dict, data: dict, command: str, seconds: float) -> str:
    """The results as Markdown: how they were measured, then per model a table and the headline comparison."""
    setting = run.setting
    device = (f"{info['gpu']} ({info['memory_gib']:.0f} GiB), CUDA {info['cuda']}" if info["gpu"]
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, gloo)")  # fmt: skip
    versions = ", ".join(f"{name} {info[name] or 'not installed'}"
                         for name in ("torch", "transformers", "accelerate", "liger-kernel"))  # fmt: skip
    today = datetime.now(timezone.utc).date()
    method = (
        f"Rows of {setting.seq_len:,} tokens, {setting.global_rows} rows per optimizer step on every row. Each row "
        f"is one process: {setting.warmup} warm-up steps, then {setting.repeats} timed windows of {setting.window} "
        "steps; tokens/s is the median window's, spread (max - min) / median over the windows, compile s the warm-up "
        "steps' time beyond as many timed steps, row s the process's whole time (start-up and out-of-memory retries "
        f"included). Documents: random token ids, lengths log-normal (median {setting.median_length:g}, sigma "
        f"{DOCUMENTS['sigma']}, clipped to [{DOCUMENTS['min_length']}, {setting.seq_len}]): {data['documents']:,} "
        f"training documents, median {data['median']:.0f}, mean {data['mean']:.0f}, p99 {data['p99']:.0f} tokens, "
        f"packed into {data['rows']} rows ({data['fill']:.1%} full). bf16 mixed precision (fp32 master weights), "
        f"fused AdamW. Compiled with {run.compile_backend}. MFU: vectorlm.train.metrics.training_flops per step (one "
        f"formula for every row) over the data sheet's bf16 peak ({_tflops(info['nominal_peak'])}) and over a matmul "
        f"peak measured now ({_tflops(info['measured_peak'])}, metrics.measured_matmul_peak). Peak memory: "
        f"{'torch.cuda.max_memory_allocated' if info['gpu'] else 'resident set size'}; estimate: what rule estimate "
        "traces for the row's settings on one rank (vectorlm.estimate.memory, without its allowance for the CUDA "
        "context and fragmentation, which max_memory_allocated does not see either), for vectorlm's rows."
    )  # fmt: skip
    lines = [f"# Training throughput: vectorlm against the HF Trainer, one {info['gpu'] or 'CPU process'}", "",
             f"    {command}", "", f"{today}; {device}; {versions}, Python {info['python']}; {seconds:.0f} s in all.",
             "", method]  # fmt: skip
    for model in dict.fromkeys(r.model for r in rows):
        lines += ["", f"## {MODEL_NAMES[model]} shape ({num_parameters(SHAPES[model]):,} parameters)", ""]
        lines += _table([r for r in rows if r.model == model], info)
        lines += ["", *_headline([r for r in rows if r.model == model], info, gpu=setting.device == "cuda")]
    if setting.device == "cpu":
        lines += ["", CPU_NOTE]
    return "\n".join(lines) + "\n"


COLUMNS = ["configuration", "attention", "loss", "compile", "checkpointing", "micro-batch", "tokens/step",
           "tokens/s", "spread", "MFU (data sheet)", "MFU (measured peak)", "compile s", "row s", "peak GiB",
           "estimate GiB", "vs best HF", "notes"]  # fmt: skip


def _tflops(flops: float | None) -> str:
    if not flops:
        return "n/a"
    return f"{flops / 1e12:,.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def _mfu(row: Row, peak: float | None) -> str:
    return f"{row.flops_per_second / peak:.1%}" if peak and row.flops_per_second else "n/a"


def _table(rows: list[Row], info: dict) -> list[str]:
    best = _best(rows, baseline=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in sorted(rows, key=lambda r: (r.config in BASELINES, [*CONFIGS, *BASELINES].index(r.config))):
        measured = r.tokens_per_second is not None
        cells = [
            r.label,
            *(r.settings.get(key, "-") for key in ("attention", "loss", "compile", "checkpointing")),
            r.micro_batch or "-",
            f"{r.tokens_per_step:,.0f}" if measured else "-",
            f"{r.tokens_per_second:,.0f}" if measured else "-",
            f"{r.spread:.1%}" if measured else "-",
            _mfu(r, info["nominal_peak"]),
            _mfu(r, info["measured_peak"]),
            f"{r.compile_seconds:.0f}" if measured else "-",
            f"{r.seconds:.0f}" if r.seconds else "-",
            f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib else "-",
            f"{r.estimated_gib:.3g}" if r.estimated_gib else "-",
            f"{r.tokens_per_second / best.tokens_per_second:.2f}x" if best and measured else "-",
            "; ".join(r.notes),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _best(rows: list[Row], *, baseline: bool) -> Row | None:
    measured = [r for r in rows if (r.config in BASELINES) == baseline and r.tokens_per_second]
    return max(measured, key=lambda r: r.tokens_per_second, default=None)


def _headline(rows: list[Row], info: dict, *, gpu: bool) -> list[str]:
    """vectorlm's fastest row and the HF Trainer's side by side, with the issue's targets."""
    ours, theirs = _best(rows, baseline=False), _best(rows, baseline=True)
    if ours is None or theirs is None:
        return ["No headline: vectorlm or the HF Trainer has no measured row."]
    ratio = ours.tokens_per_second / theirs.tokens_per_second
    lines = [
        f"| fastest of each | {ours.label} | {theirs.label} | target |",
        "|---|--:|--:|--:|",
        f"| tokens/s | {ours.tokens_per_second:,.0f} | {theirs.tokens_per_second:,.0f} | |",
        (f"| MFU (data sheet) | {_mfu(ours, info['nominal_peak'])} | {_mfu(theirs, info['nominal_peak'])} | "
         f">= {TARGETS['mfu']:.0%} (vectorlm) |"),
        f"| MFU (measured peak) | {_mfu(ours, info['measured_peak'])} | {_mfu(theirs, info['measured_peak'])} | |",
        f"| ratio | {ratio:.2f}x | 1.00x | >= {TARGETS['ratio']:.1f}x |",
        "",
    ]  # fmt: skip
    if not gpu:
        return [*lines, "The targets are for one H100 at 1B / 4k; on CPU nothing is compared with them."]
    mfu = ours.flops_per_second / info["nominal_peak"] if info["nominal_peak"] else None
    verdicts = [f"ratio {ratio:.2f}x: {'met' if ratio >= TARGETS['ratio'] else 'NOT met'}"]
    verdicts.insert(0, f"MFU {mfu:.1%}: {'met' if mfu >= TARGETS['mfu'] else 'NOT met'}" if mfu else "MFU: n/a")
    return [*lines, f"Targets: {'; '.join(verdicts)}."]


# -------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU: checks the script")
    parser.add_argument("--models", help="comma-separated, of: 1b, 3b (default 1b; --tiny: tiny)")
    names = ", ".join([*CONFIGS, *BASELINES])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, in the order to run, of: {names} (default %(default)s)")  # fmt: skip
    parser.add_argument("--window", type=int, help="steps per timed window (default 20)")
    parser.add_argument("--budget", type=float, help="seconds for everything (default 480; --tiny: 170)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; --tiny: aot_eager)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/DATE-throughput-GPU.md)")
    parser.add_argument("--run-job", help=argparse.SUPPRESS)  # a vectorlm row: this script in a process of its own
    args = parser.parse_args()
    setting = TINY if args.tiny else FULL
    backend = args.compile_backend or setting.compile_backend
    if args.run_job:
        return run_vectorlm_job(args.run_job, compile_backend=backend)
    if args.window is not None:
        if args.window < 1:
            parser.error("--window must be at least 1")
        setting = replace(setting, window=args.window)
    start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so that workers are ended too
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of packing and saving, before tqdm is imported
    models = args.models.split(",") if args.models else list(setting.models)
    configs = args.configs.split(",")
    unknown = [m for m in models if m not in SHAPES] + [c for c in configs if c not in CONFIGS and c not in BASELINES]
    if unknown:
        parser.error(f"unknown model or configuration: {', '.join(unknown)}")
    info = device_info(gpu=not args.tiny)
    if not args.tiny and info["gpu"] is None:
        sys.exit("no CUDA GPU: run with --tiny to check the script on CPU")
    budget = args.budget or setting.budget
    biggest = max(num_parameters(SHAPES[m]) for m in models)
    with tempfile.TemporaryDirectory(prefix="vectorlm-bench-", dir=scratch_root(4 * biggest)) as scratch:
        scratch = Path(scratch)
        run = Run(setting, scratch, scratch / "data" / "packed", start + budget, 0.45 * budget, info["memory_gib"],
                  backend)  # fmt: skip
        data = make_data(scratch / "data", setting=setting, num_train_rows=setting.steps * setting.global_rows,
                         vocab_size=min(SHAPES[m]["vocab_size"] for m in models))  # fmt: skip
        print(f"bench: data ready after {time.monotonic() - start:.0f} s", file=sys.stderr)
        rows = bench_models(run, models, configs)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    report = format_report(rows, run=run, info=info, data=data, command=command.strip(),
                           seconds=time.monotonic() - start)  # fmt: skip
    print(report)
    today = datetime.now(timezone.utc).date()
    output = args.output or REPO / "bench" / "results" / f"{today}-throughput-{gpu_slug(info)}.md"
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
            rows.append(measure(run, model=model, model_dir=model_dir, config=config))
            print(f"bench: {rows[-1].seconds or 0:.0f} s: {rows[-1]}", file=sys.stderr)
        shutil.rmtree(model_dir)
        previous = time.monotonic() - begin
    return rows


if __name__ == "__main__":
    main()
