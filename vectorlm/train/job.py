"""A training job: everything its ranks need, written by the train stage as YAML (``{output_dir}/train/job.yaml``)
and read by every rank; and what can be checked of it before any rank starts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vectorlm.config import Config, ConfigError, DpoSettings, LoraSettings, TrainConfig, to_plain
from vectorlm.hub.meta_model import build_empty_model
from vectorlm.packed import STATS_FILE
from vectorlm.run_dir import RunDir
from vectorlm.train.lora import check_targets


@dataclass(frozen=True)
class TrainJob:
    """The base model, the packed data, the experiment's ``output_dir`` and the settings of one training run."""

    model: str
    packed: str
    output_dir: str
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    trust_remote_code: bool = Config.trust_remote_code  # the schema's default
    dpo: DpoSettings = field(default_factory=DpoSettings)
    reference: str | None = None  # the reference model's log-probabilities of the packed rows (train.objective dpo)

    @property
    def run(self) -> RunDir:
        return RunDir(self.output_dir)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(to_plain(self), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        raw = yaml.safe_load(Path(path).read_text())
        return cls(**{**raw, "train": TrainConfig(**raw["train"]), "lora": LoraSettings(**raw.get("lora", {})),
                      "dpo": DpoSettings(**raw.get("dpo", {}))})  # fmt: skip


def check_job(job: TrainJob, *, ranks: int) -> None:
    """What would fail on every rank, checked once before any starts: the global batch divides over ``ranks`` and is
    no larger than the packed training rows, and each of ``lora.target_modules`` names layers of the model (built on
    the meta device: no weights are read).

    Raises:
        ConfigError: naming the config key, and for LoRA targets the model's layer names.
    """
    job.train.grad_accumulation_steps(ranks)
    stats = Path(job.packed) / STATS_FILE
    rows = json.loads(stats.read_text())["train"]["rows"] if stats.is_file() else None
    if rows is not None and rows < job.train.global_batch_size:
        raise ConfigError(f"train.global_batch_size ({job.train.global_batch_size}) is more than the {rows} packed "
                          f"training rows ({stats}): lower it, or add data")  # fmt: skip
    if job.lora.enabled:
        check_targets(build_empty_model(job.model, trust_remote_code=job.trust_remote_code), job.lora)
