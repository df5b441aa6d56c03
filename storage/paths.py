"""Where plora keeps its own files on this machine."""

import os
from pathlib import Path


def plora_home() -> Path:
    """$PLORA_HOME, or ~/.plora: the registry database and converted backbones live here."""
    home = Path(os.environ.get("PLORA_HOME") or Path.home() / ".plora").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
