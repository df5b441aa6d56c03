"""Batching the inference steps of many sessions into one pass through the cloud layers.

A and B are the same for every user, so the cloud's adapter work for a mixed batch is two
dense matmuls; only u·M differs, and each row's u goes to its own device. Sessions submit
steps of one sequence: a prefill, a decode step, or a decode step with drafted tokens to
verify. A scheduler thread gathers those that arrive together (it waits a few milliseconds
for every session that stepped lately to come back) with about as many new tokens and about
as many cached ones (the same power-of-two buckets of both), lays each row out as
[padding][its cached positions][its new tokens][padding], runs one forward, and hands
every session its row and its new keys and values. A row's padding is masked from its real
tokens, and the padding after its new tokens comes after them causally, so it never changes
them. The buckets keep every row's padding shorter than the row itself: a session with a long
cache never makes its neighbours attend over it, and the batch's padded copy of the caches
holds less than twice the cached bytes the sessions' own budgets already count. In that
forward, every row's request (its real tokens only) goes to its device before
any reply is awaited. A session stepping alone skips all this and runs its own steps, as does
a step of more than MAX_BATCHED_TOKENS new tokens, whose matmuls are large enough alone.

Passes are pipelined: while one batch waits for its devices' replies at a layer, which over a
real link is most of a pass, the next batch (the sessions that came meanwhile) computes. Up to
`in_flight` passes run at once, each in a thread of its own, sharing the compute slots.

A row's failure is its own, whatever it is: a device that sends garbage, disconnects, or
answers later than the batch's late-reply budget (max(floor, factor × the median reply time of
the rows that did answer)) is taken out of the batch. Its session hears of it at once, its u·M
is replaced by zeros for the rest of that pass, its result is discarded, its cache is left as it
was, and the others go on. A late row is not failed: its session runs the step again on its own
(a slow link is no fault).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from plora.cloud_backbone.protocol.messages import AdapterRequest, Phase
from plora.storage.errors import PloraError, SessionError, TransportError

log = logging.getLogger(__name__)

COMPANY_WINDOW_S = 1.0  # sessions that made a step this recently are batched together
MAX_BATCHED_TOKENS = 256


class LateReply(TransportError):
    """A row's reply missed its batch's budget. The session runs the step again on its own
    once `pending`, the reply still on its way, has come (or failed)."""

    def __init__(self, message: str, pending: Future):
        super().__init__(message)
        self.pending = pending


@dataclass(eq=False)
class _Ticket:
    session: object  # CloudSession
    hidden: torch.Tensor  # (1, tokens, d)
    cached: int  # positions in the session's cache, which does not change while the step waits
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Take the row out of its pass: its session learns at once, while the pass goes on
        without it (the pass read the session's cache when it began, and writes it back only
        for rows without an error)."""
        self.error = error
        self.done.set()

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def bucket(self) -> tuple[int, int]:
        """Steps of 1, 2, 3-4, 5-8, ... new tokens on caches of 0, 1, 2-3, 4-7, ... positions:
        rows batched together are at most twice as long as each other, in both."""
        return (self.tokens - 1).bit_length(), self.cached.bit_length()


def batchable(cache: DynamicCache | None, hidden: torch.Tensor, train: bool, attention_mask) -> bool:
    """An inference step of one sequence, of at most MAX_BATCHED_TOKENS new tokens, with no
    mask of its own, on a plain (non-sliding) cache."""
    return (
        cache is not None
        and not train
        and attention_mask is None
        and hidden.shape[0] == 1
        and hidden.shape[1] <= MAX_BATCHED_TOKENS
        and all(type(layer) is DynamicLayer for layer in cache.layers)
    )


class StepBatcher:
    def __init__(
        self, half, max_batch: int = 64, gather_s: float = 0.01, late_floor_s: float = 0.25, late_factor: float = 5.0, in_flight: int = 2
    ):
        self.half = half
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.late_floor_s, self.late_factor = late_floor_s, late_factor
        self.in_flight = in_flight
        self._queue: list[_Ticket] = []
        self._cond = threading.Condition()
        self._stepping: dict[int, float] = {}  # id of a session -> when it last made a step
        self._passing: set[int] = set()  # ids of the sessions in a pass now
        self._free_passes = threading.Semaphore(in_flight)
        self._closed = False
        self._thread: threading.Thread | None = None  # the scheduler, started by the first step
        self.batches = 0
        self.rows = 0

    def close(self) -> None:
        """Run the steps already queued, then stop the scheduler thread and its passes."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def has_company(self, session) -> bool:
        """Whether another session made a step lately. A lone session runs its steps itself:
        batching would only add a hand-off to the scheduler and a copy of its cache."""
        now = time.monotonic()
        with self._cond:
            self._stepping[id(session)] = now
            for key in [k for k, seen in self._stepping.items() if now - seen > COMPANY_WINDOW_S]:
                del self._stepping[key]
            return len(self._stepping) > 1

    def step(self, session, hidden: torch.Tensor) -> torch.Tensor:
        """Run one step of `session` in a batch; blocks until it ran."""
        with self._cond:
            if self._closed:
                raise SessionError("the service is stopping")
            ticket = _Ticket(session, hidden, session.cache.get_seq_length())
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
            # Wait for company, but not once every session stepping lately is queued or in a
            # pass: then nobody else is likely to come soon.
            while len(self._queue) < self.max_batch:
                if len({id(t.session) for t in self._queue} | self._passing) >= len(self._stepping):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            # The first in line, with the steps of its bucket; the others come next.
            bucket = self._queue[0].bucket
            batch = [t for t in self._queue if t.bucket == bucket][: self.max_batch]
            self._queue = [t for t in self._queue if t not in batch]
            self._passing |= {id(t.session) for t in batch}
            return batch

    def _schedule(self) -> None:
        with ThreadPoolExecutor(self.in_flight, thread_name_prefix="plora-pass") as passes:
            while self._free_passes.acquire() and (batch := self._gather()):
                passes.submit(self._pass, batch)

    def _pass(self, batch: list[_Ticket]) -> None:
        try:
            with self.half.compute.computing():
                self._run(batch)
        except BaseException as err:  # a bug must not hang the callers
            log.exception("a batched step failed")
            for ticket in batch:
                ticket.error = ticket.error or err
        finally:
            with self._cond:
                self.batches += 1
                self.rows += len(batch)
                self._passing -= {id(t.session) for t in batch}
                self._cond.notify_all()
            self._free_passes.release()
            for ticket in batch:
                ticket.done.set()

    @staticmethod
    def _submit(ticket: _Ticket, request: AdapterRequest) -> Future | None:
        if ticket.error is None:
            try:
                return ticket.session.submit(request)
            except Exception as err:  # any failure to send is this row's alone
                ticket.fail(err if isinstance(err, PloraError) else TransportError(f"cannot reach the device: {type(err).__name__}"))
        return None

    def _replies(self, batch: list[_Ticket], requests: list[AdapterRequest], futures: list[Future | None], group: str, widest: int) -> torch.Tensor:
        """Every row's u·M, padded to `widest` tokens; a row that failed or is late gets zeros and its error."""
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
            batch[i].fail(LateReply(
                f"the reply for layer {requests[i].layer} {group} came later than the batch's budget of "
                f"{deadline - started:.3f} s; this step was taken out of its batch",
                future,
            ))
        rows = []
        for ticket, request, future in zip(batch, requests, futures):
            row = torch.zeros(1, ticket.tokens, self.half.width(group, Phase.FORWARD, "up"))
            if future is not None and ticket.error is None:
                try:
                    row = ticket.session.checked(request, future, timeout=0)
                except PloraError as err:
                    ticket.fail(err)
            rows.append(F.pad(row, (0, 0, 0, widest - ticket.tokens)))
        return torch.cat(rows)

    def _run(self, batch: list[_Ticket]) -> None:
        config = self.half.stack.config
        pasts = [t.cached for t in batch]
        longest, widest = max(pasts), max(t.tokens for t in batch)
        padded = DynamicCache(config=config)
        empty = torch.zeros(1, config.num_key_value_heads, 0, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        for j in range(len(self.half.stack.layers)):
            # Left-pad every cached sequence to the longest, so that all rows' new tokens start in one column.
            layers = [t.session.cache.layers[j] for t in batch]
            keys = torch.cat([F.pad(empty if n == 0 else c.keys, (0, 0, longest - n, 0)) for c, n in zip(layers, pasts)])
            values = torch.cat([F.pad(empty if n == 0 else c.values, (0, 0, longest - n, 0)) for c, n in zip(layers, pasts)])
            padded.update(keys, values, j)
        mask = torch.zeros(len(batch), longest + widest, dtype=torch.long)
        for i, (n, ticket) in enumerate(zip(pasts, batch)):
            mask[i, longest - n : longest + ticket.tokens] = 1
        positions = torch.stack([torch.arange(n, n + widest) for n in pasts])
        hidden = torch.cat([F.pad(t.hidden, (0, 0, 0, widest - t.tokens)) for t in batch])

        def exchange(layer: int, group: str, u: torch.Tensor) -> torch.Tensor:
            # Every row's request goes out before any reply is awaited: the devices work in parallel.
            requests = [AdapterRequest(layer, group, Phase.FORWARD, u[i : i + 1, : t.tokens]) for i, t in enumerate(batch)]
            futures = [self._submit(t, r) for t, r in zip(batch, requests)]
            return self._replies(batch, requests, futures, group, widest)

        with torch.no_grad(), self.half.slot.using(exchange):
            out = self.half.stack(
                inputs_embeds=hidden, attention_mask=mask, position_ids=positions, cache=padded, use_cache=True
            ).last_hidden_state
        for i, ticket in enumerate(batch):
            if ticket.error is None:
                new = slice(longest, longest + ticket.tokens)
                for j, layer in enumerate(padded.layers):
                    # Copies: a view would keep the whole batch's cache alive in this session's.
                    ticket.session.cache.update(layer.keys[i : i + 1, :, new].clone(), layer.values[i : i + 1, :, new].clone(), j)
                ticket.result = out[i : i + 1, : ticket.tokens].clone()
