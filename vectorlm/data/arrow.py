"""Writing token columns batch by batch to an Arrow file, so that no stage holds a whole corpus in memory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TOKEN_TYPES = {"input_ids": pa.int32(), "labels": pa.int32(), "position_ids": pa.int32(), "loss_mask": pa.uint8()}


@contextmanager
def partial_dir(output_dir: Path) -> Iterator[Path]:
    """A scratch directory beside ``output_dir`` for a stage's intermediate files, removed when the stage ends.

    Its name is fixed (``.<name>.partial``), so what a killed stage left behind is removed when the stage runs again
    rather than kept forever.
    """
    path = output_dir.parent / f".{output_dir.name}.partial"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list column from its flattened values and the length of each list (one batch: under 2**31 values)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    assert offsets[-1] < 2**31, "a batch of token lists must hold fewer than 2**31 tokens"
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total)


class ColumnsWriter:
    """Appends batches of token lists to an Arrow stream file and opens the result as a memory-mapped Dataset."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self.schema = pa.schema([(c, pa.list_(TOKEN_TYPES[c])) for c in columns])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self.rows = 0

    def write(self, lengths: np.ndarray, **values: np.ndarray) -> pa.RecordBatch:
        arrays = [list_array(values[c], lengths, TOKEN_TYPES[c]) for c in self.columns]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += len(lengths)
        return batch

    def finish(self) -> datasets.Dataset:
        self._writer.close()
        self._sink.close()
        return datasets.Dataset.from_file(str(self.path))


def list_lengths(dataset: datasets.Dataset, column: str = "input_ids") -> np.ndarray:
    """The length of every list in ``column``, from the Arrow offsets of the memory-mapped table.

    Going through ``dataset[column]`` instead would copy the whole column (every token of the corpus) into memory.
    """
    if dataset._indices is not None:  # a selection of rows: lay it out first (not the case for stage artifacts)
        dataset = dataset.flatten_indices()
    return pc.list_value_length(dataset.data.table.column(column)).to_numpy().astype(np.int64)


class ListColumn:
    """Slices of the lists of a chunked (memory-mapped) list column, gathered without concatenating its chunks.

    ``Table.take`` would concatenate every chunk of a list column first: a copy of the whole corpus per call.
    """

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.offsets = [chunk.offsets.to_numpy() for chunk in column.chunks]
        self.values = [chunk.values.to_numpy() for chunk in column.chunks]  # zero-copy views of the mapped file
        self.first_row = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
        self.dtype = column.type.value_type.to_pandas_dtype()

    def gather(self, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The concatenation of ``list[rows[i]][starts[i] : starts[i] + lengths[i]]`` for every i."""
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        destination = np.cumsum(lengths) - lengths
        chunk = np.searchsorted(self.first_row, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        bounds = np.searchsorted(chunk[order], np.arange(len(self.values) + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            picked = order[bounds[c] : bounds[c + 1]]
            source = self.offsets[c][rows[picked] - self.first_row[c]] + starts[picked]
            out[ranges(destination[picked], lengths[picked])] = self.values[c][ranges(source, lengths[picked])]
        return out
