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
include: "rules/sweep.smk"


# The whole pipeline: tokenize -> pack -> train -> consolidate -> convert_hf, the run's report, evaluate when the
# config has an evaluate section (each for every run of a sweep, and the sweep's report), and for DPO the reference model's log-probabilities (which train reads: named here
# too, so that a plan shows them before the estimate has decided whether train runs).
rule all:
    default_target: True
    input:
        get_all_targets(),
        get_reference_targets(),


onsuccess:
    report_summary()


onerror:
    report_interruption()
