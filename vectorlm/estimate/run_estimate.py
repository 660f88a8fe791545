"""Will a training run fit, and how long will it take: per-GPU peak memory (vectorlm/estimate/memory.py), the FLOPs,
steps and time of the run, and its checkpoint and exported model on disk, from the model's ``config.json`` alone.

The allowance for what tracing cannot see (CUDA context, NCCL's buffers, the caching allocator's fragmentation) and
the default MFU are stated in docs/estimate.md, with the measurements behind them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vectorlm.config import ConfigError, ExportConfig, LoraSettings, TrainConfig, parse_size
from vectorlm.estimate.memory import StepMemory, step_memory
from vectorlm.estimate.table import GiB
from vectorlm.train.metrics import PEAK_BF16_FLOPS, gpu_model_of
from vectorlm.train.placement import check_train_resources

log = logging.getLogger(__name__)

# Memory of each GPU of PEAK_BF16_FLOPS as the driver reports it (nvidia-smi's total, MiB); cards sold with two
# sizes (A100 40/80 GB, GH200 96/144 GB) are not listed: give estimate.gpu_memory for them.
GPU_MEMORY_MIB = {
    "B200": 183_359, "GB200": 189_471, "H200": 143_771, "H200 NVL": 143_771, "H100": 81_559, "H100 NVL": 95_830,
    "H100 PCIe": 81_559, "H100 80GB HBM2e": 81_559, "H800": 81_559, "H800 PCIe": 81_559, "H20": 97_871,
    "A800": 81_920, "A40": 46_068, "A30": 24_576, "A10": 23_028, "A10G": 23_028, "L40S": 46_068, "L40": 46_068,
    "L4": 23_034, "RTX 6000 Ada": 49_140, "RTX A6000": 49_140,
}  # fmt: skip

# What tracing cannot see, per GPU (docs/estimate.md): the CUDA context and the kernels' workspaces (cuBLAS, flash
# attention) plus NCCL's communication buffers as a fixed amount, and the caching allocator's fragmentation (memory
# reserved beyond what tensors use) as a share of the traced peak.
FIXED_ALLOWANCE = int(1.5 * GiB)
FRAGMENTATION = 0.10

# The MFU a run's time is predicted at unless estimate.mfu says otherwise: torchtitan's measured 5,762 tokens/s per
# H100 on Llama-3.1-8B (FSDP on 8 GPUs, 8,192-token rows, selective checkpointing), counted with our FLOPs
# (bench/results/2026-12-04-estimate-cpu.md), until bench/gpu.sh measures ours.
DEFAULT_MFU = 0.30


@dataclass(frozen=True)
class Target:
    """Where the run trains: ``world_size`` ranks (one per GPU), ``ranks_per_node`` on each node, GPUs of type ``gpu``
    (a name of PEAK_BF16_FLOPS, None for CPU ranks or an unknown GPU) with ``memory`` bytes each (None: unknown)."""

    world_size: int
    ranks_per_node: int
    gpu: str | None
    memory: int | None


def target_of(settings: dict[str, Any], *, world_size: int, ranks_per_node: int, gres: str | None) -> Target:
    """The :class:`Target` of the ``estimate`` section's ``settings`` and the train rule's resources: the GPU type is
    estimate.gpu, else the type that gres names (``gpu:h100:8``); its memory estimate.gpu_memory, else the type's."""
    gpu = settings.get("gpu")
    if gpu is None and gres and len(parts := str(gres).strip("'\"").split(":")) == 3:
        gpu = gpu_model_of(parts[1])
    elif gpu is not None:
        known = gpu_model_of(gpu)
        if known is None:
            raise ConfigError(f"estimate.gpu: unknown GPU {gpu!r}; known: {', '.join(PEAK_BF16_FLOPS)}")
        gpu = known
    memory = settings.get("gpu_memory")
    if memory is not None:
        memory = parse_size(memory, key="estimate.gpu_memory")
    elif gpu in GPU_MEMORY_MIB:
        memory = GPU_MEMORY_MIB[gpu] * 2**20
    elif gpu is not None:
        log.warning("estimate.gpu_memory: %s comes with more than one memory size; set it (e.g. 80GiB) for the fit "
                    "check", gpu)  # fmt: skip
    return Target(world_size, ranks_per_node, gpu, memory)


def allowance(traced_peak: int) -> int:
    return FIXED_ALLOWANCE + int(FRAGMENTATION * traced_peak)


def estimate_run(
    model_dir: str | Path,
    *,
    train: TrainConfig,
    lora: LoraSettings,
    export: ExportConfig,
    max_seq_len: int,
    target: Target,
    mfu: float | None = None,
    packed_stats: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The estimate of training the model in ``model_dir`` (its config.json) as configured on ``target``: memory per
    GPU, FLOPs and time, disk; ``packed_stats`` (packed/stats.json) gives the data's rows and documents when pack has
    run, else every row is taken as one document of ``max_seq_len`` tokens and the length as train.max_steps."""
    memory_of = _memory_of(model_dir, train=train, lora=lora, max_seq_len=max_seq_len, target=target,
                           trust_remote_code=trust_remote_code)  # fmt: skip
    try:
        memory, traced = memory_of(train)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 (a model the trace cannot run on fake tensors: the estimate says so, training goes on)
        log.warning("estimate: the training step could not be traced (%s: %s); no memory estimate, no fit check",
                    type(error).__name__, error)  # fmt: skip
        memory, traced = None, f"not traced: {type(error).__name__}: {error}"
    peak = _total(memory) if memory else None
    fits = None if target.memory is None or peak is None else peak <= target.memory
    result: dict[str, Any] = {
        "target": dataclasses.asdict(target) | {"num_nodes": target.world_size // target.ranks_per_node},
        "settings": {
            "micro_batch_size": train.micro_batch_size,
            "max_seq_len": max_seq_len,
            "activation_checkpointing": train.activation_checkpointing,
            "sharding": train.sharding,
            "lora": lora.enabled,
            "mixed_precision": train.mixed_precision,
            "loss": train.loss,
        },
        "memory": (dataclasses.asdict(memory) if memory else {})
        | {
            "traced_peak": memory.peak if memory else None,
            "allowance": allowance(memory.peak) if memory else None,
            "peak": peak,
            "gpu_memory": target.memory,
            "fits": fits,
            "traced": traced,
        },
        "largest_micro_batch_size": None,
        "levers": [],
    }
    if fits is False:
        result["largest_micro_batch_size"] = _largest_micro_batch(memory_of, train, target)
        result["levers"] = _levers(memory_of, train=train, lora=lora, target=target, peak=peak)
    timing = _time_and_disk(model_dir, train=train, lora=lora, export=export, max_seq_len=max_seq_len, target=target,
                            mfu=mfu, packed_stats=packed_stats, trust_remote_code=trust_remote_code)  # fmt: skip
    result.update(timing)
    return result


def _memory_of(model_dir, *, train, lora, max_seq_len, target, trust_remote_code):
    def memory_of(settings: TrainConfig, *, lora_settings: LoraSettings = lora, world_size: int | None = None):
        return step_memory(model_dir, train=settings, lora=lora_settings, max_seq_len=max_seq_len,
                           world_size=world_size or target.world_size, ranks_per_node=target.ranks_per_node,
                           trust_remote_code=trust_remote_code)  # fmt: skip

    return memory_of


def _total(memory: StepMemory) -> int:
    return memory.peak + allowance(memory.peak)


def _largest_micro_batch(memory_of, train: TrainConfig, target: Target) -> int | None:
    """The largest micro-batch below the configured one that fits and divides the global batch over the ranks (None:
    not even one row fits)."""
    rows_per_rank = train.global_batch_size // target.world_size
    for size in sorted((d for d in range(1, train.micro_batch_size) if rows_per_rank % d == 0), reverse=True):
        if _total(memory_of(dataclasses.replace(train, micro_batch_size=size))[0]) <= target.memory:
            return size
    return None


def _levers(memory_of, *, train: TrainConfig, lora: LoraSettings, target: Target, peak: int) -> list[dict[str, Any]]:
    """Each change of one setting that lowers the peak, with the peak it gives: checkpointing, LoRA, a micro-batch of
    one row, twice the GPUs, full or hybrid sharding instead of replicas, gradients reduced at every micro-step."""
    modes = ("none", "selective", "full")
    candidates: list[tuple[str, dict[str, Any]]] = [
        (
            f"train.activation_checkpointing: {mode}",
            {"settings": dataclasses.replace(train, activation_checkpointing=mode)},
        )
        for mode in modes[modes.index(train.activation_checkpointing) + 1 :]
    ]
    if not lora.enabled:
        lora_on = dataclasses.replace(lora, enabled=True)
        candidates.append(("lora.enabled: true", {"settings": train, "lora_settings": lora_on}))
    if train.micro_batch_size > 1:
        candidates.append(("train.micro_batch_size: 1", {"settings": dataclasses.replace(train, micro_batch_size=1)}))
    more = target.world_size * 2
    if train.global_batch_size % (train.micro_batch_size * more) == 0:
        candidates.append((f"{more} GPUs (resources: train tasks)", {"settings": train, "world_size": more}))
    if train.sharding != "full":
        candidates.append(("train.sharding: full", {"settings": dataclasses.replace(train, sharding="full")}))
    if train.sharding == "none" and target.world_size // target.ranks_per_node >= 2:
        candidates.append(("train.sharding: hybrid", {"settings": dataclasses.replace(train, sharding="hybrid")}))
    if train.defer_gradient_sync and train.grad_accumulation_steps(target.world_size) > 1:
        no_defer = dataclasses.replace(train, defer_gradient_sync=False)
        candidates.append(("train.defer_gradient_sync: false", {"settings": no_defer}))
    levers = []
    for change, kwargs in candidates:
        settings = kwargs.pop("settings")
        total = _total(memory_of(settings, **kwargs)[0])
        if total < peak:
            levers.append({"change": change, "peak": total, "fits": total <= target.memory})
    return levers


def _time_and_disk(model_dir, *, train, lora, export, max_seq_len, target, mfu, packed_stats, trust_remote_code):
    from vectorlm.hub.meta_model import build_empty_model
    from vectorlm.train.metrics import training_flops
    from vectorlm.train.model import count_parameters

    model = build_empty_model(model_dir, trust_remote_code=trust_remote_code)
    num_params = count_parameters(model)[0]
    dtype_bytes = _export_dtype_bytes(model_dir, export)
    if lora.enabled:  # adapters on the meta device, as peft makes them (no initial values drawn)
        from peft import get_peft_model

        from vectorlm.train.lora import peft_config

        model = get_peft_model(model, peft_config(lora, model))
    num_trainable = count_parameters(model)[1]
    train_rows = (packed_stats or {}).get("train", {})
    tokens_per_row = train_rows["tokens"] / train_rows["rows"] if train_rows.get("rows") else max_seq_len
    document_length = (train_rows["tokens"] / train_rows["chunks"]) if train_rows.get("chunks") else tokens_per_row
    tokens_per_step = train.global_batch_size * tokens_per_row
    flops_per_step = training_flops(model)(tokens_per_step, tokens_per_step * document_length)
    steps = train.max_steps
    if steps is None and train_rows.get("rows"):
        steps = math.ceil(train.num_epochs * (train_rows["rows"] // train.global_batch_size))
    mfu = DEFAULT_MFU if mfu is None else mfu
    peak_flops = PEAK_BF16_FLOPS.get(target.gpu) if target.gpu else None
    seconds_per_step = flops_per_step / (target.world_size * peak_flops * mfu) if peak_flops else None
    # fp32 weights (LoRA: the adapters only) and moments; the adapter is exported in fp32 (docs/config.md, export.dtype)
    checkpoint = 4 * (num_trainable if lora.enabled else num_params) + 2 * 4 * num_trainable  # fp32 weights, moments
    return {
        "parameters": num_params,
        "trainable_parameters": num_trainable,
        "flops_per_token": flops_per_step / tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "tokens": tokens_per_step * steps if steps else None,
        "data": "packed/stats.json" if train_rows else "config: every row one document of max_seq_len tokens",
        "mfu": mfu,
        "peak_flops": peak_flops,
        "seconds_per_step": seconds_per_step,
        "tokens_per_second_per_gpu": tokens_per_step / seconds_per_step / target.world_size
        if seconds_per_step
        else None,
        "seconds": seconds_per_step * steps if seconds_per_step and steps else None,
        "disk": {
            "checkpoint": checkpoint,
            "hf_model": num_params * dtype_bytes,
            "hf_adapter": 4 * num_trainable if lora.enabled else 0,
        },
    }


def _export_dtype_bytes(model_dir, export: ExportConfig) -> int:
    """Bytes per exported weight: export.dtype, or for auto the dtype the model's config.json declares (the base
    checkpoint's, which auto keeps; bf16 if it declares none)."""
    from vectorlm.hub.model_dir import read_model_config

    name = export.dtype
    if name == "auto":
        config = read_model_config(model_dir)
        name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return 4 if name == "float32" else 2


def write_estimate(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)


def estimate_stage(
    model_dir: str | Path,
    output: str | Path,
    *,
    train: TrainConfig,
    lora: LoraSettings,
    export: ExportConfig,
    settings: dict[str, Any],
    max_seq_len: int,
    resources: dict[str, Any],
    packed_stats: str | Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Rule estimate: the estimate of the run on the train rule's ``resources`` (tasks, nodes, gres: the placement
    training checks, vectorlm.train.placement) with the
    ``estimate`` section's ``settings``, logged as a table (a warning when it exceeds the GPU's memory: the workflow
    then stops before train, vectorlm.pipeline.preflight.check_fit) and written to ``output``."""
    from vectorlm.estimate.table import does_not_fit, format_estimate

    placement = check_train_resources(resources, train=train, threads=1)
    target = target_of(settings, world_size=placement.ranks, ranks_per_node=placement.ranks_per_node,
                       gres=resources.get("gres"))  # fmt: skip
    stats_path = Path(packed_stats) if packed_stats else None
    stats = json.loads(stats_path.read_text()) if stats_path and stats_path.is_file() else None
    result = estimate_run(model_dir, train=train, lora=lora, export=export, max_seq_len=max_seq_len, target=target,
                          mfu=settings.get("mfu"), packed_stats=stats, trust_remote_code=trust_remote_code)  # fmt: skip
    write_estimate(result, output)
    if result["memory"]["fits"] is False:
        log.warning("%s", does_not_fit(result))
    else:
        log.info("%s", "\n".join(format_estimate(result)))
    return result
