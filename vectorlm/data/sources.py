"""Reading the user's documents, whatever shape they come in, with errors that name the file and the row.

Formats, detected from the path:

- ``.jsonl`` / ``.json``: JSON lines (or a JSON array of objects), with the ``datasets`` JSON loader;
- ``.parquet``: with the ``datasets`` Parquet loader;
- a directory of ``.txt`` / ``.md`` files (searched recursively): one document per file, in column ``text``;
- a ``datasets.save_to_disk`` directory: a Dataset, or a DatasetDict whose split ``data.split`` is taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets


class DataError(ValueError):
    """A problem with the user's data: a missing file, a missing field, a bad row."""


JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED = ".jsonl, .json, .parquet, a directory of .txt/.md files, or a datasets.save_to_disk directory"


def describe_format(path: Path) -> str:
    """One of json, parquet, text_dir, saved_dataset, saved_dataset_dict; DataError for anything else."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return "saved_dataset_dict"
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "saved_dataset"
        return "text_dir"
    if path.suffix in JSON_SUFFIXES:
        return "json"
    if path.suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unsupported data format {path.suffix or '(no extension)'!r}; use {SUPPORTED}")


def text_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())


def check_source(path: str | Path, *, key: str, fields: dict[str, str], split: str | None = None) -> None:
    """Cheap checks before any job starts: the data exists, is not empty, and its rows have the ``fields``
    ({column: the config key that names it}).

    Reads only what is cheap to read: the first row of a JSON lines file, the schema of a Parquet file, the
    features of a saved dataset.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"config key {key}: data file {path} does not exist")
    kind = describe_format(path)
    if kind == "text_dir":
        if not text_files(path):
            raise DataError(
                f"config key {key}: directory {path} holds no .txt or .md files (and is not a saved dataset)"
            )
        found = [column for column, field_key in fields.items() if field_key == "data.text_field"]
    elif kind == "parquet":
        import pyarrow.parquet as pq  # here, not at the top: the Snakefile runs these checks on every call

        found = pq.read_schema(path).names
    elif kind == "json":
        if path.stat().st_size == 0:
            raise DataError(f"config key {key}: data file {path} is empty")
        found = _first_json_row_fields(path, key=key)
        if found is None:
            return  # a JSON array: the loader checks it
    else:
        info_dir = path
        if kind == "saved_dataset_dict":
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            if split not in splits:
                raise DataError(f"config key data.split: {path} is a DatasetDict with splits {', '.join(splits)}; "
                                f"choose one (got {split!r})")  # fmt: skip
            info_dir = path / split
        found = list(json.loads((info_dir / "dataset_info.json").read_text()).get("features", {}))
    require_fields(path, found, fields)


def require_fields(path: str | Path, found: list[str], fields: dict[str, str]) -> None:
    """A DataError for the first of ``fields`` ({column: config key}) missing from ``found``."""
    for column, field_key in fields.items():
        if column not in found:
            raise DataError(f"{path}: rows have no field {column!r} (config key {field_key}); fields found: "
                            f"{', '.join(found)}")  # fmt: skip


def json_rows(path: Path):
    """(line number, object) for each non-blank line of a JSON lines file; a DataError names the first bad line."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: invalid JSON: {error}") from error
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: not a JSON object but {type(row).__name__}")
            yield number, row


def _first_json_row_fields(path: Path, *, key: str) -> list[str] | None:
    """The fields of the first row, or None for a file holding one JSON array (the loader checks those)."""
    with open(path) as f:
        if next((line for line in f if line.strip()), "").lstrip().startswith("["):
            return None
    first = next(json_rows(path), None)
    if first is None:
        raise DataError(f"config key {key}: data file {path} has no rows")
    return list(first[1])


def load_documents(
    path: str | Path,
    *,
    cache_dir: str | Path,
    key: str = "data.train",
    split: str | None = None,
    text_field: str = "text",
) -> datasets.Dataset:
    """The rows at ``path`` as an Arrow-backed Dataset (memory-mapped, not read into memory).

    The documents of a directory of text files are in column ``text_field``.
    """
    import datasets

    path = Path(path)
    kind = describe_format(path)
    try:
        if kind == "json":
            dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))
        elif kind == "parquet":
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(cache_dir))
        elif kind == "text_dir":
            files = [str(p) for p in text_files(path)]
            if not files:
                raise DataError(f"config key {key}: directory {path} holds no .txt or .md files")
            dataset = datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                            cache_dir=str(cache_dir))  # fmt: skip
            if text_field != "text":
                dataset = dataset.rename_column("text", text_field)
        else:
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"config key data.split: {path} has splits {', '.join(dataset)}; choose one "
                                    f"(got {split!r})")  # fmt: skip
                dataset = dataset[split]
    except datasets.exceptions.DatasetGenerationError as error:
        if kind == "json":
            locate_json_problem(path)
        raise DataError(f"{path}: cannot read it as {kind}: {error.__cause__ or error}") from error
    if len(dataset) == 0:
        raise DataError(f"config key {key}: {path} has no rows")
    return dataset


def locate_json_problem(path: Path) -> None:
    """Raises a DataError naming the first line of a JSON lines file that the loader could not read; returns if
    every line is a JSON object."""
    for _ in json_rows(path):
        pass
