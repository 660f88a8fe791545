"""Snakemake adapter: the base model's evaluation, once for a sweep's runs, into the cache (rule ``evaluate_base``)."""

from vectorlm.config import EvaluateConfig
from vectorlm.config_schema import operational
from vectorlm.evaluate.harness import evaluate_base
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("evaluate_base", sm.log[0]):
    evaluate_base(sm.input.base, EvaluateConfig(**sm.params.evaluate, **operational(sm.config, "evaluate")),
                  entry=sm.params.base["entry"], chat_template=sm.params.base["chat_template"],
                  trust_remote_code=sm.params.trust_remote_code)  # fmt: skip
