"""The platform registry, and the ground every other layer stands on.

Every plora module imports from here first (the exception hierarchy lives here), which makes
this the one place to force offline mode before any Hugging Face library is imported:
nothing in plora may reach for a hub.
"""

import os

for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_flag] = "1"
# plora reports its own progress; per-step bars of the libraries' internals are noise.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
