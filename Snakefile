from snakemake.utils import min_version

min_version("9.0")


# The embedded default experiment, unless config files are named on the command line: a user's file stands alone
# (a key it omits takes its documented default, never the example's value), and several files merge in order.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


# The description on the first page of `snakemake --report report.html`.
report: "rules/captions/workflow.rst"


include: "rules/common.smk"
include: "rules/example.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/export.smk"
include: "rules/report.smk"
include: "rules/evaluate.smk"


# The whole pipeline: tokenize -> pack -> train -> consolidate -> convert_hf, the run's report, evaluate when the
# config has an evaluate section, and for DPO the reference model's log-probabilities (which train reads: named here
# too, so that a plan shows them before the estimate has decided whether train runs).
rule all:
    default_target: True
    input:
        rules.convert_hf.output.model,
        rules.report.output,
        get_evaluate_targets(),
        get_reference_targets(),


onsuccess:
    report_summary()


onerror:
    report_interruption()
