from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/example.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/export.smk"


# The whole pipeline: tokenize -> pack -> train -> consolidate -> convert_hf.
rule all:
    default_target: True
    input:
        rules.convert_hf.output.model,


onsuccess:
    report_summary()
