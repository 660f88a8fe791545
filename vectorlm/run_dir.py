"""Where an experiment's artifacts lie: the layout of its ``output_dir`` and of the ``cache_dir`` experiments share.

The workflow's rules declare these paths as their outputs, and the stages, the report, ``compare`` and the end-of-run
summary find what they read through them, so each is spelled once, here. (Inside an artifact, the stage that writes it
owns the names: a checkpoint's files and its ``.partial`` and ``.invalid`` siblings are vectorlm/train/checkpoint.py's,
for one.) Standard library only: the Snakefile uses it when it builds the DAG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Directory:
    """A directory of artifacts, named by its root (given as a string or a path)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class RunDir(_Directory):
    """An experiment's ``output_dir``: what each stage writes into it."""

    @property
    def name(self) -> str:
        """The experiment's name, as trackers show it: the directory's last part."""
        return self.root.resolve().name

    def log(self, stage: str) -> Path:
        """The log of ``stage`` (``tokenize/<source>`` for a source's tokenize job)."""
        return self.root / "logs" / f"{stage}.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tokenize_logs(self) -> Path:
        """Links to the logs of the tokenize jobs of the experiment's sources, ``<source>.log``."""
        return self.logs / "tokenize"

    @property
    def tokenized(self) -> Path:
        """link_data: a link per source of data.train to its tokenize job's cache entry."""
        return self.root / "tokenized"

    @property
    def packed(self) -> Path:
        """link_data: links to the files of pack's cache entry."""
        return self.root / "packed"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def lock(self) -> Path:
        """Held by the training that runs (vectorlm/train/run_lock.py): one at a time per experiment."""
        return self.train / ".lock"

    @property
    def job(self) -> Path:
        """The training job every rank reads (written by the train stage before it starts them)."""
        return self.train / "job.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON object per logged step and per evaluation."""
        return self.train / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """The finished training run: eval losses, throughput, the final checkpoint (train's declared output)."""
        return self.train / "summary.json"

    @property
    def estimate(self) -> Path:
        """The memory and time estimate of the training run (rule estimate, before train)."""
        return self.root / "estimate" / "estimate.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    @property
    def tracking(self) -> Path:
        """Where the experiment trackers of train.report_to keep their runs."""
        return self.root / "tracking"

    @property
    def consolidated(self) -> Path:
        return self.root / "consolidated"

    @property
    def hf_model(self) -> Path:
        return self.root / "hf_model"

    @property
    def hf_adapter(self) -> Path:
        return self.root / "hf_adapter"

    @property
    def report(self) -> Report:
        """The run's figures and summary (rule report)."""
        return Report(self.root / "report")

    @property
    def evaluate(self) -> Evaluation:
        """The trained model's evaluation (and the base model's, with evaluate.compare_base)."""
        return Evaluation(self.root / "evaluate")


@dataclass(frozen=True)
class Report(_Directory):
    """A run's ``report/``: figures of its training and data, and a short summary (vectorlm/report/run_report.py)."""

    @property
    def loss(self) -> Path:
        return self.root / "loss.png"

    @property
    def optimization(self) -> Path:
        return self.root / "optimization.png"

    @property
    def throughput(self) -> Path:
        return self.root / "throughput.png"

    @property
    def data(self) -> Path:
        return self.root / "data.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    @property
    def figures(self) -> tuple[Path, ...]:
        return self.loss, self.optimization, self.throughput, self.data


@dataclass(frozen=True)
class SweepDir(_Directory):
    """The ``output_dir`` of an experiment with a sweep section: each run's own layout under ``runs/<name>``, the
    sweep's report under ``sweep/``, and ``best``, a link to the best run's exported model."""

    def run(self, name: str) -> RunDir:
        return RunDir(self.root / "runs" / name)

    def log(self, stage: str) -> Path:
        """The log of a job the runs share (the sweep's report, the base model's evaluation)."""
        return RunDir(self.root).log(stage)

    @property
    def report(self) -> Path:
        return self.root / "sweep"

    @property
    def table(self) -> Path:
        """The runs side by side, and over seeds."""
        return self.report / "summary.md"

    @property
    def runs(self) -> Path:
        """Each run's overrides, status and results, and the best run."""
        return self.report / "runs.json"

    @property
    def figure(self) -> Path:
        return self.report / "eval_loss.png"

    @property
    def best(self) -> Path:
        return self.root / "best"


_CHECKPOINT = re.compile(r"step_(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint directory named as :meth:`RunDir.checkpoint` names them, else None."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CacheDir(_Directory):
    """The ``cache_dir`` experiments share: entries named by a key, a digest of what makes them
    (vectorlm/pipeline/cache_keys.py)."""

    def tokenized(self, key: str) -> Path:
        """One source of data.train, tokenized."""
        return self.root / "tokenized" / key

    def packed(self, key: str) -> Path:
        return self.root / "packed" / key

    def reference_logprobs(self, key: str) -> Path:
        """A reference model's log-probabilities of the completions of packed preference pairs."""
        return self.root / "reference_logprobs" / key

    def log(self, stage: str, key: str) -> Path:
        """The log of the ``stage`` job (tokenize, pack, reference_logprobs) that made the entry ``key``."""
        return self.root / "logs" / f"{stage}-{key}.log"

    def evaluation(self, key: str) -> Evaluation:
        """A base model's evaluation, shared by the experiments on that base model."""
        return Evaluation(self.root / "evaluate" / key)


@dataclass(frozen=True)
class Evaluation(_Directory):
    """A directory the evaluate stage writes: lm-evaluation-harness's results, a table of them, greedy generations."""

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def table(self) -> Path:
        return self.root / "results.md"

    @property
    def generations(self) -> Path:
        return self.root / "generations.jsonl"

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.results, self.table, self.generations

    @property
    def base(self) -> Evaluation:
        """The base model's evaluation beside the trained model's, for the comparison."""
        return Evaluation(self.root / "base")
