"""The offline probe: Python loads this at start-up in every process whose PYTHONPATH holds
this folder. With PLORA_OFFLINE_PROBE naming a folder, the moment the process first imports
huggingface_hub (which reads its offline flag then, once) it writes there whether the process
was offline by then, and if it was not, it refuses the import, so that the process fails
loudly instead of carrying on online. See the `offline_probe` fixture in tests/conftest.py.
"""

import importlib.abc
import json
import os
import sys


class _FirstHubImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "huggingface_hub":
            return None
        sys.meta_path.remove(self)
        flags = {flag: os.environ.get(flag) for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        offline = "1" in flags.values()
        record = {"pid": os.getpid(), "argv": sys.argv, "offline": offline, "flags": flags}
        with open(os.path.join(os.environ["PLORA_OFFLINE_PROBE"], f"{os.getpid()}.json"), "w") as out:
            json.dump(record, out)
        if not offline:
            raise ImportError(f"process {sys.argv} imported huggingface_hub before going offline ({flags})")
        return None  # the regular finders import it


if os.environ.get("PLORA_OFFLINE_PROBE"):
    sys.meta_path.insert(0, _FirstHubImport())
