"""Batching decode steps of many sessions into one pass through the cloud layers.

A and B are the same for every user, so the cloud's adapter work for a mixed batch is two
dense matmuls; only u·M differs, and each row's u goes to its own device. Sessions submit
one-token decode steps; a scheduler thread gathers those that arrive together (it waits a
few milliseconds for every session that decoded lately to come back), pads their KV caches
to a common length, runs one forward, and hands every session its row and its new keys and
values. In that forward, every row's request goes to its device before any reply is awaited.
A session decoding alone skips all this and runs its own steps.

A row's failure is its own, whatever it is: a device that sends garbage, disconnects, or
answers later than the batch's late-reply budget (max(floor, factor × the median reply time of
the rows that did answer)) is taken out of the batch. Its u·M is replaced by zeros for the rest
of that pass, its result is discarded, its cache is left as it was, and the others go on. A late
row is not failed: its session runs the step again on its own (a slow link is no fault).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from plora.cloud_backbone.protocol.messages import AdapterRequest, Phase
from plora.storage.errors import PloraError, SessionError, TransportError

log = logging.getLogger(__name__)

COMPANY_WINDOW_S = 1.0  # sessions that made a decode step this recently are batched together


class LateReply(TransportError):
    """A row's reply missed its batch's budget. The session runs the step again on its own
    once `pending`, the reply still on its way, has come (or failed)."""

    def __init__(self, message: str, pending: Future):
        super().__init__(message)
        self.pending = pending


@dataclass(eq=False)
class _Ticket:
    session: object  # CloudSession
    hidden: torch.Tensor  # (1, 1, d)
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


def batchable(cache: DynamicCache | None, hidden: torch.Tensor, train: bool, attention_mask) -> bool:
    """One new token of one sequence, on a plain (non-sliding) cache: a decode step."""
    return (
        cache is not None
        and not train
        and attention_mask is None
        and tuple(hidden.shape[:2]) == (1, 1)
        and cache.get_seq_length() > 0
        and all(type(layer) is DynamicLayer for layer in cache.layers)
    )


class DecodeBatcher:
    def __init__(self, half, max_batch: int = 64, gather_s: float = 0.01, late_floor_s: float = 0.25, late_factor: float = 5.0):
        self.half = half
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.late_floor_s, self.late_factor = late_floor_s, late_factor
        self._queue: list[_Ticket] = []
        self._cond = threading.Condition()
        self._decoding: dict[int, float] = {}  # id of a session -> when it last made a decode step
        self._closed = False
        self._thread: threading.Thread | None = None  # the scheduler, started by the first step
        self.batches = 0
        self.rows = 0

    def close(self) -> None:
        """Run the steps already queued, then stop the scheduler thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def has_company(self, session) -> bool:
        """Whether another session made a decode step lately. A lone decoder runs its steps
        itself: batching would only add a hand-off to the scheduler and a copy of its cache."""
        now = time.monotonic()
        with self._cond:
            self._decoding[id(session)] = now
            for key in [k for k, seen in self._decoding.items() if now - seen > COMPANY_WINDOW_S]:
                del self._decoding[key]
            return len(self._decoding) > 1

    def step(self, session, hidden: torch.Tensor) -> torch.Tensor:
        """Run one decode step of `session` in the next batch; blocks until it ran."""
        ticket = _Ticket(session, hidden)
        with self._cond:
            if self._closed:
                raise SessionError("the service is stopping")
            if self._thread is None:
                self._thread = threading.Thread(target=self._schedule, name="plora-batcher", daemon=True)
                self._thread.start()
            self._queue.append(ticket)
            self._cond.notify_all()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _gather(self) -> list[_Ticket]:
        """The next batch; empty once closed with nothing queued."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return []
                self._cond.wait()
            deadline = time.monotonic() + self.gather_s
            # Wait for company, but not once every session decoding lately is queued: then
            # nobody else is likely to come soon.
            while len(self._queue) < self.max_batch:
                if len({id(t.session) for t in self._queue}) >= len(self._decoding):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            return batch

    def _schedule(self) -> None:
        while batch := self._gather():
            try:
                with self.half.compute.computing():
                    self._run(batch)
            except BaseException as err:  # a bug must not hang the callers
                log.exception("batched decode step failed")
                for ticket in batch:
                    ticket.error = ticket.error or err
            finally:
                self.batches += 1
                self.rows += len(batch)
                for ticket in batch:
                    ticket.done.set()

    @staticmethod
    def _submit(ticket: _Ticket, request: AdapterRequest) -> Future | None:
        if ticket.error is None:
            try:
                return ticket.session.submit(request)
            except Exception as err:  # any failure to send is this row's alone
                ticket.error = err if isinstance(err, PloraError) else TransportError(f"cannot reach the device: {type(err).__name__}")
        return None

    def _replies(self, batch: list[_Ticket], requests: list[AdapterRequest], futures: list[Future | None], group: str) -> torch.Tensor:
        """Every row's u·M; a row that failed or is late gets zeros and its error."""
        started = time.monotonic()
        waiting = {f: i for i, f in enumerate(futures) if f is not None}
        times: list[float] = []
        deadline = None  # set once the first reply is in
        with self.half.compute.waiting():
            while waiting:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = wait(waiting, timeout=left, return_when=FIRST_COMPLETED)
                if not done:
                    break
                for future in done:
                    del waiting[future]
                    times.append(time.monotonic() - started)
                deadline = started + max(self.late_floor_s, self.late_factor * statistics.median(times))
        for future, i in waiting.items():
            batch[i].error = LateReply(
                f"the reply for layer {requests[i].layer} {group} came later than the batch's budget of "
                f"{deadline - started:.3f} s; this step was taken out of its batch",
                future,
            )
        rows = []
        for ticket, request, future in zip(batch, requests, futures):
            if future is not None and ticket.error is None:
                try:
                    rows.append(ticket.session.checked(request, future, timeout=0))
                    continue
                except PloraError as err:
                    ticket.error = err
            rows.append(torch.zeros(1, 1, self.half.width(group, Phase.FORWARD, "up")))
        return torch.cat(rows)

    def _run(self, batch: list[_Ticket]) -> None:
        caches = [t.session.cache for t in batch]
        lengths = [c.get_seq_length() for c in caches]
        longest = max(lengths)
        padded = DynamicCache(config=self.half.stack.config)
        for j in range(len(caches[0].layers)):
            # Left-pad every sequence to the longest, so the new token is the last column for all.
            keys = torch.cat([F.pad(c.layers[j].keys, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)])
            values = torch.cat([F.pad(c.layers[j].values, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)])
            padded.update(keys, values, j)
        mask = torch.zeros(len(batch), longest + 1, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, longest - n :] = 1
        positions = torch.tensor(lengths)[:, None]
        hidden = torch.cat([t.hidden for t in batch])

        def exchange(layer: int, group: str, u: torch.Tensor) -> torch.Tensor:
            # Every row's request goes out before any reply is awaited: the devices work in parallel.
            requests = [AdapterRequest(layer, group, Phase.FORWARD, u[i : i + 1]) for i in range(len(batch))]
            futures = [self._submit(t, r) for t, r in zip(batch, requests)]
            return self._replies(batch, requests, futures, group)

        with torch.no_grad(), self.half.slot.using(exchange):
            out = self.half.stack(
                inputs_embeds=hidden, attention_mask=mask, position_ids=positions, cache=padded, use_cache=True
            ).last_hidden_state
        for i, ticket in enumerate(batch):
            if ticket.error is None:
                for j, layer in enumerate(padded.layers):
                    ticket.session.cache.update(layer.keys[i : i + 1, :, -1:], layer.values[i : i + 1, :, -1:], j)
                ticket.result = out[i : i + 1]
