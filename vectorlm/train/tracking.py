"""The experiment trackers (TensorBoard, Weights & Biases, MLflow), which receive the records of training's metrics file
(vectorlm/train/metrics_log.py).

``train.report_to`` names the backends. The main rank sends every record written to the metrics file (the same
scalars at the same steps) and the resolved config as hyperparameters. Everything stays under ``{output_dir}/
tracking`` unless the environment says otherwise, because compute nodes often have no network:

- TensorBoard: event files in ``tracking/tensorboard/<run>``;
- W&B: offline runs in ``tracking/wandb`` (``wandb sync`` uploads them later) unless ``WANDB_MODE`` is set;
  ``WANDB_PROJECT`` (default ``vectorlm``), ``WANDB_ENTITY`` and ``WANDB_DIR`` are honoured;
- MLflow: a local store, the SQLite database ``tracking/mlflow.db``, unless ``MLFLOW_TRACKING_URI`` is set; the
  experiment is ``MLFLOW_EXPERIMENT_NAME`` (default ``vectorlm``).

Each backend's run id is kept in the checkpoint's train state, so a resumed training run continues the same tracked
run. Records the metrics file already holds are not sent again (see :class:`vectorlm.train.metrics_log.MetricsLog`),
and a backend added to a run that is resumed first receives the records of the earlier attempts.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from vectorlm.config import flatten
from vectorlm.run_dir import RunDir

log = logging.getLogger(__name__)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as dotted keys with plain values (lists and None as text), as trackers take them."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, without its step (MFU is None where the GPU's peak is unknown)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class Backend:
    """A tracked run: opened with the run id to continue (None: a new run, which receives ``config``) and the number of
    metrics records ``sent`` to that run before; then :meth:`log` per record and :meth:`close` at the end."""

    run_id: str
    location: str  # where the run is stored, for the log

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def log_many(self, records: list[dict[str, Any]]) -> None:
        """The records of earlier attempts, sent to a new run."""
        for record in records:
            self.log(record["step"], scalars(record))

    def close(self, outcome: str) -> None:
        raise NotImplementedError


class TensorBoard(Backend):
    def __init__(self, root: Path, *, run_id: str | None, sent: int, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.run_id = run_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.writer = SummaryWriter(str(root / "tensorboard" / self.run_id))
        if run_id is None:
            for summary in hparams(hyperparameters(config), {}):
                self.writer.file_writer.add_summary(summary)
        self.location = self.writer.log_dir

    def log(self, step: int, values: dict[str, float]) -> None:
        self.log_many([{"step": step, **values}])

    def log_many(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            for key, value in scalars(record).items():
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # a killed job keeps what it logged, as the metrics file does

    def close(self, outcome: str) -> None:
        self.writer.close()


class Wandb(Backend):
    """Each record is a W&B history row of its own, committed at once (W&B keeps a row open until a higher step is
    logged, which a kill would lose), numbered by its line in the metrics file; charts use ``step`` as x-axis."""

    def __init__(self, root: Path, *, run_id: str | None, sent: int, name: str, config: dict[str, Any]) -> None:
        import wandb

        # W&B writes its run file every 15 s by default: a job killed outright (SIGKILL, a lost node) would lose up to
        # that much, which a resumed run does not send again (the metrics file has it).
        flush = (
            {"x_transaction_log_flush_interval": 1.0}
            if hasattr(wandb.Settings(), "x_transaction_log_flush_interval")
            else {}
        )
        directory = Path(os.environ.get("WANDB_DIR", root))
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vectorlm"), name=name, id=run_id or uuid.uuid4().hex[:8],
            resume="allow", dir=str(directory), mode=os.environ.get("WANDB_MODE", "offline"),
            config=config if run_id is None else None, settings=wandb.Settings(console="off", silent=True, **flush),
        )  # fmt: skip
        offline = "" if self.run.settings._offline is False else ", offline: wandb sync it to upload"
        self.run_id, self.location = self.run.id, f"{Path(self.run.dir).parent}{offline}"
        self.run.define_metric("*", step_metric="step")
        self.row = sent

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values}, step=self.row, commit=True)
        self.row += 1

    def close(self, outcome: str) -> None:
        if outcome == "stopped":
            self.run.mark_preempting()  # shown as preempted until the resumed job continues it
        self.run.finish(exit_code={"finished": 0, "stopped": 75, "failed": 1}[outcome])


class Mlflow(Backend):
    def __init__(self, root: Path, *, run_id: str | None, sent: int, name: str, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        root.mkdir(parents=True, exist_ok=True)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is None:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vectorlm")
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [Param(k, str(v)) for k, v in hyperparameters(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(run_id, params=params[start : start + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id, self.location = run_id, self.uri

    def log(self, step: int, values: dict[str, float]) -> None:
        self.log_many([{"step": step, **values}])

    def log_many(self, records: list[dict[str, Any]]) -> None:
        # Synchronous: MLflow's asynchronous logging drops what fails (a server away) or is queued when killed.
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, r["step"]) for r in records for k, v in scalars(r).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self, outcome: str) -> None:
        status = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}[outcome]
        self.client.set_terminated(self.run_id, status=status)


BACKENDS: dict[str, type[Backend]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


class Trackers:
    """The backends of ``train.report_to`` on the main rank (none elsewhere).

    Args:
        names: the backends.
        run: the experiment's output directory; runs are stored under its ``tracking/``.
        run_ids: {backend: run id} of the tracked runs to continue (from the checkpoint's train state).
        config: the resolved config, sent as hyperparameters to new tracked runs.
        earlier: the metrics records already written, sent to backends whose tracked run starts now.
    """

    def __init__(self, names, *, run: RunDir, run_ids: dict[str, str], config: dict[str, Any],
                 earlier: list[dict[str, Any]]) -> None:  # fmt: skip
        root, name = run.tracking, run.name
        self.backends: dict[str, Backend] = {}
        for backend in names:
            run_id = run_ids.get(backend)
            try:
                try:
                    tracker = BACKENDS[backend](root, run_id=run_id, sent=len(earlier) if run_id else 0, name=name,
                                                config=config)  # fmt: skip
                except Exception as error:
                    if run_id is None:
                        raise
                    log.warning("%s: cannot continue run %s (%s); starting a new one", backend, run_id, error)
                    run_id, tracker = None, BACKENDS[backend](root, run_id=None, sent=0, name=name, config=config)
                log.info("%s: %s run %s at %s", backend, "continuing" if run_id else "new", tracker.run_id,
                         tracker.location)  # fmt: skip
                if run_id is None:
                    tracker.log_many(earlier)
            except Exception as error:  # noqa: BLE001 (training goes on without it, as below)
                log.error("%s: cannot track this run, training continues without it: %s", backend, error)
                continue
            self.backends[backend] = tracker

    @property
    def run_ids(self) -> dict[str, str]:
        return {name: tracker.run_id for name, tracker in self.backends.items()}

    def log(self, record: dict[str, Any]) -> None:
        """Sends ``record`` to every backend; one that fails is dropped with an error in the log: a tracker (a full
        disk, a server away) must not stop a training run."""
        values = scalars(record)
        for name, tracker in list(self.backends.items()):
            try:
                tracker.log(record["step"], values)
            except Exception as error:  # noqa: BLE001
                log.error("%s: stopped tracking at step %d, training continues without it: %s", name, record["step"],
                          error)  # fmt: skip
                del self.backends[name]

    def close(self, outcome: str) -> None:
        """Ends the tracked runs: ``outcome`` is finished, stopped (by a signal, to be resumed) or failed."""
        for name, tracker in self.backends.items():
            try:
                tracker.close(outcome)
            except Exception as error:  # noqa: BLE001 (a tracker that cannot finish must not hide the run's outcome)
                log.warning("%s: could not close run %s: %s", name, tracker.run_id, error)
        self.backends = {}
