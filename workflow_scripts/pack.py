"""Snakemake adapter: pack tokenized documents into training rows (rule ``pack``), a mixture's sources by weight."""

from vectorlm.config import DataConfig
from vectorlm.config_schema import operational
from vectorlm.data.pack import run_pack
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
data = DataConfig(**sm.params.data, **operational(sm.config, "data"))
sources = data.sources  # in the order of input.tokenized
mixture = not isinstance(data.train, str)
with logged_stage("pack", sm.log[0]):
    run_pack(
        tokenized_dir=list(sm.input.tokenized),
        max_seq_len=sm.params.max_seq_len,
        output_dir=sm.output.packed,
        overlap=data.chunk_overlap,
        packing=data.packing,
        names=[source.name for source in sources],
        weights=[source.weight for source in sources] if mixture else None,
        seed=data.split_seed,
        data=sm.params.data,
        pairs=data.mode == "preference",
    )
