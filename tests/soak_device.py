"""One device process of the soak (tests/integration/test_soak.py): several sessions per
enrolled device, each in a thread, decoding greedily and training until the time is up.

    python -m tests.soak_device SECONDS DEVICE_DIR [DEVICE_DIR ...] --sessions N

It prints one JSON object: the step latencies (seconds) and every error, with its session.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from plora.cloud_backbone.protocol.messages import CacheMode
from plora.platform.runtime import Device, open_device

PROMPT_TOKENS, NEW_TOKENS, TRAIN_TOKENS = 12, 8, 16


def run_session(device: Device, seed: int, until: float, latencies: list, errors: list) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = device.model.embed.num_embeddings
    try:
        while time.monotonic() < until:
            with torch.no_grad():
                started = time.monotonic()
                logits = device.model(torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=gen), CacheMode.START)
                latencies.append(time.monotonic() - started)
                for _ in range(NEW_TOKENS):
                    started = time.monotonic()
                    logits = device.model(logits[:, -1:].argmax(-1), CacheMode.EXTEND)
                    latencies.append(time.monotonic() - started)
            started = time.monotonic()
            ids = torch.randint(0, vocab, (2, TRAIN_TOKENS), generator=gen)
            loss = torch.nn.functional.cross_entropy(device.model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()  # the cloud's share of training; no update, so M stays the same
            device.model.zero_grad()
            latencies.append(time.monotonic() - started)
    except Exception as err:  # noqa: BLE001 - every failure is a finding of the soak
        errors.append(f"{device.store.root.name}/{seed}: {type(err).__name__}: {err}")
    finally:
        device.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("seconds", type=float)
    parser.add_argument("devices", nargs="+", type=Path)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Opened one after another: transformers' loading is not thread-safe (a model loaded while
    # another loads can get uninitialized weights).
    sessions = [open_device(directory) for directory in args.devices for _ in range(args.sessions)]
    until = time.monotonic() + args.seconds
    latencies: list[float] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=run_session, args=(device, i, until, latencies, errors)) for i, device in enumerate(sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"latencies": latencies, "errors": errors, "sessions": len(threads)}))


if __name__ == "__main__":
    main()
