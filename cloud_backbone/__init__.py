"""The cloud half: the frozen backbone, PrivateLoRA math, the split protocol and the service."""

import plora.storage  # noqa: F401  (forces offline mode before any Hugging Face import)
