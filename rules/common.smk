"""Shared helpers: the validated experiment config, artifact paths, input functions and each rule's params.

What these compose comes from vectorlm/pipeline/ (the checks before any job, fingerprints, cache keys, the end-of-run
summary), which imports no torch, transformers or datasets: this runs on every Snakemake call, dry runs included.
"""

import re
import time
from pathlib import Path

from vectorlm.config import Config, to_plain
from vectorlm.config_schema import estimate_settings, rerun_stage, without_operational
from vectorlm.packed import STATS_FILE
from vectorlm.pipeline.cache_keys import (
    DataEntries,
    base_chat_template,
    base_evaluation_key,
    reference_logprobs_key,
)
from vectorlm.pipeline.evaluate_tasks import local_task_files
from vectorlm.file_digests import FileDigests, model_digests
from vectorlm.pipeline.fingerprint import StageFingerprints, built_model_digests
from vectorlm.pipeline.preflight import (
    check_attention,
    check_experiment,
    check_fit,
    check_resources,
    trains_anew,
)
from vectorlm.pipeline.summary import Sweep, failure_lines, success_lines
from vectorlm.pipeline.sweep import sweep_configs, sweep_runs, sweep_select
from vectorlm.run_dir import CacheDir, Evaluation, RunDir, SweepDir

# A train log older than this does not say why this workflow failed.
WORKFLOW_START = time.time()

# The embedded example's base model is built by rule build_example instead of being downloaded.
EXAMPLE_MODEL = "resources/tiny-llama"
EXAMPLE_CORPUS = f"{workflow.basedir}/examples/tiny/corpus.jsonl"
EXAMPLE_SIZES = {"vocab_size": 512, "hidden_size": 128, "num_layers": 4, "num_heads": 4}
SCRIPTS = Path(workflow.basedir, "workflow_scripts")

# Schema (unknown keys, types, defaults), meaning (e.g. batch divisibility) and inputs are checked here, when the DAG is
# built: a mistake fails before any job starts, and before any file is fingerprinted.
CFG = Config.from_dict(config)
check_experiment(
    CFG, model_will_be_built=CFG.model == EXAMPLE_MODEL, state_dir=".snakemake"
)
# Jobs read settings that are not in their params (the operational keys) from the config, with defaults filled in.
config.update(CFG.to_dict())
# A sweep (docs/sweeps.md): the config of each run, by name, each checked like the experiment. A run's own stages write
# under {output_dir}/runs/{run} with the layout of a single experiment; what the runs share runs once.
RUNS = sweep_configs(config) if config.get("sweep") else {}
SWEEP = SweepDir(
    CFG.output_dir
)  # with a sweep section: the runs, the sweep's report, best
RUN = SWEEP.run("{run}") if RUNS else RunDir(CFG.output_dir)
CACHE = CacheDir(CFG.cache_dir)


wildcard_constraints:
    run="|".join(re.escape(name) for name in RUNS) or "(?!)",


def run_config(wildcards):
    """The config of the run a job belongs to: a sweep run's, else the experiment's."""
    return RUNS[wildcards.run] if RUNS else CFG


def report_labels(**labels):
    """The labels of a run's file in `snakemake --report`, with the run's name in a sweep (files with equal labels
    would show as one)."""
    return {"run": "{run}", **labels} if RUNS else labels


def get_output_dir(wildcards):
    """The output_dir of the run a job belongs to ({output_dir}/runs/{run} in a sweep)."""
    return run_config(wildcards).output_dir


# Reruns follow content (vectorlm/pipeline/fingerprint.py): each rule's params carry digests of its code, its input
# data and the model files it reads; external inputs are ancient() so that their timestamps trigger nothing, and the
# workflow profile (profiles/default) turns off Snakemake's timestamp-based code trigger.
DIGESTS = FileDigests(".snakemake/vectorlm-fingerprints.json")
# The example model is not there before build_example makes it, so what makes it (code, corpus, sizes) stands for it.
MODEL_DIGESTS = (
    built_model_digests(
        DIGESTS,
        script=SCRIPTS / "build_example.py",
        corpus=EXAMPLE_CORPUS,
        sizes=EXAMPLE_SIZES,
    )
    if CFG.model == EXAMPLE_MODEL
    else model_digests(DIGESTS, CFG.model)
)
# An explicit train.attention the model does not support fails here (the answer is kept per model).
for cfg in [CFG, *RUNS.values()]:
    check_attention(
        cfg,
        cache=".snakemake/vectorlm-attention.json",
        model_digest=MODEL_DIGESTS["files"],
    )
fingerprint = StageFingerprints(SCRIPTS, digests=DIGESTS, model=MODEL_DIGESTS)
# The data's cache entries: a tokenize job per source of data.train, one pack job (vectorlm/pipeline/cache_keys.py).
DATA = DataEntries(CFG, fingerprint=fingerprint)

# Preference tuning against a reference model (train.objective dpo, not simpo): its log-probabilities of the packed
# pairs are one cache entry (rule reference_logprobs), shared by the experiments with the same reference and data.
USES_REFERENCE = CFG.train.objective == "dpo" and CFG.dpo.uses_reference
REFERENCE_MODEL = CFG.dpo.reference_model or CFG.model
REFERENCE_DIGESTS = (
    MODEL_DIGESTS
    if REFERENCE_MODEL == CFG.model
    else model_digests(DIGESTS, REFERENCE_MODEL) if USES_REFERENCE else None
)
REFERENCE_KEY = (
    reference_logprobs_key(
        pack_key=DATA.pack_key,
        reference_digests=REFERENCE_DIGESTS,
        mixed_precision=CFG.train.mixed_precision,
        digests=fingerprint("reference_logprobs.py"),
    )
    if USES_REFERENCE
    else None
)


def model_input():
    """The base model as an input: ancient (content is fingerprinted) unless rule build_example makes it."""
    return CFG.model if CFG.model == EXAMPLE_MODEL else ancient(CFG.model)


def reference_model_input():
    """The reference model as an input (dpo.reference_model, else the experiment's model)."""
    if REFERENCE_MODEL == EXAMPLE_MODEL:
        return EXAMPLE_MODEL
    return ancient(REFERENCE_MODEL)


def get_source_files(wildcards):
    return {
        role: ancient(path)
        for role, path in DATA.files(DATA.source_of[wildcards.key]).items()
    }


def get_source_params(wildcards):
    return DATA.tokenize_settings(DATA.source_of[wildcards.key])


def get_source_fingerprint(wildcards):
    files = DATA.files(DATA.source_of[wildcards.key])
    return fingerprint("tokenize.py", data=files, model=["files"])


def get_train_params(wildcards):
    return without_operational("train", to_plain(run_config(wildcards).train))


def get_convert_outputs():
    outputs = {"model": directory(str(RUN.hf_model))}
    if CFG.lora.enabled:
        outputs["adapter"] = directory(str(RUN.hf_adapter))
    return outputs


def get_consolidate_params(wildcards):
    return settings_of("export", "consolidate", run_config(wildcards))


def get_convert_params(wildcards):
    return settings_of("export", "convert_hf", run_config(wildcards))


def get_lora_params(wildcards):
    return to_plain(run_config(wildcards).lora)


def get_dpo_params(wildcards):
    """The dpo settings of preference tuning that train reads (the reference model reaches it as an input)."""
    cfg = run_config(wildcards)
    if cfg.train.objective != "dpo":
        return None
    return {k: v for k, v in cfg.dpo.in_use().items() if k != "reference_model"}


def get_train_threads():
    """The train rule's threads (as the rule, a profile or --set-threads set them), for rule reference_logprobs."""
    return workflow.get_rule("train").resources["_cores"].raw


def get_reference_resources():
    """Rule reference_logprobs runs on the train rule's resources (as the rule, a profile or --set-resources set
    them): the reference's forward is sharded like the policy's training."""
    resources = workflow.get_rule("train").resources
    return {
        name: resource.raw
        for name, resource in resources.items()
        if not name.startswith("_") and name != "tmpdir"
    }


def settings_of(section, stage, cfg):
    """The keys of a config section whose change reruns ``stage`` (their x-reruns in the schema)."""
    values = to_plain(getattr(cfg, section))
    return {
        key: value
        for key, value in values.items()
        if rerun_stage(section, key) == stage
    }


def get_evaluate_params():
    return without_operational("evaluate", to_plain(CFG.evaluate))


def get_evaluate_fingerprint():
    return fingerprint("evaluate.py", data=local_task_files(CFG.evaluate))


def get_evaluate_outputs():
    """What rule evaluate writes into {output_dir}/evaluate (the table is shown by `snakemake --report`), and the base
    model's evaluation into evaluate/base with evaluate.compare_base."""
    evaluation = RUN.evaluate
    outputs = {
        "results": str(evaluation.results),
        "table": report(
            str(evaluation.table),
            caption="captions/evaluate.rst",
            category="evaluate",
            labels=report_labels(file=evaluation.table.name),
        ),
        "generations": str(evaluation.generations),
    }
    if CFG.evaluate.compare_base:
        outputs.update(
            {
                f"base_{name}": str(path)
                for name, path in zip(
                    ("results", "table", "generations"), evaluation.base.files
                )
            }
        )
    return outputs


def get_evaluate_inputs(wildcards):
    inputs = {"model": rules.convert_hf.output.model}
    if CFG.evaluate.compare_base:
        inputs["base"] = model_input()
        if (
            RUNS
        ):  # a sweep's runs share the base model's evaluation (rule evaluate_base)
            inputs["base_evaluated"] = rules.evaluate_base.output.results
    return inputs


def get_base_evaluation_params():
    """With evaluate.compare_base: the base model's evaluation's cache entry, and the chat template it is given."""
    if not CFG.evaluate.compare_base:
        return None
    key = base_evaluation_key(
        CFG, model_digests=MODEL_DIGESTS, evaluate_digests=get_evaluate_fingerprint()
    )
    return {
        "entry": str(CACHE.evaluation(key).root),
        "chat_template": base_chat_template(CFG),
    }


def get_base_evaluation_results():
    """The results file of the base model's evaluation's cache entry (with evaluate.compare_base)."""
    return str(Evaluation(get_base_evaluation_params()["entry"]).results)


def get_evaluate_targets():
    """Rule evaluate's results, which `all` asks for when the config has an evaluate section."""
    return [rules.evaluate.output.results] if CFG.evaluate is not None else []


def get_reference_targets():
    """Rule reference_logprobs's output, which `all` asks for when DPO compares with a reference model."""
    return [rules.reference_logprobs.output.logprobs] if USES_REFERENCE else []


def get_sweep_overrides():
    """{run: its overrides} of the sweep, in order."""
    return {run.name: run.overrides for run in sweep_runs(config["sweep"])}


def get_all_targets():
    """What `all` asks for: the experiment's model, report and evaluation, for every run of a sweep with the sweep's
    report."""
    targets = [
        rules.convert_hf.output.model,
        *rules.report.output,
        *get_evaluate_targets(),
    ]
    if not RUNS:
        return targets
    return [*expand(targets, run=RUNS), *rules.sweep_report.output]


def get_train_inputs(wildcards):
    """The train job's inputs; a training that will run anew waits for the estimate, and one that will not fit the
    GPUs (with estimate.check set to error) stops the workflow here, before train is queued.
    """
    cfg = run_config(wildcards)
    if trains_anew(
        RunDir(cfg.output_dir), train=to_plain(cfg.train), lora=to_plain(cfg.lora)
    ):
        check_fit(
            checkpoints.estimate.get(**wildcards).output.estimate,
            check=cfg.estimate.check,
        )
    inputs = {"packed": rules.link_data.output.packed, "model": model_input()}
    if USES_REFERENCE:
        inputs["reference"] = rules.reference_logprobs.output.logprobs
    return inputs


def get_estimate_settings(section):
    """A param function: the settings of ``section`` (train, lora) the run's estimate depends on."""

    def settings(wildcards):
        return estimate_settings(
            section, to_plain(getattr(run_config(wildcards), section))
        )

    return settings


def get_estimate_config(wildcards):
    return to_plain(run_config(wildcards).estimate)


def get_export_dtype(wildcards):
    return run_config(wildcards).export.dtype


def get_packed_stats(wildcards):
    return str(RunDir(get_output_dir(wildcards)).packed / STATS_FILE)


def get_train_resources(wildcards):
    """The train rule's resources that place its ranks and GPUs (as the rule, a profile or --set-resources set them)."""
    resources = workflow.get_rule("train").resources
    return {
        name: resources[name].raw
        for name in ("tasks", "nodes", "gres", "gpu", "tasks_per_gpu")
        if name in resources
    }


def check_train_resources(rule):
    """The train rule's resources as set by the rule, a profile or --set-resources, checked for sense."""
    resources = {name: resource.raw for name, resource in rule.resources.items()}
    for cfg in RUNS.values() or [
        CFG
    ]:  # every run of a sweep on the train rule's resources
        check_resources(resources, config=cfg)


def get_sweep():
    """The sweep, for what the end of the workflow prints (None without a sweep section)."""
    if not RUNS:
        return None
    return Sweep(
        SWEEP,
        get_sweep_overrides(),
        select=sweep_select(config["sweep"]),
    )


def report_interruption():
    """Printed when the workflow fails (vectorlm/pipeline/summary.py): a sweep's report (run with --keep-going so
    that the other runs finish), then, last, that training was interrupted, if it was, and how to continue.
    """
    runs = [SWEEP.run(name) for name in RUNS] or [RUN]
    for line in failure_lines(runs, sweep=get_sweep(), since=WORKFLOW_START):
        print(line)


def report_summary():
    """Printed when the workflow succeeds (vectorlm/pipeline/summary.py); for a sweep, its best run."""
    evaluating = CFG.evaluate is not None
    for line in success_lines(
        RUN,
        sweep=get_sweep(),
        evaluate_settings=get_evaluate_params() if evaluating else None,
        evaluate_fingerprint=get_evaluate_fingerprint() if evaluating else None,
    ):
        print(line)
