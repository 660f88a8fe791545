"""Shared helpers: the validated experiment config, artifact paths, and each rule's slice of the config."""

import json
from pathlib import Path

from vectorlm.config import Config, to_plain
from vectorlm.data.pack import ARTIFACT_VERSION as pack_artifact_version
from vectorlm.data.tokenize import ARTIFACT_VERSION as tokenize_artifact_version
from vectorlm.inputs import check_inputs
from vectorlm.placement import check_train_resources

# The embedded example's base model is built by rule build_example instead of being downloaded.
EXAMPLE_MODEL = "resources/tiny-llama"

# Schema (unknown keys, types, defaults) and meaning (e.g. batch divisibility) are checked here, when the DAG is
# built, and so are the input paths: a mistake fails before any job starts.
CFG = Config.from_dict(config)
check_inputs(CFG, model_will_be_built=CFG.model == EXAMPLE_MODEL)


def out(path):
    """An artifact path inside this experiment's output_dir."""
    return f"{CFG.output_dir}/{path}"


def get_data_files(wildcards):
    files = {"train": CFG.data.train}
    if CFG.data.eval is not None:
        files["eval"] = CFG.data.eval
    return files


def get_data_params():
    """What tokenize uses of data.*: packing and chunk_overlap belong to pack, so they do not re-tokenize."""
    data = to_plain(CFG.data)
    del data["packing"], data["chunk_overlap"]
    return data


def get_train_params():
    return to_plain(CFG.train)


def get_lora_params():
    return to_plain(CFG.lora)


def get_convert_outputs():
    outputs = {"model": directory(out("hf_model"))}
    if CFG.lora.enabled:
        outputs["adapter"] = directory(out("hf_adapter"))
    return outputs


def get_consolidate_params():
    return {"dtype": CFG.export.dtype, "max_shard_size": CFG.export.max_shard_size}


def get_convert_params():
    return {
        "smoke_test": CFG.export.smoke_test,
        "smoke_test_prompt": CFG.export.smoke_test_prompt,
        "smoke_test_max_size": CFG.export.smoke_test_max_size,
    }


def check_train_resources_now(rule):
    """The train rule's resources as set by the rule, a profile or --set-resources, checked for sense."""
    raw = {name: resource.raw for name, resource in rule.resources.items()}
    check_train_resources(raw, train=CFG.train, threads=raw["_cores"])


def report_summary():
    """Printed when the workflow succeeds: how the eval loss moved and where the model is."""
    summary_path = Path(out("train/summary.json"))
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        print(
            f"\nvectorlm: eval loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f} "
            f"after {summary['step']} steps ({summary['tokens_per_second']:,.0f} tokens/s on "
            f"{summary['world_size']} rank(s)); model: {out('hf_model')}\n"
        )
