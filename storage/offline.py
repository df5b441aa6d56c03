"""Offline mode: nothing in plora reaches for a model hub or reports usage anywhere.

Hugging Face's libraries read their offline flags from the environment once, when first
imported, and so do Flower's and Ray's telemetry switches. Every plora entry point (the CLI,
the Flower apps, and the tests) therefore calls `go_offline()` before anything imports them;
every process it starts inherits the flags. Weights and tokenizers load from local files only
(`local_files_only=True`) besides, so this guards what loading alone would not: telemetry,
update checks and any library call that would otherwise try the network.
"""

from __future__ import annotations

import os
import sys

from plora.storage.errors import ConfigError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def go_offline() -> None:
    """Set the offline flags in this process's environment, for it and every process it starts.

    Raises ConfigError if huggingface_hub was imported before, online: its flag is fixed then,
    so the caller is not an entry point that runs first, and the guarantee would not hold.
    """
    os.environ.update(OFFLINE_ENV)
    # plora reports its own progress; per-step bars of the libraries' internals are noise.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and not hub.HF_HUB_OFFLINE:
        raise ConfigError(
            "huggingface_hub was imported before plora went offline, without HF_HUB_OFFLINE=1, so it may reach "
            "the Hub; call plora.storage.offline.go_offline() first thing in the program, before importing "
            "transformers, datasets or huggingface_hub (or set HF_HUB_OFFLINE=1 in the environment)"
        )
