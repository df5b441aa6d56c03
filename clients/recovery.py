"""Surviving a lost connection to the cloud: which failures to retry, how long, and how a new
session is brought back to the state the lost one held.

A cloud session holds two things only the device's own past requests can rebuild: the KV
cache of the sequence being decoded, and the graph of a training forward that awaits its
backward. `SequenceHistory` keeps those requests and produces their replay; it knows nothing
of the transport, so failover to another backbone replica can reuse it. `RetryPolicy` runs a
step again on a new session after a `ConnectionLost`, with exponential backoff, within a
time budget. Every other error is permanent and raised at once: a wrong credential, another
backbone version, a malformed message, or a step the service itself refused.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from plora.cloud_backbone.protocol.link import DeviceHandler
from plora.cloud_backbone.protocol.messages import CacheMode, ForwardRequest
from plora.storage.errors import ConfigError, TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ConnectionLost(TransportError):
    """The connection or the session stream broke (the service is unreachable, restarted, or
    did not answer in time): the step may succeed on a new session."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a step that lost its connection is tried again."""

    budget_s: float = 60.0
    """Give up once this many seconds have passed since the step first failed; 0: never retry."""
    first_delay_s: float = 0.5
    multiplier: float = 2.0
    max_delay_s: float = 8.0
    jitter: float = 0.2
    """Each wait is shortened by a random fraction up to this, so that the devices a restart
    cut off do not all come back in the same instant."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.budget_s >= 0 and 0 < self.first_delay_s <= self.max_delay_s and self.multiplier >= 1 and 0 <= self.jitter < 1):
            raise ConfigError(
                "need budget_s >= 0, 0 < first_delay_s <= max_delay_s, multiplier >= 1 and 0 <= jitter < 1; got "
                f"budget_s={self.budget_s}, first_delay_s={self.first_delay_s}, max_delay_s={self.max_delay_s}, "
                f"multiplier={self.multiplier}, jitter={self.jitter}"
            )

    def delays(self) -> Iterator[float]:
        """The waits before the second, third, ... attempt."""
        delay = self.first_delay_s
        while True:
            yield min(delay, self.max_delay_s) * (1 - self.jitter * self.random())
            delay *= self.multiplier

    def run(self, attempt: Callable[[], T], what: str) -> T:
        """attempt(), tried again after each ConnectionLost until it succeeds or the budget is
        spent. Any other error is raised at once."""
        first_failure: float | None = None
        delays, number = self.delays(), 0
        while True:
            number += 1
            try:
                return attempt()
            except ConnectionLost as err:
                now = self.clock()
                first_failure = now if first_failure is None else first_failure
                elapsed = now - first_failure
                left = self.budget_s - elapsed
                if left <= 0:
                    raise TransportError(
                        f"the {what} failed and the backbone service did not come back: tried {number} times over "
                        f"{elapsed:.1f} s (retry budget {self.budget_s:g} s); last error: {err}. Check that the "
                        "service is running and reachable, then run the command again (a personalization job "
                        "resumes from its last checkpoint)"
                    ) from err
                wait = min(next(delays), left)
                log.warning(
                    "the %s failed (attempt %d): %s; trying again on a new session in %.1f s (%.1f s of the %g s retry budget left)",
                    what, number, err, wait, left, self.budget_s,
                )
                self.sleep(wait)


Sent = tuple[ForwardRequest, DeviceHandler]


class SequenceHistory:
    """The forward requests a cloud session's state was built from, and their replay.

    Feed it every forward that succeeded (`forwarded`) and tell it when a forward or a
    backward begins and when a backward is over; `replay()` then lists, in order, the
    requests that bring a new session to the state of the old one, each with the handler
    that answered it (it answers from the device's current M, which no step changes between
    a forward and its backward)."""

    def __init__(self) -> None:
        self._sequence: list[Sent] = []  # since the last CacheMode.START
        self._awaiting_backward: Sent | None = None

    def forward_started(self) -> None:
        # The cloud drops an unfinished training graph when any new forward arrives.
        self._awaiting_backward = None

    def forwarded(self, request: ForwardRequest, handler: DeviceHandler) -> None:
        sent = (request, handler)
        if request.cache is CacheMode.START:
            self._sequence = [sent]
        elif request.cache is CacheMode.EXTEND:
            if request.keep_cached is not None:
                self._keep(request.keep_cached)
                sent = (dataclasses.replace(request, keep_cached=None), handler)
            self._sequence.append(sent)
        self._awaiting_backward = sent if request.train else None

    def _keep(self, length: int) -> None:
        """Forget every cached position after the first `length`, as the cloud did; a step the
        cut falls inside is kept as its first tokens, with its mask cut alike."""
        kept, total = [], 0
        for request, handler in self._sequence:
            tokens = request.hidden.shape[1]
            if total + tokens > length:
                cut, mask = length - total, request.attention_mask
                if cut:
                    mask = None if mask is None else mask[:, : mask.shape[1] - tokens + cut]
                    kept.append((dataclasses.replace(request, hidden=request.hidden[:, :cut], attention_mask=mask), handler))
                break
            kept.append((request, handler))
            total += tokens
        self._sequence = kept

    def backward_finished(self) -> None:
        """The backward ran (or failed for good): the cloud holds no graph any more."""
        self._awaiting_backward = None

    @property
    def cached_tokens(self) -> int:
        return sum(request.hidden.shape[1] for request, _ in self._sequence)

    def replay(self) -> list[Sent]:
        # The training forward awaiting its backward is the session's last forward (any later
        # one would have dropped its graph), so it goes last. Earlier training forwards of
        # the sequence are replayed without a graph: nothing will ask for theirs.
        steps = []
        for sent in self._sequence:
            request, handler = sent
            if request.train and sent is not self._awaiting_backward:
                request = dataclasses.replace(request, train=False)
            steps.append((request, handler))
        awaiting = self._awaiting_backward
        if awaiting is not None and not (self._sequence and self._sequence[-1] is awaiting):
            steps.append(awaiting)
        return steps
