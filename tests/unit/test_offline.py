"""Every plora process is offline before it imports Hugging Face's libraries, which read their
offline flag once, on import. Here the tests' own process; the processes other tests start
anyway are checked where they run (the `offline_probe` fixture): `plora` commands in
test_recovery, Flower's app processes and Ray's workers in test_fleet."""

from __future__ import annotations

import datasets.config
import huggingface_hub
import pytest
import transformers.utils.hub

from plora.storage.errors import ConfigError
from plora.storage.offline import go_offline


def test_the_test_process_is_offline():
    assert huggingface_hub.is_offline_mode() and transformers.utils.hub.is_offline_mode() and datasets.config.HF_HUB_OFFLINE


def test_going_offline_after_hugging_face_was_imported_online_is_refused(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError, match="imported before plora went offline"):
        go_offline()

