"""The user's private data: loading and validation, tokenization with masking, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plora.clients.data import IGNORE_INDEX, TokenizedExample, batches, collate, load_examples, tokenize
from plora.storage.errors import DataError

PAIRS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Say hi", "response": "Hello there, friend!"},
]


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("a.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 7}\n', [{"text": "one"}, {"text": "two"}]),
        (
            "a.jsonl",
            '{"prompt": "What is the capital of France?", "response": "Paris."}\n'
            '{"prompt": "Say hi", "response": "Hello there, friend!"}\n',
            PAIRS,
        ),
        ("a.json", '{"text": "json extension"}\n', [{"text": "json extension"}]),
        (
            "a.jsonl",
            '{"question": "What is the capital of France?", "answer": "Paris."}\n'
            '{"question": "Say hi", "answer": "Hello there, friend!"}\n',
            PAIRS,
        ),
        ("a.csv", 'prompt,response\n"What is the capital of France?",Paris.\nSay hi,"Hello there, friend!"\n', PAIRS),
        ("a.csv", 'text\n"multi\nline"\nsecond\n', [{"text": "multi\nline"}, {"text": "second"}]),
        ("a.txt", "A whole diary.\nSecond line.\n", [{"text": "A whole diary.\nSecond line.\n"}]),
    ],
    ids=["jsonl-text", "jsonl-prompt-response", "json", "jsonl-question-answer", "csv-prompt-response", "csv-text", "txt"],
)
def test_supported_files_load_as_datasets(tmp_path: Path, name: str, content: str, expected: list[dict]) -> None:
    dataset = load_examples(write(tmp_path, name, content))
    assert dataset.column_names == list(expected[0])
    assert dataset.to_list() == expected


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("a.jsonl", "", ["empty"]),
        ("a.jsonl", "\n  \n", ["empty"]),
        ("a.csv", "text\n", ["no usable examples"]),
        ("a.jsonl", '{"text": "ok"}\n{"text": "broken\n', ["line 2", "not valid JSON", '{"text": "broken']),
        ("a.jsonl", '{"text": "ok"}\n["a list"]\n', ["line 2", "JSON object"]),
        ("a.jsonl", '{"prompt": "only a prompt"}\n', ["line 1", "'response'", "'text'"]),
        ("a.jsonl", '{"body": "wrong name"}\n', ["line 1", "missing field 'text'", "'prompt'"]),
        ("a.csv", "body\nhello\n", ["line 1", "'text'", "prompt,response"]),
        ("a.csv", "prompt,response\nonly a prompt\n", ["line 2", "'response'"]),
        ("a.jsonl", '{"text": 42}\n', ["line 1", "'text'", "int", "string"]),
        ("a.jsonl", '{"prompt": "p", "response": ["r"]}\n', ["'response'", "list"]),
        ("a.jsonl", '{"text": "a"}\n{"prompt": "p", "response": "r"}\n', ["mixes formats", "line 1", "line 2"]),
        ("a.jsonl", '{"text": "a", "prompt": "p", "response": "r"}\n', ["both"]),
        ("a.parquet", "irrelevant", ["unknown file type", ".jsonl"]),
        ("noext", "irrelevant", ["unknown file type"]),
    ],
    ids=[
        "empty", "blank-lines", "csv-header-only", "malformed-json", "not-an-object", "missing-response",
        "missing-text", "csv-bad-header", "csv-short-row", "non-string", "non-string-response", "mixed-formats",
        "ambiguous", "unknown-extension", "no-extension",
    ],
)
def test_bad_input_is_refused_with_a_pointed_message(tmp_path: Path, name: str, content: str, fragments) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data file"):
        load_examples(tmp_path / "absent.jsonl")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match="UTF-8"):
        load_examples(path)


def _labelled(example: TokenizedExample) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def _pairs_dataset(tmp_path: Path):
    return load_examples(write(tmp_path, "p.csv", 'prompt,response\n"What is the capital of France?",Paris.\n'
                                                  'Say hi,"Hello there, friend!"\n'))


def test_chat_template_masks_prompt_and_labels_response(tmp_path: Path, smol_tokenizer) -> None:
    examples = tokenize(_pairs_dataset(tmp_path), smol_tokenizer, max_length=256)
    for example, pair in zip(examples, PAIRS, strict=True):
        assert len(example.input_ids) == len(example.labels)
        # Labelled tokens are exactly the tail: the prompt is a masked prefix.
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in example.labels[:first])
        assert example.labels[first:] == example.input_ids[first:]
        assert smol_tokenizer.decode(_labelled(example)) == pair["response"] + "<|im_end|>\n"
        # The masked prefix is the chat-formatted prompt, ending with the assistant header.
        assert smol_tokenizer.decode(example.input_ids[:first]).endswith(pair["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_chat_sequence_is_the_rendered_template(tmp_path: Path, smol_tokenizer) -> None:
    example = tokenize(_pairs_dataset(tmp_path), smol_tokenizer, max_length=256)[0]
    messages = [{"role": "user", "content": PAIRS[0]["prompt"]}, {"role": "assistant", "content": PAIRS[0]["response"]}]
    assert smol_tokenizer.decode(example.input_ids) == smol_tokenizer.apply_chat_template(messages, tokenize=False)


def test_plain_format_masks_prompt_and_ends_with_eos(tmp_path: Path, smol_tokenizer) -> None:
    examples = tokenize(_pairs_dataset(tmp_path), smol_tokenizer, max_length=256, use_chat_template=False)
    for example, pair in zip(examples, PAIRS, strict=True):
        assert smol_tokenizer.decode(_labelled(example)) == pair["response"] + smol_tokenizer.eos_token
        assert smol_tokenizer.decode(example.input_ids) == pair["prompt"] + "\n" + pair["response"] + smol_tokenizer.eos_token


def test_pairs_are_truncated_to_max_length_and_unlabelled_ones_dropped(tmp_path: Path, smol_tokenizer) -> None:
    full = tokenize(_pairs_dataset(tmp_path), smol_tokenizer, max_length=256)
    prompt_len = [len(e.labels) - len(_labelled(e)) for e in full]
    cut = prompt_len[1] + 2  # the second example keeps two response tokens; the first keeps none
    assert prompt_len[0] >= cut
    examples = tokenize(_pairs_dataset(tmp_path), smol_tokenizer, max_length=cut)
    assert len(examples) == 1
    assert len(examples[0].input_ids) == cut and len(_labelled(examples[0])) == 2


@pytest.mark.parametrize("max_length", [2, 5, 16, 1000])
def test_text_chunks_cover_all_tokens_and_respect_max_length(tmp_path: Path, smol_tokenizer, max_length: int) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = smol_tokenizer(text)["input_ids"] + [smol_tokenizer.eos_token_id]
    examples = tokenize(load_examples(write(tmp_path, "t.txt", text)), smol_tokenizer, max_length=max_length)
    assert all(1 < len(e.input_ids) <= max_length and e.labels == e.input_ids for e in examples)
    joined = [token for e in examples for token in e.input_ids]
    dropped_tail = len(ids) % max_length == 1  # a one-token remainder has nothing to predict
    assert joined == (ids[:-1] if dropped_tail else ids)


def test_text_one_token_tail_chunk_is_dropped(tmp_path: Path, smol_tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = smol_tokenizer(text)["input_ids"] + [smol_tokenizer.eos_token_id]
    examples = tokenize(load_examples(write(tmp_path, "t.txt", text)), smol_tokenizer, max_length=len(ids) - 1)
    assert [e.input_ids for e in examples] == [ids[:-1]]


def test_text_ends_with_eos(tmp_path: Path, smol_tokenizer) -> None:
    examples = tokenize(load_examples(write(tmp_path, "t.jsonl", '{"text": "hello world"}\n')), smol_tokenizer, 64)
    assert examples[0].input_ids[-1] == smol_tokenizer.eos_token_id


def test_collate_right_pads_with_unlabelled_padding() -> None:
    examples = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])]
    input_ids, labels = collate(examples, pad_id=0)
    assert input_ids.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batches_are_deterministic_and_cover_every_epoch() -> None:
    items = list(range(10))
    first = list(batches(items, batch_size=4, seed=1, epochs=2))
    assert first == list(batches(items, batch_size=4, seed=1, epochs=2))
    assert first != list(batches(items, batch_size=4, seed=2, epochs=2))
    assert [len(b) for b in first] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(first[:3], [])) == items and sorted(sum(first[3:], [])) == items
