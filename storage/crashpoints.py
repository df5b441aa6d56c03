"""Named places where a test can kill this process, to prove that a kill anywhere is survivable.

`crash_point(name)` sends SIGKILL to the current process when the environment variable
PLORA_CRASH_AT equals `name`, and does nothing otherwise (one dictionary look-up). SIGKILL,
not an exception: nothing may run after it (no `finally`, no `except`, no atexit), exactly as
when the kernel's OOM killer or a power cut ends a job.

A process dies at the first point of that name it reaches. Those of `plora personalize`,
in order:

    personalize:job-started           the job is recorded, before its first checkpoint
    mid-write:checkpoint.safetensors  the temp file is written, not yet renamed into place
    checkpoint-saved                  after a checkpoint (of personalization or distillation)
    personalize:trained               training done and checkpointed, the adapter not yet saved
    mid-write:adapter.safetensors     mid-save of the adapter
    personalize:adapter-saved         the new adapter is in place, the job not yet finished
    personalize:job-finished          the job is recorded as succeeded, its checkpoint not yet removed

Those of `plora migrate` (platform.migration), in order: mid-write:plan.json,
migrate:plan-written, migrate:job-started, mid-write:checkpoint.safetensors, checkpoint-saved
(distillation), mid-write:adapter.safetensors, migrate:adapter-verified, mid-write:device.json
(the staged record), migrate:staged, then for each file switched migrate:kept:<file> (the old
one kept) and migrate:switched:<file> (the new one in place), migrate:rebound,
migrate:job-finished.

`mid-write:<file name>` is reached inside every atomic write (storage.files.write_atomically),
between writing the temp file and renaming it, so a kill there leaves a stray temp file.
"""

from __future__ import annotations

import os
import signal

ENV = "PLORA_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
