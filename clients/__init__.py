"""The device runtime: the device half of the split, training and generation on it."""

import plora.storage  # noqa: F401  (forces offline mode before any Hugging Face import)
