"""Snakemake adapter: evaluate hf_model (and the base model, with evaluate.compare_base) with lm-evaluation-harness
(rule ``evaluate``)."""

from vectorlm.config import EvaluateConfig
from vectorlm.config_schema import operational
from vectorlm.evaluate.harness import run_evaluate
from vectorlm.log import logged_stage
from vectorlm.run_dir import RunDir

sm = snakemake  # noqa: F821 (injected by Snakemake)
base = sm.params.base  # None unless evaluate.compare_base
with logged_stage("evaluate", sm.log[0]):
    run_evaluate(
        sm.input.model,
        EvaluateConfig(**sm.params.evaluate, **operational(sm.config, "evaluate")),
        output_dir=RunDir(sm.params.output_dir).evaluate.root,
        base_dir=sm.input.get("base"),
        base_entry=base["entry"] if base else None,
        chat_template=base["chat_template"] if base else None,
        trust_remote_code=sm.params.trust_remote_code,
        provenance={"fingerprint": sm.params.fingerprint},  # tells the run summary whether these results are current
    )
