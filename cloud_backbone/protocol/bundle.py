"""A backbone version's device half (its "bundle": tokenizer, embeddings, LM head, device
layers), streamed from the service to a device in chunks and checked against its digest.

What arrives is written to a staging folder and replaces the device's copy only once the
digest matches: a device never runs on a half-received or tampered bundle.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from plora.cloud_backbone.protocol import split_pb2 as pb
from plora.storage.errors import ValidationError

_BUNDLE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")

def _check_name(name: str) -> None:
    if not _BUNDLE_NAME.fullmatch(name) or name.startswith("."):
        raise ValidationError(f"bundle file name {name!r} is not a plain name ([A-Za-z0-9._-], 1-128, no leading '.')")


def _bundle_files(folder: Path) -> list[Path]:
    # is_file() follows symlinks on purpose: Hugging Face snapshot folders are links into a blob store.
    files = sorted((p for p in Path(folder).iterdir() if p.is_file()), key=lambda p: p.name)
    for p in files:
        _check_name(p.name)  # fail when packing, not only when the device unpacks
    return files


def bundle_digest(folder: Path) -> tuple[str, int]:
    """(sha256, total bytes) over the folder's files sorted by name: name, NUL, 8-byte LE size, bytes.

    The size makes the encoding unambiguous: without it, moving the bytes that follow one file's
    end into that file ("a" = X + "b\\0" + Y instead of a = X, b = Y) would keep the digest.
    """
    digest, total = hashlib.sha256(), 0
    for path in _bundle_files(folder):
        size = path.stat().st_size
        digest.update(path.name.encode() + b"\0" + size.to_bytes(8, "little"))
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        total += size
    return digest.hexdigest(), total


def chunked_bundle(folder: Path, chunk_size: int) -> Iterator[pb.BundleChunk]:
    """Every file of `folder`, sorted by name, in chunks of at most chunk_size bytes."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for path in _bundle_files(folder):
        with path.open("rb") as fh:
            data = fh.read(chunk_size)
            while True:  # read one ahead so the final chunk (even of an empty file) says last=True
                following = fh.read(chunk_size)
                yield pb.BundleChunk(file=path.name, data=data, last=not following)
                if not following:
                    break
                data = following


def receive_bundle(chunks: Iterable[pb.BundleChunk], folder: Path, expected_sha256: str, max_bytes: int) -> None:
    """Write a bundle stream into `folder`, all or nothing.

    The files land in a staging folder next to `folder`, which replaces `folder` only once the
    digest matches; on any error the staging folder is removed and `folder` is left as it was.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    current, handle, total, seen = None, None, 0, set()
    try:
        for chunk in chunks:
            if current is None:
                _check_name(chunk.file)
                if chunk.file in seen:
                    raise ValidationError(f"bundle file {chunk.file!r} is sent twice")
                seen.add(chunk.file)
                current, handle = chunk.file, (staging / chunk.file).open("xb")
            elif chunk.file != current:
                raise ValidationError(f"bundle chunk for {chunk.file!r} arrived before the last chunk of {current!r}")
            total += len(chunk.data)
            if total > max_bytes:
                raise ValidationError(f"bundle is over {max_bytes} bytes (at least {total} received)")
            handle.write(chunk.data)
            if chunk.last:
                handle.close()
                current, handle = None, None
        if current is not None:
            raise ValidationError(f"bundle stream ended inside {current!r} (no chunk with last=True)")
        digest, _ = bundle_digest(staging)
        if digest != expected_sha256.lower():
            raise ValidationError(f"bundle digest is {digest}; expected {expected_sha256}")
        if folder.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            folder.rename(old / folder.name)
            try:
                staging.rename(folder)
            except BaseException:
                (old / folder.name).rename(folder)  # put the previous bundle back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(folder)
    except BaseException:
        if handle is not None:
            handle.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
