"""The cloud half: the frozen backbone, PrivateLoRA math, the split protocol and the service."""
