"""The judge of issue 11's hostile-device suite: what the service answered, and whether that was right.

A hostile frame the service can still answer gets a gRPC status from MAPPED_STATUSES or a
StepError naming a plora exception (never INTERNAL, UNKNOWN or "InternalError"), of the kind
the attack expects, quoting at most MAX_ECHO characters of what it was sent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import grpc

from plora.cloud_backbone.protocol import split_pb2 as pb
from plora.storage import errors

MAPPED_STATUSES = frozenset(grpc.StatusCode[name] for name in (
    "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "NOT_FOUND", "UNAVAILABLE",
    "DEADLINE_EXCEEDED", "CANCELLED",
))
KNOWN_KINDS = frozenset(
    name for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, errors.PloraError)
) - {"InternalError"}
MAX_ECHO = 2000  # characters of an error; a client's 10,000-character string must be cut short
# The status each refusal ends a call with, as servicer.STATUS maps them (test_hostile checks
# that they agree); importing the servicer would load the whole service into the attackers' process.
STATUS_OF = {
    "ValidationError": "INVALID_ARGUMENT", "ConfigError": "INVALID_ARGUMENT", "SessionError": "FAILED_PRECONDITION",
    "VersionMismatchError": "FAILED_PRECONDITION", "CapacityError": "RESOURCE_EXHAUSTED", "AuthenticationError": "UNAUTHENTICATED",
    "RegistryError": "NOT_FOUND", "TransportError": "UNAVAILABLE",
}
VALID = frozenset({"ValidationError"})
SESSION = frozenset({"SessionError"})
CAPACITY = frozenset({"CapacityError"})
LATE = frozenset({"TransportError"})  # a reply later than its batch allows is taken out of the batch


@dataclass(frozen=True)
class Answer:
    """The service's answer to one hostile frame."""

    what: str  # "error" (a StepError), "status" (the call ended), "request", "result", "opened" or "silence"
    name: str = ""  # the StepError's kind or the status code's name
    fatal: bool = False
    detail: str = ""

    @property
    def names(self) -> set[str]:
        """The refusals this answer stands for: a status also names the errors mapped to it."""
        if self.what == "error":
            return {self.name}
        if self.what == "status":
            return {self.name} | {kind for kind, status in STATUS_OF.items() if status == self.name}
        return set()

    def __str__(self) -> str:
        fatal = " (fatal)" if self.fatal else ""
        return f"{self.what} {self.name}{fatal}: {self.detail[:300]!r}"


def answer_of(message: pb.CloudMessage | Answer) -> Answer:
    if isinstance(message, Answer):
        return message
    body = message.WhichOneof("body")
    if body == "error":
        return Answer("error", message.error.kind, message.error.fatal, message.error.message)
    if body == "request":
        return Answer("request", detail=f"layer {message.request.layer} {message.request.group[:40]}")
    return Answer("result" if body in ("forward", "backward") else str(body))


def verdict(answer: Answer, expect: frozenset[str] | None) -> str | None:
    """What is wrong with `answer` to a hostile frame, or None for a proper refusal (of a kind
    in `expect`, when given)."""
    if answer.what == "error":
        if answer.name not in KNOWN_KINDS:
            return f"StepError of no known kind: {answer}"
    elif answer.what == "status":
        if grpc.StatusCode[answer.name] not in MAPPED_STATUSES:
            return f"status outside the mapped set: {answer}"
    elif answer.what == "silence":
        return f"no answer within {answer.detail}"
    else:
        return f"accepted, the service answered with a {answer.what} {answer.detail}"
    if len(answer.detail) > MAX_ECHO:
        return f"the refusal quotes {len(answer.detail)} characters, over {MAX_ECHO}: {answer}"
    if expect and not answer.names & expect:
        return f"refused as {answer}; expected {' or '.join(sorted(expect))}"
    return None


@dataclass
class Report:
    """What a run of attacks found. `frames` counts hostile frames and requests, including the
    RST_STREAM or GOAWAY of a dropped stream; silent streams are counted apart."""

    seed: int
    frames: int = 0
    silent_streams: int = 0
    attacks: Counter = field(default_factory=Counter)
    findings: dict[str, list[str]] = field(default_factory=dict)
    close_latency_s: list[float] = field(default_factory=list)  # from dropping a session to reopening one
    flood_until: float = 0.0  # opens are refused for a while during a flood of silent streams
    # Many attackers at once load the service, and load may bring its own refusal first: a new
    # stream or call refused for the service's admission limits, a frame inside a step refused
    # because the attacker answered later than its batch allows, an attacker's own valid step
    # refused for either (`Busy`, counted in `load_refusals`). Attacking alone, all are findings.
    crowded: bool = False
    load_refusals: int = 0

    def expected(self, expect: frozenset[str] | None, admission: bool) -> frozenset[str] | None:
        """The refusals a hostile frame may get: `expect`, and in a crowded run those of load."""
        if not (expect and self.crowded):
            return expect
        return expect | (CAPACITY if admission else LATE)

    def find(self, kind: str, index: int, what: str) -> None:
        self.findings.setdefault(kind, []).append(f"attack {index}: {what}")

    def summary(self, examples: int = 2) -> str:
        lines = [f"seed {self.seed}: {len(self.findings)} of {len(self.attacks)} kinds went wrong"]
        for kind, found in sorted(self.findings.items()):
            lines.append(f"  {kind} ({len(found)} of {self.attacks[kind]}): " + " | ".join(found[:examples]))
        return "\n".join(lines)


class Broken(Exception):
    """A valid exchange an attack relies on failed: a finding of that attack."""


class Busy(Exception):
    """A valid exchange an attack relies on was refused for load, in a crowded run: not a finding."""


LOAD = LATE | CAPACITY
