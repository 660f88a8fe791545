"""The baseline of bench/throughput.py: the Hugging Face Trainer on the documents of vectorlm's packed rows.

    python bench/hf_baseline.py SPEC.json       # started by bench/throughput.py, one process per row

``transformers.Trainer`` (accelerate underneath) as a user sets it up: ``bf16=True``, sdpa attention,
``optim="adamw_torch_fused"`` and padding-free packing: ``DataCollatorWithFlattening`` concatenates the documents of a
micro-batch's rows into one sequence whose ``position_ids`` restart at every document. At its best (the spec's
``liger`` and ``compile``), also ``use_liger_kernel`` (Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy;
GPU only) and ``torch_compile``, which accelerate applies to each decoder block with dynamic shapes (its regional
compilation, ``ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION``): the sequences change length with every micro-batch, and
a whole-model compile would compile everything twice (first static, then dynamic) and trace the step timer's hook.

A callback times each optimizer step after a device synchronisation and counts the real tokens and FLOPs of its
micro-batches (vectorlm's formula, :mod:`vectorlm.train.metrics`), so that they compare with vectorlm's rows. Writes
``{"steps": [{"seconds", "tokens", "flops"}, ...], "settings", "notes", "peak_memory_mb"}`` to the spec's ``result``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vectorlm.train.metrics import TrainingFlops, peak_memory_mb, training_flops
from vectorlm.train.model import computes_bf16_natively


class FlatteningCounter:
    """``DataCollatorWithFlattening`` over the documents of packed rows, counting the tokens and squared document
    lengths of each micro-batch when the model runs it: the Trainer collates a step's micro-batches ahead of them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.flatten = DataCollatorWithFlattening()
        self.pending: list[tuple[int, int]] = []  # of collated micro-batches the model has not run yet
        self.tokens = self.squared_lengths = 0  # of those it ran since the last take()
        model.register_forward_pre_hook(self._count)

    def __call__(self, rows: list[list[np.ndarray]]) -> dict:
        documents = [document for row in rows for document in row]
        self.pending.append((sum(len(d) for d in documents), sum(len(d) ** 2 for d in documents)))
        return self.flatten([{"input_ids": d.tolist()} for d in documents])

    def _count(self, module, args) -> None:
        tokens, squared_lengths = self.pending.pop(0)
        self.tokens += tokens
        self.squared_lengths += squared_lengths

    def take(self) -> tuple[int, int]:
        counts = self.tokens, self.squared_lengths
        self.tokens = self.squared_lengths = 0
        return counts


class StepTimer(TrainerCallback):
    """Seconds, tokens and FLOPs of every optimizer step."""

    def __init__(self, counter: FlatteningCounter, *, flops: TrainingFlops, device: torch.device) -> None:
        self.counter, self.flops, self.device = counter, flops, device
        self.records: list[dict] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.last = self._now()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        now = self._now()
        (tokens, squared_lengths), seconds, self.last = self.counter.take(), now - self.last, now
        self.records.append({"seconds": seconds, "tokens": tokens, "flops": self.flops(tokens, squared_lengths)})


def training_arguments(spec: dict, *, device: torch.device, bf16: bool, liger: bool) -> TrainingArguments:
    """The Trainer's settings: vectorlm's optimizer, schedule and clipping; nothing written but the result."""
    micro_batch = spec["micro_batch"]
    compile_options = (
        {"torch_compile": True, "torch_compile_backend": spec["compile_backend"]} if spec["compile"] else {}
    )
    return TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=spec["global_rows"] // micro_batch, max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, bf16=bf16, optim="adamw_torch_fused", gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", eval_strategy="no",
        logging_steps=spec["steps"], report_to="none", dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=device.type == "cpu", seed=0, disable_tqdm=True, use_liger_kernel=liger, **compile_options,
    )  # fmt: skip


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    notes = []
    liger = spec["liger"] and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if spec["liger"] and not liger:
        notes.append("without Liger: " + ("it needs a CUDA GPU" if device.type != "cuda" else
                                          "liger-kernel is not installed (bash bench/fetch_wheels.sh)"))  # fmt: skip
    bf16 = computes_bf16_natively(device)  # as vectorlm, which computes in fp32 on a CPU without native bf16
    if not bf16:
        notes.append("fp32: this CPU has no native bf16")
    if spec["compile"]:  # read by accelerate when the Trainer creates its Accelerator
        os.environ.update(ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION="1", ACCELERATE_DYNAMO_USE_DYNAMIC="1")
    rows = datasets.load_from_disk(spec["packed"])["train"].with_format("numpy")
    documents = [np.split(row["input_ids"], np.flatnonzero(row["position_ids"] == 0)[1:]) for row in rows]
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    counter = FlatteningCounter(model)
    timer = StepTimer(counter, flops=training_flops(model), device=device)
    args = training_arguments(spec, device=device, bf16=bf16, liger=liger)
    trainer = Trainer(model=model, args=args, train_dataset=documents, data_collator=counter, callbacks=[timer])
    print(f"bench: HF Trainer on {args.device}, micro-batch {spec['micro_batch']} rows, Liger {liger}, compiled "
          f"{spec['compile']}", flush=True)  # fmt: skip
    trainer.train()
    settings = {
        "attention": model.config._attn_implementation,
        "loss": "Liger fused linear CE" if liger else "transformers' (fp32 logits)",
        "compile": f"blocks, regional ({spec['compile_backend']}, dynamic)" if spec["compile"] else "none",
        "checkpointing": "full" if spec["gradient_checkpointing"] else "none",
    }
    if spec["gradient_checkpointing"]:
        notes.append("gradient checkpointing: one micro-batch did not fit without")
    result = {"steps": timer.records, "settings": settings, "notes": notes, "peak_memory_mb": peak_memory_mb(device)}
    Path(spec["result"]).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
