"""The data cache: tokenized and packed data live under ``cache_dir`` (shared by experiments) at a key made of what
produces them, and each experiment's ``output_dir`` holds links to its entries.

A key is a digest of the settings and of the contents that make an entry (data files, tokenizer files, the stage's
code: the digests the workflow computes anyway), so two experiments whose data, tokenizer and tokenize settings are
the same share it however they spell its paths, and any edit makes a new entry rather than changing one that another
experiment uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def cache_key(settings: Any) -> str:
    """A short digest of ``settings`` (plain JSON values): the name of a cache entry."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()


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
