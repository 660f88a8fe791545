"""Snakemake adapter: link this experiment's tokenized and packed data, and their logs, to the cache (rule
``link_data``)."""

from pathlib import Path

from vectorlm.data.cache import link, link_entries
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("link_data", sm.log[0]):
    tokenized = dict(zip(sm.params.sources, map(Path, sm.input.tokenized)))
    packed = Path(sm.input.packed)
    link_entries(tokenized, sm.output.tokenized)
    link_entries({}, sm.output.packed, contents_of=packed)
    logs, cache_logs = Path(sm.log[0]).parent, packed.parents[1] / "logs"
    link_entries({f"{name}.log": cache_logs / f"tokenize-{path.name}.log" for name, path in tokenized.items()},
                 logs / "tokenize")  # fmt: skip
    link(cache_logs / f"pack-{packed.name}.log", logs / "pack.log")
