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
    """The documents of a text directory: its .txt and .md files, hidden files and directories (.git, .cache, ...)
    left out."""
    return sorted(
        p
        for p in path.rglob("*")
        if p.suffix in TEXT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


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


def text_lines(path: Path):
    """(line number, text) for each line of a UTF-8 text file; a DataError names the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                f"{error.start + 1}); convert the file to UTF-8")  # fmt: skip


def json_rows(path: Path):
    """(line number, object) for each non-blank line of a JSON lines file; a DataError names the first bad line."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: invalid JSON: {error}") from error
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: not a JSON object but {type(row).__name__}")
        yield number, row


def _is_json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array rather than JSON lines (read from its first MB, not its first line,
    which is the whole file for an array on one line)."""
    with open(path, "rb") as f:
        return f.read(2**20).lstrip().startswith(b"[")


def _first_json_row_fields(path: Path, *, key: str) -> list[str] | None:
    """The fields of the first row (of JSON lines, or of a JSON array when its first object is in the first MB),
    or None when that cannot be read cheaply (the loader checks it then)."""
    if _is_json_array(path):
        with open(path, "rb") as f:
            head = f.read(2**20).decode("utf-8", errors="replace").lstrip()[1:].lstrip()
        if head.startswith("]"):
            raise DataError(f"config key {key}: data file {path} holds an empty JSON array: it has no rows")
        try:
            row, _ = json.JSONDecoder().raw_decode(head)
        except json.JSONDecodeError:
            return None
        if not isinstance(row, dict):
            raise DataError(f"config key {key}: {path} is a JSON array of {type(row).__name__}, not of objects")
        return list(row)
    first = next(json_rows(path), None)
    if first is None:
        raise DataError(f"config key {key}: data file {path} has no rows")
    return list(first[1])


def count_missing_fields(path: Path, fields: list[str]) -> dict[str, int]:
    """How many rows of a JSON lines file lack each of ``fields`` altogether (the loader fills a missing field with
    null, so only the file can tell a missing field from a null one); {} for other formats.

    One pass over the bytes without parsing: a row has the field when its line holds the quoted key, so a row that
    lacks the field but quotes its name in a value counts as having it (its skip is then reported as null).
    """
    if describe_format(path) != "json" or _is_json_array(path):
        return {}
    keys = {field: json.dumps(field).encode() for field in fields}
    missing = dict.fromkeys(fields, 0)
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                for field, quoted in keys.items():
                    missing[field] += quoted not in line
    return missing


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
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError) as error:
        if kind == "json":
            locate_json_problem(path)
        locate_non_utf8(path)
        raise DataError(f"{path}: cannot read it as {kind}: {error.__cause__ or error}") from error
    if len(dataset) == 0:
        raise DataError(f"config key {key}: data file {path} has no rows")
    return dataset


def locate_non_utf8(path: Path) -> None:
    """Raises a DataError naming the first line of a JSON or text-directory source that is not UTF-8 (the loaders
    let some such bytes through, to fail when the rows are read); returns when every line is UTF-8."""
    kind = describe_format(path)
    for file in text_files(path) if kind == "text_dir" else [path] if kind == "json" else []:
        for _ in text_lines(file):
            pass


def locate_json_problem(path: Path) -> None:
    """Raises a DataError naming the first line of a JSON lines file that the loader could not read; returns if
    every line is a JSON object."""
    for _ in json_rows(path):
        pass
