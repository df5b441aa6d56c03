"""The split protocol between a device and the cloud half of its backbone.

- messages: every message of a step, as plora's own types;
- link: `SplitLink`, the interface training and generation use, and `InProcessLink`;
- wire: those messages as protobuf (split.proto), validated on the way in;
- bundle: a version's device half, streamed in chunks with its digest.
"""
