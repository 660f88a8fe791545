"""Snakemake adapter: evaluate a model directory with lm-evaluation-harness (rules ``evaluate`` and ``evaluate_base``)."""

from vectorlm.config import EvaluateConfig, operational
from vectorlm.evaluate import evaluate_model
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage(sm.rule, sm.log[0]):
    evaluate_model(
        sm.input.model,
        EvaluateConfig(**sm.params.evaluate, **operational(sm.config, "evaluate")),
        results_path=sm.output.results,
        table_path=sm.output.table,
        generations_path=sm.output.generations,
        base_results=sm.input.get("base"),  # only with evaluate.compare_base
        chat_template=sm.params.get("chat_template"),  # only for the base model
        trust_remote_code=sm.params.trust_remote_code,
    )
