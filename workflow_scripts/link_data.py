"""Snakemake adapter: link this experiment's tokenized and packed data, and their logs, to the cache (rule
``link_data``)."""

from vectorlm.data.link_data import link_data
from vectorlm.log import logged_stage
from vectorlm.run_dir import CacheDir, RunDir

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("link_data", sm.log[0]):
    link_data(RunDir(sm.params.output_dir), CacheDir(sm.config["cache_dir"]), sources=sm.params.sources,
              pack_key=sm.params.pack_key)  # fmt: skip
