"""The user's private training data: loading, validation, tokenization and batching.

A file holds either plain texts (`text`) or instruction pairs (`prompt` + `response`):
JSON lines (`.jsonl`/`.json`), CSV with a header (`.csv`), or one plain text (`.txt`).
Everything is validated before `datasets` sees it, so a bad file fails with a message that
points at the line and says how to fix it. The data never leaves the device, and loading
never touches the network.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch

from plora.storage.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (PyTorch cross-entropy's default)
ACCEPTED = "each example needs a 'text' field, or both a 'prompt' and a 'response' field ('question' and 'answer' also do)"
PERSONALIZE_MAX_LENGTH = 256
"""Tokens per example of a user's own file in `plora personalize` (its --max-length)."""
DEVICE_JOB_MAX_LENGTH = 128
"""Tokens per example in the jobs the platform runs on a device's own records (fleet rounds,
migration, the persona benchmarks, the demo), which are short notes and question/answer pairs
(`tokenize` cuts a longer text into pieces and truncates a longer pair). `plora personalize`
has its own --max-length."""
_EXAMPLE = '{"text": "..."} or {"prompt": "...", "response": "..."}'
_FIELDS = {"text": ("text",), "prompt/response": ("prompt", "response")}
T = TypeVar("T")


@dataclass
class TokenizedExample:
    """One training sequence; labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def _quote(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _record(path: Path, where: str, obj: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(format name, the example's fields) of one JSON object or CSV row, validated."""
    if "prompt" not in obj and "response" not in obj and ("question" in obj or "answer" in obj):
        # The common question/answer schema (GSM8K's, for one) is a prompt and a response.
        obj = {**obj, "prompt": obj.get("question"), "response": obj.get("answer")}
    has_text = obj.get("text") is not None
    has_pair = obj.get("prompt") is not None or obj.get("response") is not None
    if has_text and has_pair:
        raise DataError(f"{path}, {where}: has both 'text' and 'prompt'/'response'; keep one format per example")
    kind = "text" if has_text or not has_pair else "prompt/response"
    for name in _FIELDS[kind]:
        value = obj.get(name)
        if value is None:
            raise DataError(f"{path}, {where}: missing field {name!r}; {ACCEPTED}, e.g. {_EXAMPLE}")
        if not isinstance(value, str):
            raise DataError(
                f"{path}, {where}: field {name!r} is {type(value).__name__} {_quote(str(value))}, expected a string; "
                "quote the value"
            )
    return kind, {name: obj[name] for name in _FIELDS[kind]}


def _collect(path: Path, rows: Iterator[tuple[str, dict[str, Any]]]) -> list[dict[str, str]]:
    """Validate every row and insist that one file uses one format."""
    records: list[dict[str, str]] = []
    first: tuple[str, str] | None = None
    for where, obj in rows:
        kind, record = _record(path, where, obj)
        if first is None:
            first = (kind, where)
        elif kind != first[0]:
            raise DataError(
                f"{path} mixes formats: {first[1]} is a {first[0]} example but {where} is a {kind} example; "
                "use one format per file (split it into two files)"
            )
        records.append(record)
    return records


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({err.msg}): {_quote(line)}; "
                f"the file must be JSON lines, one object per line such as {_EXAMPLE}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, got {type(obj).__name__} {_quote(line)}; "
                f"write one object per line such as {_EXAMPLE}"
            )
        yield f"line {number}", obj


def _csv_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if "text" not in header and not {"prompt", "response"} & set(header):
            raise DataError(
                f"{path}, line 1: the header {header} has neither a 'text' column nor 'prompt' and "
                "'response' columns; the first line must name the columns: text, or prompt,response"
            )
        for row in reader:
            yield f"line {reader.line_num}", row
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err}); check the quoting") from None


def _txt_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "the file", {"text": text}


_READERS = {".jsonl": _jsonl_rows, ".json": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}


def load_examples(path: str | os.PathLike) -> datasets.Dataset:
    """Load a private data file as a Dataset with columns `text`, or `prompt` and `response`."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix or '(no extension)'!r}; "
            f"use one of {', '.join(_READERS)} (JSON lines, CSV with a header, or plain text)"
        )
    if not path.is_file():
        raise DataError(f"no data file at {path}; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); re-save it with UTF-8 encoding") from None
    if not text.strip():
        raise DataError(f"{path} is empty; add examples ({ACCEPTED})")
    records = _collect(path, reader(path, text))
    if not records:
        raise DataError(f"{path} has no usable examples; {ACCEPTED}")
    return datasets.Dataset.from_list(records)


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no end-of-sequence token")
    return tokenizer.eos_token_id


def _pair_ids(tokenizer: Any, prompt: str, response: str, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids); their concatenation is the training sequence."""
    if not chat:
        return _encode(tokenizer, prompt + "\n", True), _encode(tokenizer, response, False) + [_eos(tokenizer)]
    user = {"role": "user", "content": prompt}
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": response}], tokenize=False)
    head = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    if not full.startswith(head):
        raise DataError(
            f"the tokenizer's chat template renders the prompt {_quote(prompt)} differently with and without "
            "the response, so the response cannot be located; pass use_chat_template=False"
        )
    # Separate encodings: exactly what inference sees (encoded prompt, then generated tokens).
    # The template output already carries its special tokens.
    return _encode(tokenizer, head, False), _encode(tokenizer, full[len(head) :], False)


def tokenize(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int, use_chat_template: bool | None = None
) -> list[TokenizedExample]:
    """Turn examples into training sequences of at most `max_length` tokens.

    prompt/response: loss on the response only, formatted with the chat template when the
    tokenizer has one (unless use_chat_template=False). text: the text plus end-of-sequence,
    cut into chunks of max_length, every token labelled.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}")
    columns = set(dataset.column_names)
    out: list[TokenizedExample] = []
    if "text" in columns:
        for text in dataset["text"]:
            ids = _encode(tokenizer, text, True) + [_eos(tokenizer)]
            # A one-token chunk has no next token to predict.
            chunks = (ids[i : i + max_length] for i in range(0, len(ids), max_length))
            out.extend(TokenizedExample(list(c), list(c)) for c in chunks if len(c) > 1)
    elif {"prompt", "response"} <= columns:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ConfigError(f"use_chat_template=True but tokenizer {type(tokenizer).__name__} has no chat template")
        chat = has_template if use_chat_template is None else use_chat_template
        dropped = 0
        for prompt, response in zip(dataset["prompt"], dataset["response"], strict=True):
            prompt_ids, response_ids = _pair_ids(tokenizer, prompt, response, chat)
            ids = (prompt_ids + response_ids)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1
                continue
            out.append(TokenizedExample(ids, labels))
        if dropped:
            log.warning("dropped %d examples whose prompt fills max_length=%d; raise max_length", dropped, max_length)
    else:
        raise DataError(f"dataset columns {sorted(columns)} are not usable; {ACCEPTED}")
    if not out:
        raise DataError(f"no usable training sequences with max_length={max_length}; raise max_length or add data")
    return out


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad into (input_ids, labels), both LongTensor (B, T); padding is never labelled.

    No attention mask is needed: with right padding and causal attention no real token can
    see a pad, and pads carry no loss.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, : len(example.labels)] = torch.tensor(example.labels, dtype=torch.long)
    return input_ids, labels


def padding_mask(examples: Sequence[TokenizedExample]) -> torch.Tensor | None:
    """The (B, T) int64 attention mask of `collate`'s batch: 1 at each example's tokens, 0 at the
    padding after them; None when it has no padding. Attention needs none (collate), but a pass
    that sends it has the service exchange nothing for the padding
    (cloud_backbone.batching.real_positions)."""
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    width = int(lengths.max())
    return (torch.arange(width)[None, :] < lengths[:, None]).long() if bool((lengths < width).any()) else None


def batches(examples: Sequence[T], batch_size: int, seed: int, epochs: int) -> Iterator[list[T]]:
    """Shuffled batches for `epochs` passes; the same seed gives the same order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]
