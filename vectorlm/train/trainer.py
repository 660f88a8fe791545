"""One rank's share of a training run (:class:`Trainer`, run by vectorlm/train/rank.py on every rank).

FSDP2 over all ranks; gradient accumulation with sharded gradients; the loss averaged over every loss token of the
global batch; clipping by the global gradient norm, and steps with a non-finite norm skipped; eval loss at intervals;
a metrics line per logged step; sharded checkpoints at intervals and at the end, written in the background; exact
resumption from the newest valid checkpoint; and on SIGTERM, SIGUSR1 or Ctrl-C a checkpoint at the next step
boundary (after which the rank exits with status 75).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import get_scheduler

from vectorlm.config import ConfigError, resolved_config, to_plain
from vectorlm.data.arrow import list_lengths
from vectorlm.data.loader import BatchShape, DataPosition, GlobalBatchSampler
from vectorlm.data.prefetch import Prefetcher
from vectorlm.hub.model_dir import check_model_dir
from vectorlm.log import format_duration
from vectorlm.packed import STATS_FILE
from vectorlm.train.attention import check_pairs_apart, keeps_documents_apart, model_and_attention
from vectorlm.train.checkpoint import Checkpointer, load_checkpoint
from vectorlm.train.distributed import DistributedEnv, all_reduce_sum
from vectorlm.train.job import TrainJob
from vectorlm.train.metrics import StepMeter, peak_flops, peak_memory_mb, training_flops
from vectorlm.train.metrics_log import MetricsLog, read_metrics
from vectorlm.train.model import build_model, computed_settings, count_parameters
from vectorlm.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from vectorlm.train.preference import PreferenceObjective
from vectorlm.train.resume import StartPlan, repeats_exactly, run_fingerprint
from vectorlm.train.step import TokenObjective, build_optimizer, evaluate, to_device, train_step
from vectorlm.train.tracking import Trackers
from vectorlm.train.train_state import TrainState

log = logging.getLogger(__name__)


class NonFiniteGradients(RuntimeError):
    """Too many steps in a row had a NaN or Inf gradient norm."""


class Trainer:
    """One rank's share of a training run: set-up, the loop, checkpoints."""

    def __init__(self, job: TrainJob, env: DistributedEnv) -> None:
        self.job, self.env, self.cfg = job, env, job.train
        check_model_dir(job.model)
        self.accumulation = self.cfg.grad_accumulation_steps(env.world_size)
        self.packed = datasets.load_from_disk(job.packed)
        stats = json.loads((Path(job.packed) / STATS_FILE).read_text())
        self.objective = PreferenceObjective(job.dpo) if self.cfg.objective == "dpo" else TokenObjective()
        self.reference, self.reference_stats = load_reference(job, stats)
        packing, max_seq_len = stats.get("packing", True), stats.get("max_seq_len")
        lengths = None if packing else list_lengths(self.packed["train"])
        self.packing = packing
        # One shape for every micro-batch (compiled blocks and loss then trace one graph for training, one for
        # evaluation): packed rows are nearly full anyway; unpacked rows of any length only when compiled.
        static = max_seq_len is not None and (packing or self.cfg.compile)
        self.shape = BatchShape(self.cfg.micro_batch_size, max_seq_len) if static else None
        self.sampler = GlobalBatchSampler(
            len(self.packed["train"]), global_batch_size=self.cfg.global_batch_size, seed=self.cfg.seed, lengths=lengths
        )
        self.max_steps = self.cfg.max_steps or math.ceil(self.cfg.num_epochs * self.sampler.steps_per_epoch)
        # Needed by the main rank only (it plans the start and writes train_state.json): the weights are read once.
        self.fingerprint = run_fingerprint(model_dir=job.model, packed_dir=job.packed, seed=self.cfg.seed,
                                           lora=job.lora) if env.is_main else {}  # fmt: skip
        self.position = DataPosition()  # after the last step trained
        self.eval_losses: dict[int, float] = {}
        self.final_eval_metrics: dict[str, float] = {}  # the objective's metrics of the last evaluation
        self.throughput: list[float] = []
        self.skipped_steps = 0  # before this run started (from the checkpoint)

    @property
    def settings(self) -> dict[str, Any]:
        """The train settings a checkpoint records (vectorlm/train/resume.py compares them), with the dpo section and
        the reference's digest for preference tuning: another beta or reference is another run."""
        settings = to_plain(self.cfg)
        if self.cfg.objective == "dpo":
            dpo = self.recorded_sections["dpo"]
            # The reference by the content of its log-probabilities: an edit of code that computes the same values
            # is the same run, as for the packed data (vectorlm/train/resume.py).
            settings["dpo"] = {**{k: v for k, v in dpo.items() if k != "reference_model"},
                               "reference": self.reference_stats.get("content_digest")}  # fmt: skip
        return settings

    @property
    def recorded_sections(self) -> dict[str, Any]:
        """The config sections this run's checkpoints and trackers record: train, lora, and for DPO the dpo settings
        it uses (simpo_gamma only for simpo, the reference model only with a reference)."""
        sections: dict[str, Any] = {"train": self.cfg, "lora": self.job.lora}
        if self.cfg.objective == "dpo":
            sections["dpo"] = self.job.dpo.in_use()
        return sections

    def build(self) -> None:
        """The sharded model (weights read from the base model), optimizer, schedule, data and checkpoint writer."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed + env.rank)
        model_class, self.attention, config = model_and_attention(self.job.model, cfg.attention, env.device,
                                                                  trust_remote_code=self.job.trust_remote_code)  # fmt: skip
        self.flatten = self.attention == "flash_attention_2"
        if self.objective.pairs:  # before any weight is read
            check_pairs_apart(model_class, config, self.attention)
        if self.packing and not keeps_documents_apart(model_class, config):  # before any weight is read
            raise ConfigError(f"data.packing: {model_class.__name__} with attention {self.attention} would let packed "
                              "documents see each other (its attention masks ignore the positions that mark them, or "
                              "its layers carry a recurrent state from one into the next); set data.packing: false")  # fmt: skip
        model, mesh = build_model(self.job.model, env, train=computed_settings(cfg, env), lora=self.job.lora,
                                  attention=self.attention, trust_remote_code=self.job.trust_remote_code)  # fmt: skip
        self.num_params, self.num_trainable = count_parameters(model)
        self.model = model.train()
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = get_scheduler(
            cfg.scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=self.max_steps
        )
        self.flops = training_flops(model)
        self.peak_flops = peak_flops(env.device)
        self.meter = StepMeter(world_size=env.world_size, device=env.device, flops=self.flops, peak=self.peak_flops)
        self.prefetcher = Prefetcher(self.packed["train"], self.sampler, rank=env.rank, world_size=env.world_size,
                                     micro_batch_size=cfg.micro_batch_size, flatten=self.flatten, shape=self.shape,
                                     pin_memory=env.device.type == "cuda", pairs=self.objective.pairs,
                                     reference=self.reference and self.reference["train"])  # fmt: skip
        self.checkpointer = Checkpointer(
            group=env.checkpoint_group, asynchronous=cfg.async_checkpoint, device=env.device
        )
        log.info(
            "training %s (%s parameters, %s trainable, attention %s) on %d rank(s) of %s, %s sharding over mesh %s: "
            "%d steps of %d rows (%d per micro-batch x %d micro-steps x %d ranks), %d steps per epoch",
            self.job.model, f"{self.num_params:,}", f"{self.num_trainable:,}", self.attention, env.world_size,
            env.device.type, cfg.sharding,
            dict(zip(mesh.mesh_dim_names, mesh.shape)), self.max_steps,
            cfg.global_batch_size, cfg.micro_batch_size, self.accumulation, env.world_size,
            self.sampler.steps_per_epoch,
        )  # fmt: skip

    def load(self, plan: StartPlan) -> float:
        """Loads the planned checkpoint's model and optimizer state (and this rank's random number generators, on the
        same number of ranks); returns the seconds it took. Nothing else changes, so that a checkpoint that fails to
        load can be set aside and an older one loaded instead."""
        same_world = plan.state.world_size == self.env.world_size
        return load_checkpoint(Path(plan.checkpoint), model=self.model, optimizer=self.optimizer,
                               restore_rng=same_world, trainable_only=self.job.lora.enabled,
                               group=self.env.checkpoint_group)  # fmt: skip

    def restore(self, plan: StartPlan, *, seconds: float = 0.0) -> int:
        """Continues from the planned checkpoint, whose state :meth:`load` loaded (in ``seconds``): the data position,
        the schedule, the evaluations and the records; returns the last step it covers (0 for a fresh start)."""
        if plan.action == "fresh":
            self.open_records(None)
            return 0
        state = plan.state
        same_world = state.world_size == self.env.world_size
        self.sampler.load_state_dict(dataclasses.asdict(state.data))
        self.position = dataclasses.replace(state.data)
        with warnings.catch_warnings():  # the schedule is replayed without optimizer steps on purpose
            warnings.simplefilter("ignore")
            for _ in range(state.step):
                self.scheduler.step()
        self.eval_losses = dict(state.eval_losses)
        self.skipped_steps = state.skipped_steps
        self.open_records(state)
        log.info("resumed from %s: step %d, epoch %d, row %d, loaded in %.2f s%s", plan.checkpoint, state.step,
                 state.data.epoch, state.data.offset, seconds,
                 "" if same_world else f" (world size {state.world_size} -> {self.env.world_size}: data position "
                 "kept, random number generators not restored)")  # fmt: skip
        return state.step

    def open_records(self, state: TrainState | None) -> None:
        """The metrics file and, on the main rank, the trackers of ``train.report_to``, continuing the tracked runs
        of the checkpoint's ``state`` (None: a fresh start)."""
        exact = state is None or repeats_exactly(state, train=self.settings, world_size=self.env.world_size)
        if not exact:
            log.info("the steps after %d are computed differently from the interrupted attempt (other settings or "
                     "ranks): their records are written anew, and trackers start new runs", state.step)  # fmt: skip
        self.metrics = MetricsLog(self.job.run.metrics, enabled=self.env.is_main, fresh=state is None,
                                  truncate_after=None if exact else state.step)  # fmt: skip
        self.trackers = None
        if self.env.is_main and self.cfg.report_to:
            config = resolved_config(self.recorded_sections, upstream=self.job.packed)
            self.trackers = Trackers(self.cfg.report_to, run=self.job.run, config=config,
                                     run_ids=state.tracking if state and exact else {},
                                     earlier=read_metrics(self.job.run.metrics) if state else [])  # fmt: skip
            self.metrics.sinks.append(self.trackers.log)

    def evaluate(self, step: int) -> None:
        with self.meter.paused():
            result = evaluate(self.model, self.packed["eval"], env=self.env, cfg=self.cfg, flatten=self.flatten,
                              shape=self.shape, objective=self.objective,
                              reference=self.reference and self.reference["eval"])  # fmt: skip
        self.eval_losses[step] = result["eval_loss"]
        self.final_eval_metrics = {k: v for k, v in result.items() if k != "eval_loss"}
        log.info("step %d | %s", step, " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        self.metrics.write({"step": step, **result})

    def step(self, step: int) -> None:
        env = self.env
        batches, self.position = self.prefetcher.next()
        # Counted on the CPU when collating and summed over a CPU group: no wait for the device.
        window_pairs = self.flops.window_pairs(np.concatenate([b["document_lengths"] for b in batches]))
        tokens, count, squared, *window_pairs = all_reduce_sum(
            sum(b["num_tokens"] for b in batches), sum(b[self.objective.count] for b in batches),
            sum(b["sum_squared_lengths"] for b in batches), *window_pairs, device=torch.device("cpu"),
            group=env.cpu_group,
        )  # fmt: skip
        micro_batches = [to_device(b, env.device) for b in batches]
        output = train_step(self.model, self.optimizer, self.scheduler, micro_batches, objective=self.objective,
                            loss_scale=env.world_size / max(count, 1), cfg=self.cfg)  # fmt: skip
        self.meter.add(output, tokens=tokens, sum_squared_lengths=squared, window_pairs=window_pairs)
        if step % self.cfg.log_every == 0 or step == self.max_steps:
            record = {"step": step, **self.meter.read(output, count, metrics=self.objective.metrics),
                      "epoch": self.position.epoch,
                      "peak_memory_mb": peak_memory_mb(env.device)}  # fmt: skip
            record["skipped_steps"] += self.skipped_steps
            self.throughput.append(record["tokens_per_second"])
            log.info(_format(record, self.max_steps, eta=self.time_left(step)))
            self.metrics.write(record)
            if self.meter.longest_skip_run >= self.cfg.max_nonfinite_steps:
                raise NonFiniteGradients(
                    f"{self.meter.longest_skip_run} steps in a row (by step {step}) had a NaN or Inf gradient norm and "
                    f"were skipped (train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}): lower train.lr, check "
                    "the data, or resume from an earlier checkpoint"
                )

    def save(self, step: int, *, final: bool, wait: bool = False) -> Path:
        state = TrainState(
            step=step, world_size=self.env.world_size, data=dataclasses.replace(self.position),
            eval_losses=dict(self.eval_losses), final=final, fingerprint=self.fingerprint, train=self.settings,
            skipped_steps=self.total_skipped_steps(), tracking=self.trackers.run_ids if self.trackers else {},
            summary=self.summary(step) if final else None,
        )  # fmt: skip
        path = self.job.run.checkpoint(step)
        start = time.perf_counter()
        with self.meter.paused():
            self.checkpointer.save(
                path, model=self.model, optimizer=self.optimizer, train_state=state,
                settings=self.recorded_sections, upstream=self.job.packed,
                keep=self.cfg.keep_checkpoints, trainable_only=self.job.lora.enabled,
            )  # fmt: skip
            if wait:
                self.checkpointer.wait()
        background = self.cfg.async_checkpoint and not wait
        log.info("checkpoint of step %d: training held up %.2f s%s", step, time.perf_counter() - start,
                 ", the rest is written in the background" if background else "")  # fmt: skip
        return path

    def time_left(self, step: int) -> str:
        """The time the remaining steps will take at this run's pace so far (evaluations and saves included)."""
        start, first_step = self.started
        per_step = (time.monotonic() - start) / (step - first_step + 1)
        return format_duration(per_step * (self.max_steps - step))

    def total_skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient norm in the whole run, resumed parts included."""
        return self.skipped_steps + self.meter.total_skips()

    def summary(self, step: int) -> dict[str, Any]:
        return {
            "checkpoint": str(self.job.run.checkpoint(step)),
            "step": step,
            "initial_eval_loss": self.eval_losses[0],
            "final_eval_loss": self.eval_losses[step],
            "final_eval_metrics": self.final_eval_metrics,
            # The first steps include warm-up (allocation, kernel selection); the median is the steady state.
            "tokens_per_second": float(np.median(self.throughput)) if self.throughput else None,
            "world_size": self.env.world_size,
            "attention": self.attention,
            "parameters": self.num_params,
            "trainable_parameters": self.num_trainable,
            "skipped_steps": self.total_skipped_steps(),
            "peak_memory_mb": peak_memory_mb(self.env.device),
            "train_seconds": self.train_seconds,  # this attempt's, evaluations included
        }

    def fit(self, first_step: int, stop: StopRequest) -> bool:
        """Trains from ``first_step`` to the end; returns False when stopped early by a signal."""
        outcome = "failed"
        try:
            if first_step == 1:
                self.evaluate(0)
            self.meter.start()
            self.started = (time.monotonic(), first_step)
            for step in range(first_step, self.max_steps + 1):
                self.step(step)
                if step == self.max_steps or (self.cfg.eval_every and step % self.cfg.eval_every == 0):
                    self.evaluate(step)
                if step == self.max_steps:
                    # Once: the final checkpoint's summary and the run's summary.json say the same.
                    self.train_seconds = round(time.monotonic() - self.started[0], 3)
                    self.save(step, final=True, wait=True)
                    outcome = "finished"
                    return True
                stopping = stop.agreed(self.env.cpu_group)
                if stopping or (self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0):
                    self.save(step, final=False, wait=stopping)
                if stopping:
                    log.warning("received %s: saved a checkpoint at step %d; exiting with status %d, rerun to "
                                "continue", stop.signal_name or "a stop signal on another rank", step,
                                PREEMPTED_EXIT_CODE)  # fmt: skip
                    outcome = "stopped"
                    return False
            raise AssertionError("unreachable: the loop returns at max_steps")
        finally:  # on an error, possibly on this rank alone, no collective: only this rank's save is finished
            self.prefetcher.close()
            self.checkpointer.close(agree=sys.exc_info()[0] is None)
            if self.trackers:
                self.trackers.close(outcome)


def load_reference(job: TrainJob, stats: dict[str, Any]) -> tuple[datasets.DatasetDict | None, dict[str, Any]]:
    """The reference model's log-probabilities of the packed rows (rule reference_logprobs), checked to be of these
    rows (``stats``: the packed rows'), and their statistics; (None, {}) when the objective compares with no
    reference."""
    if job.train.objective != "dpo" or not job.dpo.uses_reference:
        return None, {}
    if job.reference is None:
        raise ConfigError(f"dpo.loss {job.dpo.loss} needs the reference model's log-probabilities (rule "
                          "reference_logprobs), and the job names none")  # fmt: skip
    reference_stats = json.loads((Path(job.reference) / STATS_FILE).read_text())
    recorded = reference_stats.get("packed_fingerprint")
    if recorded != stats.get("fingerprint"):
        raise ConfigError(f"the reference log-probabilities in {job.reference} were computed for other packed rows "
                          f"(fingerprint {recorded}) than {job.packed} ({stats.get('fingerprint')}): rerun rule "
                          "reference_logprobs")  # fmt: skip
    return datasets.load_from_disk(job.reference), reference_stats


def _format(record: dict[str, Any], max_steps: int, *, eta: str) -> str:
    mfu = f" | mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
    skipped = f" | skipped {record['skipped_steps']}" if record["skipped_steps"] else ""
    accuracy = f" | accuracy {record['rewards/accuracies']:.3f}" if "rewards/accuracies" in record else ""
    return (
        f"step {record['step']}/{max_steps} | loss {record['loss']:.4f}{accuracy} | lr {record['lr']:.3e} | "
        f"grad_norm {record['grad_norm']:.3f} | tokens/s {record['tokens_per_second']:,.0f}{mfu}{skipped} | "
        f"eta {eta}"
    )
