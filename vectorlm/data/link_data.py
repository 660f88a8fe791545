"""The link_data stage: tokenized and packed data live under ``cache_dir`` (shared by experiments) at a key made of
what produces them (vectorlm/pipeline/cache_keys.py), and each experiment's ``output_dir`` holds links to its entries
and to the logs of the jobs that made them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vectorlm.run_dir import CacheDir, RunDir


def link_data(run: RunDir, cache: CacheDir, *, sources: dict[str, str], pack_key: str) -> None:
    """Makes ``run``'s view of its data: ``tokenized/<source>`` for each of ``sources`` ({name: its tokenized entry's
    key}), the files of the packed entry ``pack_key`` in ``packed/``, and the logs of the jobs that made them."""
    link_entries({name: cache.tokenized(key) for name, key in sources.items()}, run.tokenized)
    link_entries({}, run.packed, contents_of=cache.packed(pack_key))
    link_entries({f"{name}.log": cache.log("tokenize", key) for name, key in sources.items()}, run.tokenize_logs)
    link(cache.log("pack", pack_key), run.log("pack"))


def link(target: str | Path, path: str | Path) -> None:
    """Makes ``path`` a relative symbolic link to ``target`` (replacing what was there), so that moving the folder
    that holds both keeps it working."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    os.symlink(os.path.relpath(Path(target).resolve(), path.parent.resolve()), path)


def link_entries(links: dict[str, str | Path], directory: str | Path, *, contents_of: str | Path | None = None) -> None:
    """Makes ``directory`` hold only a link ``name -> target`` for each of ``links`` and, with ``contents_of``, one for
    every entry of that directory (an experiment's view of a cache entry)."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    if contents_of is not None:
        entries = sorted(e for e in Path(contents_of).iterdir() if not e.name.startswith("."))  # not Snakemake's marks
        links = {entry.name: entry for entry in entries} | dict(links)
    for name, target in links.items():
        link(target, directory / name)
