"""The tokenize stage: documents to token ids (and, for instruction data, which tokens carry the loss).

Documents are read as Arrow batches, encoded with the model's fast tokenizer a batch at a time and written straight
to an Arrow file per split, so memory stays bounded whatever the corpus size. Each kind of data (``data.mode``) has
its encoder:

- text: BOS (when distinct from EOS) + the text + EOS, all trained on;
- prompt_response: BOS + prompt + response + EOS, the loss on the response and EOS only;
- separator: like text, without loss up to and including the first ``data.separator``;
- messages: the conversation rendered with the chat template (which supplies its own special tokens), the loss on
  the assistant turns only;
- preference: two documents per row, the chosen completion's and the rejected one's (in this order, one after the
  other), each the prompt and the completion, as prompt_response does for strings or messages for conversations,
  with the loss on the completion (a conversation's last, assistant turn) only.

Rows with nothing to train on (null or empty text, no response, no separator, no assistant turn) are skipped,
counted per reason in ``stats.json`` and the log; if no training row is left, the stage fails.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vectorlm.config import ConfigError, DataConfig, write_stage_config
from vectorlm.data.arrow import ColumnsWriter, partial_dir, ranges
from vectorlm.data.chat import check_messages, content_spans, render_with_assistant_spans
from vectorlm.data.sources import (
    DataError,
    count_missing_fields,
    load_documents,
    locate_non_utf8,
    require_fields,
)
from vectorlm.hub.model_dir import check_model_dir, read_model_config
from vectorlm.log import Progress

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, preferring the fast (Rust) implementation, checked against the model: no more
    tokens than the model has embeddings, and an end-of-document token (the model's own, from its config.json, when
    the tokenizer names none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"config key model: cannot load the tokenizer of {model_dir}: {error}") from error
    if not tokenizer.is_fast:
        log.warning("%s has no fast tokenizer; tokenizing with the slow Python one", model_dir)
    config = read_model_config(model_dir)
    text = config.get("text_config", config)
    vocab_size = text.get("vocab_size")
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ConfigError(f"config key model: the tokenizer of {model_dir} has {len(tokenizer):,} tokens, more than "
                          f"the model's {vocab_size:,} embeddings (vocab_size in config.json): ids from {vocab_size:,} "
                          "on would fail in training; use the model's own tokenizer, or resize its embeddings")  # fmt: skip
    if tokenizer.eos_token_id is None:
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and 0 <= eos < len(tokenizer):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
            log.warning("the tokenizer of %s names no EOS token: documents end with the model's eos_token_id %d (%r, "
                        "config.json)", model_dir, eos, tokenizer.eos_token)  # fmt: skip
        else:
            log.warning("neither the tokenizer of %s nor its config.json names an EOS token: documents get no end "
                        "token, so the model does not learn where one ends", model_dir)  # fmt: skip
    return tokenizer


def document_boundaries(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids put before and after every document.

    A document ends with EOS so the model learns to stop. It starts with BOS when the tokenizer has one distinct from
    EOS; where BOS == EOS (GPT-2 style) the previous document's EOS already plays that role. Tokenizers without pad
    tokens need nothing here: packed rows are not padded, and batches pad with -100 labels.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None and bos != eos else []
    suffix = [eos] if eos is not None else []
    return prefix, suffix


class Encoder:
    """Turns a batch of rows into token ids and loss masks for one kind of data.

    The users' text is tokenized as text: a literal ``</s>`` in a document or a chat message is those characters,
    never the control token (which the model would then learn to emit mid-text). Special tokens come only from the
    BOS/EOS put around documents and from the chat template's own markup.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> None:
        self.tokenizer, self.data = tokenizer, data
        self.prefix, self.suffix = document_boundaries(tokenizer)
        self.with_mask = data.mode != "text"
        specials = {i: str(token) for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.special_ids = np.array(sorted(specials), dtype=np.int64)
        texts = sorted(specials.values(), key=len, reverse=True)
        self.special_text = re.compile("|".join(map(re.escape, texts))) if texts else None
        self.as_text = {i: self._text_ids(text) for i, text in specials.items()}

    def ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.tokenizer.is_fast:  # the Rust tokenizer directly: no offsets, no Python objects per token
            backend = self.tokenizer.backend_tokenizer
            backend.encode_special_tokens = True  # special-token text in documents is text
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _text_ids(self, text: str) -> list[int]:
        """The ids of a special token's text as text; without the word-start marker a SentencePiece-style tokenizer
        puts before a string of its own (the text stands inside a message, not at its start)."""
        ids = self.ids([text])[0]
        if self.tokenizer.decode(ids) != text and self.tokenizer.decode(ids[1:]) == text:
            return ids[1:]
        return ids

    def with_offsets(self, texts: list[str], *, markup: bool = False) -> tuple[list[list[int]], list[np.ndarray]]:
        """Token ids and each token's first character; with ``markup`` (a rendered chat template) special-token
        text becomes special tokens, otherwise it is text."""
        if not texts:
            return [], []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=not markup)  # fmt: skip
        return encoded["input_ids"], [
            np.asarray(o, dtype=np.int64).reshape(-1, 2)[:, 0] for o in encoded["offset_mapping"]
        ]

    def encode(self, rows: dict[str, list], first_row: int, source: str, skipped: Counter):
        """Token ids, loss masks (or None) and the row numbers kept, for a batch of rows. Text documents come without
        BOS/EOS, which :func:`frame` adds to the whole batch at once."""
        mode = self.data.mode
        if mode == "prompt_response":
            return self._prompt_response(rows, first_row, source, skipped)
        if mode == "messages":
            return self._messages(rows, first_row, source, skipped)
        if mode == "preference":
            return self._preference(rows, first_row, source, skipped)
        kept, texts = self._texts(rows[self.data.text_field], self.data.text_field, first_row, source, skipped)
        if mode == "text":
            return self.ids(texts), None, kept
        documents, masks, rows_kept = [], [], []
        for row, text, ids, starts in zip(kept, texts, *self.with_offsets(texts)):
            at = text.find(self.data.separator)
            if at < 0:
                skipped["no separator"] += 1
                continue
            trained = starts >= at + len(self.data.separator)
            documents.append(self.prefix + ids + self.suffix)
            masks.append(np.concatenate([np.zeros(len(self.prefix)), trained, np.ones(len(self.suffix))]))
            rows_kept.append(row)
        return documents, masks, rows_kept

    def _texts(self, values: list, field: str, first_row: int, source: str, skipped: Counter):
        kept, texts = [], []
        for row, value in enumerate(values, start=first_row):
            if value is None or value == "":
                skipped[f"{field} null or empty"] += 1
            elif not isinstance(value, str):
                raise DataError(f"{source}: row {row}: field {field!r} is {value!r:.40} ({type(value).__name__}), "
                                "not a string")  # fmt: skip
            else:
                kept.append(row)
                texts.append(value)
        return kept, texts

    def _prompt_response(self, rows, first_row, source, skipped):
        prompt_field, response_field = self.data.prompt_field, self.data.response_field
        kept, responses = self._texts(rows[response_field], response_field, first_row, source, skipped)
        prompts = [rows[prompt_field][row - first_row] for row in kept]
        for row, prompt in zip(kept, prompts):
            if prompt is not None and not isinstance(prompt, str):
                raise DataError(f"{source}: row {row}: field {prompt_field!r} is {prompt!r:.40}, not a string")
        prompts = [p or "" for p in prompts]
        documents, masks = [], []
        for prompt_ids, response_ids in zip(self.ids(prompts), self.ids(responses)):
            context, target = self.prefix + prompt_ids, response_ids + self.suffix
            documents.append(context + target)
            masks.append(np.concatenate([np.zeros(len(context)), np.ones(len(target))]))
        return documents, masks, kept

    def _messages(self, rows, first_row, source, skipped):
        conversations = []
        for row, messages in enumerate(rows[self.data.messages_field], start=first_row):
            if messages is None:
                skipped[f"{self.data.messages_field} null"] += 1
                continue
            conversations.append((row, check_messages(messages, where=f"{source}: row {row}")))
        documents, masks, kept = self._chats(conversations, source, skipped)
        return documents, masks, kept

    def _chats(self, conversations, source, skipped, *, last_turn_only: bool = False):
        """Token ids and loss masks of ``conversations`` ((row, messages) pairs), the loss on the assistant turns (or
        the last one only); the rows kept. A conversation that cannot be trained on is skipped and counted."""
        if conversations and self.data.chat_template is None and not self.tokenizer.chat_template:
            raise DataError(f"{source}: the tokenizer has no chat template; give one in data.chat_template")
        rendered, kept = [], []
        for row, messages in conversations:
            where = f"{source}: row {row}"
            chat = render_with_assistant_spans(self.tokenizer, messages, template=self.data.chat_template, where=where)
            if chat.untrained_turns and not last_turn_only:
                skipped["note: assistant turns that open a conversation (context, not trained)"] += chat.untrained_turns
            if not chat.assistant_spans:
                skipped["no assistant turn"] += 1
                continue
            if last_turn_only:
                chat = chat._replace(assistant_spans=chat.assistant_spans[-1:])
            spans = []  # the contents that hold special-token text (rare): they are tokenized as text below
            search = self.special_text.search if self.special_text else lambda _: None
            flagged = [index for index, message in enumerate(messages) if search(message["content"])]
            if flagged:
                spans = content_spans(self.tokenizer, messages, flagged, template=self.data.chat_template,
                                      text=chat.text)  # fmt: skip
                if spans is None:
                    skipped["special-token text in a message the chat template changes"] += 1
                    continue
            rendered.append((chat, spans))
            kept.append(row)
        documents, masks = [], []
        for (chat, spans), ids, starts in zip(rendered, *self.with_offsets([c.text for c, _ in rendered], markup=True)):
            if spans:
                ids, starts = self._specials_as_text(ids, starts, spans)
            masks.append(np.any([(starts >= a) & (starts < b) for a, b in chat.assistant_spans], axis=0))
            documents.append(ids)
        return documents, masks, kept

    def _preference(self, rows, first_row, source, skipped):
        """Two documents per kept row, the chosen completion's then the rejected one's (pack keeps them together), each
        with the loss on its completion only; ``kept`` names the row of each document."""
        data = self.data
        texts, chats = [], []  # (row, prompt, chosen, rejected) of plain-text rows; (row, side, messages) of chat rows
        prompts = rows[data.prompt_field] if data.prompt_field is not None else [None] * len(rows[data.chosen_field])
        for row, (prompt, chosen, rejected) in enumerate(
            zip(prompts, rows[data.chosen_field], rows[data.rejected_field]), start=first_row
        ):
            pair = _check_pair(prompt, chosen, rejected, where=f"{source}: row {row}", data=data)
            if isinstance(pair, str):
                skipped[pair] += 1
            elif isinstance(pair[1], str):
                texts.append((row, *pair))
            else:
                chats += [(row, "chosen", pair[1]), (row, "rejected", pair[2])]
        documents, masks, kept = [], [], []
        if texts:
            prompt_ids = self.ids([prompt for _, prompt, _, _ in texts])
            sides = self.ids([text for _, _, chosen, rejected in texts for text in (chosen, rejected)])
            for i, (row, *_) in enumerate(texts):
                context = self.prefix + prompt_ids[i]
                for completion in sides[2 * i : 2 * i + 2]:
                    target = completion + self.suffix
                    documents.append(context + target)
                    masks.append(np.concatenate([np.zeros(len(context)), np.ones(len(target))]))
                    kept.append(row)
        if chats:
            chat_documents, chat_masks, chat_rows = self._chats([(row, messages) for row, _, messages in chats],
                                                                source, skipped, last_turn_only=True)  # fmt: skip
            # A pair whose one side was skipped is dropped whole: a completion is trained only against its pair.
            whole = {row for row in chat_rows if chat_rows.count(row) == 2}
            for document, mask, row in zip(chat_documents, chat_masks, chat_rows):
                if row in whole:
                    documents.append(document)
                    masks.append(mask)
                    kept.append(row)
            if halves := len(set(chat_rows) - whole):
                skipped["pair with a side that cannot be trained on"] += halves
        order = np.argsort(kept, kind="stable")  # the rows in the order they came, each's chosen before its rejected
        return [documents[i] for i in order], [masks[i] for i in order], [kept[i] for i in order]

    def _specials_as_text(self, ids: list[int], starts: np.ndarray, spans: list[tuple[int, int]]):
        """The rendered chat's tokens with every special token that stands inside a message's content replaced by the
        tokens of its text. The template's markup keeps its special tokens; the rest is tokenized as at inference."""
        inside = np.isin(ids, self.special_ids) & np.any([(starts >= a) & (starts < b) for a, b in spans], axis=0)
        pieces = [[t] if not replace else self.as_text[t] for t, replace in zip(ids, inside.tolist())]
        new_starts = np.repeat(starts, [len(p) for p in pieces])
        return [t for piece in pieces for t in piece], new_starts


def _check_pair(prompt, chosen, rejected, *, where: str, data: DataConfig):
    """A preference row as (prompt, chosen, rejected): strings (prompt "" when there is none), or two conversations
    ending in the assistant's turn and sharing every turn before it (the prompt's turns, when the prompt is a list of
    messages or a string, are put before sides that hold the last turn alone; sides with turns of their own keep
    them, and the prompt is not repeated). A skip reason for a row that has nothing to train on; a
    DataError for one that is malformed."""
    fields = {data.chosen_field: chosen, data.rejected_field: rejected}
    if any(value is None or value == "" or value == [] for value in fields.values()):
        return "chosen or rejected null or empty"
    if all(isinstance(value, str) for value in fields.values()):
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: field {data.prompt_field!r} is {prompt!r:.40}: with string completions, the "
                            "prompt must be a string")  # fmt: skip
        return "chosen and rejected identical" if chosen == rejected else (prompt or "", chosen, rejected)
    if not all(isinstance(value, list) for value in fields.values()):
        raise DataError(f"{where}: {data.chosen_field!r} and {data.rejected_field!r} must both be strings or both be "
                        f"lists of messages, got {type(chosen).__name__} and {type(rejected).__name__}")  # fmt: skip
    if isinstance(prompt, str) and prompt:
        prompt = [{"role": "user", "content": prompt}]
    if len(chosen) > 1 or len(rejected) > 1:  # the sides carry their prompt turns (UltraFeedback): not again
        prompt = None
    sides = [
        check_messages((prompt or []) + value, where=f"{where}: field {field!r}") for field, value in fields.items()
    ]
    for field, messages in zip(fields, sides):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {field!r} must end with the assistant's turn, not the "
                            f"{messages[-1]['role']}'s")  # fmt: skip
    if sides[0][:-1] != sides[1][:-1]:
        raise DataError(f"{where}: {data.chosen_field!r} and {data.rejected_field!r} must share every turn before "
                        "the last (the prompt), and they differ")  # fmt: skip
    if any(messages[-1]["content"] == "" for messages in sides):
        return "chosen or rejected null or empty"
    if sides[0][-1] == sides[1][-1]:
        return "chosen and rejected identical"
    return None, sides[0], sides[1]


def eval_rows(num_rows: int, *, fraction: float, seed: int) -> np.ndarray:
    """Which rows to hold out for evaluation: ``fraction`` of them (at least one), chosen with ``seed``."""
    if num_rows < 2:
        raise DataError(
            f"data.train has {num_rows} document; holding out an eval split (data.eval_fraction) needs at least 2"
        )
    held_out = np.zeros(num_rows, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(num_rows)[: max(1, round(fraction * num_rows))]] = True
    return held_out


def run_tokenize(
    *,
    model_dir: str | Path,
    data: DataConfig,
    output_dir: str | Path,
    trust_remote_code: bool = False,
    train_key: str = "data.train",
    hold_out: bool = True,
) -> dict[str, Any]:
    """Tokenizes ``data.train`` (and ``data.eval``, or a held-out part of train) into a DatasetDict at
    ``output_dir``. Returns the statistics also written to ``output_dir/stats.json``.

    For one source of a mixture, ``train_key`` is its config key (``data.train[2]``) and ``hold_out`` False leaves its eval
    split empty (another source's job tokenizes ``data.eval``).
    """  # fmt: skip
    check_model_dir(model_dir)
    output_dir = Path(output_dir)
    encoder = Encoder(load_tokenizer(model_dir, trust_remote_code=trust_remote_code), data)
    columns = ["input_ids", "loss_mask"] if encoder.with_mask else ["input_ids"]
    start = time.perf_counter()
    with partial_dir(output_dir) as tmp:
        writers = {split: ColumnsWriter(tmp / f"{split}.arrow", columns) for split in ("train", "eval")}
        stats: dict[str, Any] = {split: Counter() for split in writers}
        for key, path in ((train_key, data.train), ("data.eval", data.eval)):
            if path is None:
                continue
            documents = load_documents(path, cache_dir=tmp, key=key, split=data.split, text_field=data.text_field)
            require_fields(path, documents.column_names, data.fields)
            held_out = None
            if key != "data.eval" and data.eval is None and hold_out:
                held_out = eval_rows(len(documents), fraction=data.eval_fraction, seed=data.split_seed)
            try:
                _encode_source(documents.select_columns(list(data.fields)), encoder, writers, stats, key=key,
                               source=str(path), held_out=held_out, batch_size=data.tokenize_batch_size)  # fmt: skip
            except UnicodeDecodeError as error:
                locate_non_utf8(Path(path))  # names the file and line
                raise DataError(f"{path}: holds text that is not UTF-8 ({error})") from error
            _count_missing_fields(Path(path), data, stats["eval" if key == "data.eval" else "train"])
        tokenized = datasets.DatasetDict({split: writer.finish() for split, writer in writers.items()})
        seconds = time.perf_counter() - start
        for split in writers:
            if len(tokenized[split]) == 0 and (split == "train" or hold_out or data.eval is not None):
                skips = stats["train"] + stats["eval"]  # held-out rows are counted with train, where they were read
                raise DataError(f"no {split} rows left after skipping: {_describe(skips)}")
        # A source of a mixture with data.eval has no eval split of its own (the first source's job reads the file).
        # It is left out: datasets writes no data file for an empty split, and then cannot load the DatasetDict.
        datasets.DatasetDict({split: rows for split, rows in tokenized.items() if len(rows)}).save_to_disk(
            str(output_dir)
        )
    return _finish_stats(stats, seconds, output_dir, model_dir=model_dir, data=data, trust=trust_remote_code)


def _encode_source(documents, encoder, writers, stats, *, key, source, held_out, batch_size) -> None:
    split = "eval" if key == "data.eval" else "train"
    progress = Progress(len(documents), desc=f"tokenize {Path(source).name}", unit="rows")

    def encode(first: int):
        skipped: Counter = Counter()
        return (*encoder.encode(documents[first : first + batch_size], first + 1, source, skipped), skipped)

    # The next batch is encoded in a second thread (the Rust tokenizer releases the GIL) while this one is written.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(encode, 0)
        for first in range(0, len(documents), batch_size):
            ids, masks, kept, skipped = pending.result()
            if first + batch_size < len(documents):
                pending = pool.submit(encode, first + batch_size)
            _route(ids, masks, kept, skipped, encoder, writers, stats, split=split, held_out=held_out)
            progress.update(min(batch_size, len(documents) - first))
    progress.close()


def _count_missing_fields(path: Path, data: DataConfig, stats: Counter) -> None:
    """Tells rows that lack a field from rows where it is null or empty: the loader makes both null."""
    nulls = {field: f"skipped: {field} null or empty" for field in data.fields}
    nulls[data.messages_field] = f"skipped: {data.messages_field} null"
    if not any(stats.get(key) for key in nulls.values()):
        return  # no null at all: nothing is missing
    for field, missing in count_missing_fields(path, list(data.fields)).items():
        if missing and stats.get(nulls[field]):
            stats[nulls[field]] -= missing
            stats[f"skipped: {field} missing"] += missing
            if not stats[nulls[field]]:
                del stats[nulls[field]]


def _route(ids, masks, kept, skipped, encoder, writers, stats, *, split, held_out) -> None:
    """Writes a batch's documents to the split each belongs to, and counts what was skipped."""
    kept = np.asarray(kept, dtype=np.int64) - 1
    targets = np.full(len(kept), split, dtype=object) if held_out is None else np.where(held_out[kept], "eval", "train")
    for target in ("train", "eval"):
        chosen = np.flatnonzero(targets == target)
        stats[target]["documents"] += len(chosen)
        if len(chosen):
            _write(writers[target], [ids[i] for i in chosen], None if masks is None else [masks[i] for i in chosen],
                   stats[target], (encoder.prefix, encoder.suffix))  # fmt: skip
    stats[split].update({r.removeprefix("note: ") if r.startswith("note: ") else f"skipped: {r}": n
                         for r, n in skipped.items()})  # fmt: skip


def _write(writer: ColumnsWriter, ids: list[list[int]], masks: list[np.ndarray] | None, stats: Counter,
           boundaries: tuple[list[int], list[int]]) -> None:  # fmt: skip
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    values = {"input_ids": np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))}
    if masks is None:  # text: frame each document with BOS/EOS here, vectorised, rather than list by list
        values["input_ids"], lengths = frame(values["input_ids"], lengths, *boundaries)
        stats["loss_tokens"] += int(lengths.sum())
    else:
        values["loss_mask"] = np.concatenate(masks).astype(np.uint8)
        stats["loss_tokens"] += int(values["loss_mask"].sum())
    writer.write(lengths, **values)
    stats["tokens"] += int(lengths.sum())


def frame(
    values: np.ndarray, lengths: np.ndarray, prefix: list[int], suffix: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Puts ``prefix`` before and ``suffix`` after each of the concatenated documents in ``values``."""
    framed_lengths = lengths + len(prefix) + len(suffix)
    starts = np.cumsum(framed_lengths) - framed_lengths
    framed = np.empty(int(framed_lengths.sum()), dtype=values.dtype)
    framed[ranges(starts + len(prefix), lengths)] = values
    for i, token in enumerate(prefix):
        framed[starts + i] = token
    for i, token in enumerate(suffix):
        framed[starts + len(prefix) + lengths + i] = token
    return framed, framed_lengths


def _describe(counts: Counter) -> str:
    skips = {k.removeprefix("skipped: "): v for k, v in counts.items() if k.startswith("skipped")}
    return ", ".join(f"{n} rows {reason}" for reason, n in skips.items()) or "no rows were read"


def _finish_stats(stats, seconds, output_dir: Path, *, model_dir, data: DataConfig, trust: bool) -> dict[str, Any]:
    result: dict[str, Any] = {split: dict(counts) for split, counts in stats.items()}
    num_tokens = sum(s.get("tokens", 0) for s in result.values())
    if data.mode == "preference":
        for split in ("train", "eval"):
            result[split]["pairs"] = result[split].get("documents", 0) // 2
    result.update(mode=data.mode, seconds=round(seconds, 3), tokens_per_second=round(num_tokens / max(seconds, 1e-9)))
    (output_dir / "stats.json").write_text(json.dumps(result, indent=2) + "\n")
    write_stage_config(output_dir, {"model": str(model_dir), "trust_remote_code": trust, "data": data})
    for split in ("train", "eval"):
        log.info("%s: %s documents, %s tokens, %s with loss%s", split, f"{result[split].get('documents', 0):,}",
                 f"{result[split].get('tokens', 0):,}", f"{result[split].get('loss_tokens', 0):,}",
                 f"; skipped {_describe(stats[split])}" if any(k.startswith("skipped") for k in stats[split]) else "")  # fmt: skip
    log.info(
        "tokenized %s tokens in %.1f s (%s tokens/s)", f"{num_tokens:,}", seconds, f"{result['tokens_per_second']:,}"
    )
    return result
