"""vectorlm: the library behind the vectorlm-pipeline Snakemake workflow (tokenize, pack, train, export)."""

__version__ = "0.1.0"
