"""The estimate as people read it: a short table for the log, the error that stops a run that will not fit, and the
run's report (standard library only: the report reads it)."""

from __future__ import annotations

from typing import Any

GiB = 2**30

# (key in estimate.json's memory, what the row says)
MEMORY_ROWS = (
    ("parameters", "parameter shard (fp32 master weights; a LoRA base in bf16)"),
    ("gradients", "gradient shards held at the peak (fp32)"),
    ("optimizer", "optimizer state (AdamW moments, fp32)"),
    ("gathered", "gathered blocks in flight (bf16, all-gather prefetch)"),
    ("reducing", "gradients in reduction (unsharded, reduce-scatter)"),
    ("activations", "activations (saved for backward)"),
    ("temporaries", "loss logits and other temporaries"),
    ("allowance", "allowance: CUDA context, NCCL buffers, fragmentation"),
)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GiB:,.1f} GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def format_estimate(result: dict[str, Any]) -> list[str]:
    """The estimate as a Markdown table and a few lines after it."""
    memory, target, settings = result["memory"], result["target"], result["settings"]
    gpus = f"{target['world_size']} x {target['gpu'] or 'rank (no GPU type: estimate.gpu)'}"
    head = (f"Estimate: {gpus} on {target['num_nodes']} node(s), micro-batch {settings['micro_batch_size']} x "
            f"{settings['max_seq_len']} tokens, checkpointing {settings['activation_checkpointing']}, "
            f"{'LoRA' if settings['lora'] else 'full fine-tuning'}, {settings['sharding']} sharding")  # fmt: skip
    lines = [head, "", "| per GPU | memory |", "|---|--:|"]
    lines += [f"| {label} | {_gib(memory.get(key))} |" for key, label in MEMORY_ROWS]
    verdict = {None: "no GPU memory to compare with", True: "fits", False: "does NOT fit"}[memory["fits"]]
    lines.append(f"| **peak** | **{_gib(memory['peak'])}** of {_gib(memory['gpu_memory'])} ({verdict}) |")
    per_gpu = result["tokens_per_second_per_gpu"]
    speed = f", {per_gpu:,.0f} tokens/s per GPU." if per_gpu else " (no GPU type: set estimate.gpu)."
    adapter = f", the adapter {_gib(result['disk']['hf_adapter'])}" if settings["lora"] else ""
    steps = result["steps"] if result["steps"] is not None else "n/a"
    lines += [
        "",
        f"Activations when the backward pass starts: {_gib(memory.get('forward_activations'))} ({memory['traced']}).",
        (
            f"Training FLOPs per token: {result['flops_per_token']:.3g}; {result['tokens_per_step']:,.0f} tokens per step, "
            f"{steps} steps (from the {result['data']})."
        ),
        (
            f"At {result['mfu']:.0%} MFU: {_duration(result['seconds_per_step'])} per step, "
            f"{_duration(result['seconds'])} in all{speed}"
        ),
        (
            f"On disk: a checkpoint {_gib(result['disk']['checkpoint'])}, the exported model "
            f"{_gib(result['disk']['hf_model'])}{adapter}."
        ),
    ]
    if result["largest_micro_batch_size"]:
        lines.append(f"Largest train.micro_batch_size that fits: {result['largest_micro_batch_size']}.")
    elif memory["fits"] is False:
        lines.append("No train.micro_batch_size fits, not even one row of max_seq_len tokens, with these settings.")
    for lever in result["levers"]:
        lines.append(f"- {lever['change']}: peak {_gib(lever['peak'])}{' (fits)' if lever['fits'] else ''}")
    return lines


def does_not_fit(result: dict[str, Any]) -> str:
    """The message of a run that will not fit: the table, the levers, and the key that makes it a warning."""
    first = (
        f"estimate: the training run needs {_gib(result['memory']['peak'])} per GPU, more than the "
        f"{_gib(result['memory']['gpu_memory'])} of a {result['target']['gpu'] or 'GPU'} (estimate.gpu_memory); "
        "train was not queued. What would make it fit (each change alone):"
    )
    last = "To queue it anyway (the estimate may be wrong for your setup: docs/estimate.md), set estimate.check: warn."
    return "\n".join([first, *format_estimate(result), last])
