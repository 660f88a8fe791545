"""The names of an experiment's entries in the cache shared by experiments (``cache_dir``, vectorlm/run_dir.py).

A key is a digest of what makes an entry: the settings of the stage that writes it and the digests of the contents it
reads (data files, tokenizer files, the stage's code: :mod:`vectorlm.pipeline.fingerprint`). Two experiments whose
data, tokenizer and settings are the same share an entry however they spell its paths, and any edit makes a new entry
rather than changing one that another experiment uses.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

from vectorlm.config import Config, DataSource, to_plain
from vectorlm.config_schema import rerun_stage, without_operational
from vectorlm.pipeline.fingerprint import settings_digest

# fingerprint(script, data={role: path}, model=[parts]) -> {what: digest}: the digests a stage's params carry
Fingerprint = Callable[..., dict[str, str]]


class DataEntries:
    """The tokenized entry of each source of ``data.train`` (a tokenize job each) and the packed entry of them all.

    Args:
        config: the experiment.
        fingerprint: the digests of a workflow script's code and of the files it reads.
    """

    def __init__(self, config: Config, *, fingerprint: Fingerprint) -> None:
        self.config = config
        self.sources: dict[str, DataSource] = {source.name: source for source in config.data.sources}
        self.first = next(iter(self.sources))
        self.keys = {
            name: settings_digest({**self.tokenize_settings(name), "trust_remote_code": config.trust_remote_code,
                                   "digests": fingerprint("tokenize.py", data=self.files(name), model=["files"])})
            for name in self.sources
        }  # fmt: skip
        # Sources with the same settings and files make one entry (one job), which the first of them names.
        self.source_of = {key: name for name, key in reversed(self.keys.items())}
        self.pack_key = settings_digest(
            {"sources": list(self.keys.values()), "data": self.pack_settings(), "max_seq_len": config.max_seq_len,
             "digests": fingerprint("pack.py")}
        )  # fmt: skip

    def files(self, name: str) -> dict[str, str]:
        """{role: path} of the files the tokenize job of source ``name`` reads: data.eval goes with the first source."""
        files = {"train": self.sources[name].data.train}
        if self.config.data.eval is not None and name == self.first:
            files["eval"] = self.config.data.eval
        return files

    def tokenize_settings(self, name: str) -> dict[str, Any]:
        """What tokenize uses of source ``name``: its data.* keys that rerun tokenize (the schema's ``x-reruns``), with
        data.eval only for the first source. Its config key is not among them (it is read at run time for messages):
        moving a source in the list must not make it another entry."""
        data = to_plain(self.sources[name].data)
        settings = {key: value for key, value in data.items() if rerun_stage("data", key) == "tokenize"}
        settings["eval"] = self.files(name).get("eval")
        return {"data": settings, "hold_out": self.config.data.eval is None}

    def pack_settings(self) -> dict[str, Any]:
        """What pack uses and records of data.*: the sources with their weights, packing, chunk_overlap, split_seed,
        and the rest, which goes with the packed rows into the resolved config of everything after them."""
        return without_operational("data", to_plain(self.config.data))


def reference_logprobs_key(*, pack_key: str, reference_digests: dict[str, str], mixed_precision: bool,
                           digests: dict[str, str]) -> str:  # fmt: skip
    """The cache entry of the reference model's log-probabilities of the packed pairs (rule reference_logprobs): the
    packed data's key, the reference model's files and weights (``reference_digests``), the precision it computes in
    and the stage's code (``digests``). Nothing of the policy's training is in it: DPO experiments that differ in
    dpo.beta, the learning rate or LoRA share it."""
    return settings_digest({"packed": pack_key, "reference": reference_digests, "mixed_precision": mixed_precision,
                            "digests": digests})  # fmt: skip


def base_evaluation_key(
    config: Config,
    *,
    model_digests: dict[str, str],
    evaluate_digests: dict[str, str],
    versions: dict[str, str] | None = None,
) -> str:
    """The cache entry of the base model's evaluation (evaluate.compare_base), named by everything its results depend
    on: the base model's files (or how the example model is built), the evaluate settings and the chat template given
    to the base model, the task files and the code (``evaluate_digests``), and the versions of the harness and
    transformers (``versions``, by default the installed ones), whose scores are not comparable across versions.
    Experiments on one base model share it."""
    assert config.evaluate is not None
    if versions is None:
        versions = {package: importlib.metadata.version(package) for package in ("lm_eval", "transformers")}
    return settings_digest(
        {
            "evaluate": without_operational("evaluate", to_plain(config.evaluate)),
            "chat_template": base_chat_template(config),
            "trust_remote_code": config.trust_remote_code,
            "model": model_digests,
            "digests": evaluate_digests,
            "versions": versions,
        }
    )


def base_chat_template(config: Config) -> str | None:
    """The chat template the base model is evaluated with: the one training used (data.chat_template), which the
    exported model's tokenizer holds, so that both are prompted alike; None leaves the base tokenizer's own."""
    assert config.evaluate is not None
    return config.data.chat_template if config.evaluate.apply_chat_template else None
