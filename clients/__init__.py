"""The device runtime: the device half of the split, training and generation on it."""
