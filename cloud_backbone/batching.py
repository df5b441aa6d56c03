"""Batching the inference steps of many sessions into one pass through the cloud layers.

A and B are the same for every user, so the cloud's adapter work for a mixed batch is two
dense matmuls; only u·M differs, and each row's u goes to its own device. Sessions submit
steps of one sequence: a prefill, a decode step, or a decode step with drafted tokens to
verify. A scheduler thread gathers those that arrive together (it waits for every session
that stepped lately to come back from its last pass, up to twice the usual time that takes,
so that the sessions of one pass make the next one whole, and for a pass of the same kind past
its middle, so that sessions that began apart come to step together) with about as many new
tokens and about as many cached ones (the same power-of-two buckets of both), lays each row out
as [padding][its cached positions][its new tokens][padding], runs one forward, and hands
every session its row and its new keys and values. A row's padding is masked from its real
tokens, and the padding after its new tokens comes after them causally, so it never changes
them. The buckets keep every row's padding shorter than the row itself: a session with a long
cache never makes its neighbours attend over it, and the batch's padded copy of the caches
holds less than twice the cached bytes the sessions' own budgets already count. In that
forward, every row's request (its real tokens only) goes to its device before
any reply is awaited. A session stepping alone skips all this and runs its own steps, as does
a step of more than `max_tokens` new tokens (all its rows), whose matmuls are large enough alone;
for the same reason a pass holds at most `max_tokens` new tokens, and the next steps make the
next pass, which computes beside it.

Passes are pipelined: while one batch waits for its devices' replies at a layer, which over a
real link is most of a pass, the next batch (the sessions that came meanwhile) computes. Up to
`in_flight` passes run at once, each in a thread of its own, sharing the compute slots.

A row's failure is its own, whatever it is: a device that sends garbage, disconnects, or
answers later than the batch's late-reply budget (max(floor, factor × the median reply time of
the rows that did answer)) is taken out of the batch. Its session hears of it at once, its u·M
is replaced by zeros for the rest of that pass, its result is discarded, its cache is left as it
was, and the others go on. A late row is not failed: its session runs the step again on its own
(a slow link is no fault).

Stateless steps (scoring, and the forward of a training step) batch the same way, with each
other only: every session's rows right-padded to the widest, each row masked as its session
masked it, so that padding comes after its real tokens causally and never changes them. A
training step's graph is then shared (SharedGraph): each session sends its backward over its own
rows, and the backwards that come together run as one, with zeros for the other rows' gradients,
which therefore get nothing from them. A session whose backward comes later than the others'
budget runs it on the same graph afterwards; the graph is freed once no session holds it. The
buckets keep each session's padded rows, and so its share of the graph, within twice what its
own account holds.

A stateless step's padding is no token of the device's: its outputs are zeros, whatever the
path (a session alone computes a right-padded step packed, `CloudSession._packed`), and it
crosses no exchange. Where a session's mask has padding, its requests hold its real positions
alone, as one row (1, real positions, width), and the replies fill those positions back, with
zeros at the padding (`real_positions`); its u·M would change only the padding's own outputs,
which no real token attends to.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from plora.cloud_backbone.protocol.messages import AdapterRequest, Phase
from plora.storage.errors import PloraError, SessionError, TransportError

log = logging.getLogger(__name__)

COMPANY_WINDOW_S = 1.0  # sessions seen stepping this recently (a step began or its pass ended) batch together
MAX_GATHER_S = 0.25  # the longest a pass waits for the sessions on their way back to it
MAX_MERGE_S = 0.5  # the longest a pass waits for another pass to end, so that their sessions step together
MAX_BATCHED_TOKENS = 256  # the default of a step's tokens that batch; a longer step runs alone


class LateReply(TransportError):
    """A row's reply missed its batch's budget. The session runs the step again on its own
    once `pending`, the reply still on its way, has come (or failed)."""

    def __init__(self, message: str, pending: Future):
        super().__init__(message)
        self.pending = pending


@dataclass
class _Pace:
    """When the scheduler last saw a session."""

    seen: float  # when a step of it began, or its pass ended, last
    ended: float | None = None  # when its last pass ended, until its next step comes


@dataclass(frozen=True)
class _Running:
    """A pass under way: when it began, and when it should end, as passes of its bucket took lately."""

    bucket: tuple
    began: float
    ends: float | None  # None: no pass of its bucket ran yet

    def ending(self, now: float) -> bool:
        """Past its middle and due within MAX_MERGE_S: worth a wait for its sessions."""
        return self.ends is not None and now < self.ends <= now + MAX_MERGE_S and 2 * now >= self.began + self.ends


@dataclass(eq=False)
class _Ticket:
    session: object  # CloudSession
    hidden: torch.Tensor  # (rows, tokens, d): a step's input, or a backward's gradient of its output
    cached: int  # positions in the session's cache, which does not change while the step waits
    stateless: bool = False  # a step without a cache: one or more rows, each masked as its session says
    mask: torch.Tensor | None = None  # (rows, tokens) of a stateless step; None: every token is real
    train: bool = False  # a stateless step that keeps its graph for a backward
    rows: slice = field(default_factory=lambda: slice(0, 1))  # its rows in the batch
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    graph: SharedGraph | None = None  # a training step's, once its batch ran
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

    @cached_property
    def real(self) -> torch.Tensor | None:
        """Its real positions, when its mask has padding (`real_positions`): what its exchanges carry."""
        return real_positions(self.mask)

    @property
    def size(self) -> int:
        """New tokens in all its rows."""
        return self.hidden.shape[0] * self.hidden.shape[1]

    @property
    def bucket(self) -> tuple[bool, bool, int, int]:
        """Steps of 1, 2, 3-4, 5-8, ... new tokens on caches of 0, 1, 2-3, 4-7, ... positions:
        rows batched together are at most twice as long as each other, in both. Stateless
        steps batch only with stateless ones, training steps only with training steps."""
        return self.stateless, self.train, (self.tokens - 1).bit_length(), self.cached.bit_length()


def real_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (rows, tokens) bool of a stateless step's real positions, when its mask (already
    checked: 0 or 1, each row with a real token) has padding; None when every position is real."""
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()


def packed(tensor: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """(rows, tokens, width) -> (1, real positions, width): what crosses an exchange."""
    return tensor if real is None else tensor[real][None]


def unpacked(reply: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """A packed reply back in its (rows, tokens, width), zeros at the padding."""
    if real is None:
        return reply
    out = reply.new_zeros(*real.shape, reply.shape[-1])
    out[real] = reply[0]
    return out


class DeviceRoundTrip(torch.autograd.Function):
    """u -> u·M, where `answer` waits for the devices' reply to u, which `asker` already sent; the
    backward sends dL/d(u·M) through `asker` the same way and waits for dL/du. An asker's
    send(phase, layer, group, tensor) sends each device its rows and returns the wait.

    The graph holds its asker weakly: the asker (a session, or a shared graph) holds the graph's
    output, and a cycle through torch's C++ graph is one Python's collector cannot free: each
    batched backward that a device failed leaked its graph so. Whoever runs the backward holds
    the asker."""

    @staticmethod
    def forward(ctx, u, asker, layer: int, group: str, answer: Callable[[], torch.Tensor]):
        ctx.asker, ctx.layer, ctx.group = weakref.ref(asker), layer, group
        return answer()

    @staticmethod
    def backward(ctx, grad_v):
        return ctx.asker().send(Phase.BACKWARD, ctx.layer, ctx.group, grad_v.contiguous())(), None, None, None, None


def round_trip(asker, layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Sends u through `asker` now; the function returned waits for u·M, as a node of the
    graph when gradients are on."""
    answer = asker.send(Phase.FORWARD, layer, group, u.detach())
    if torch.is_grad_enabled():
        return lambda: DeviceRoundTrip.apply(u, asker, layer, group, answer)
    return answer


def _fail_every(tickets: list[_Ticket], error: BaseException, what: str) -> None:
    """A bug in a batched pass must not hang its callers: each gets the error, unless it had its own."""
    log.exception("a batched %s failed", what)
    for ticket in tickets:
        ticket.error = ticket.error or error


class StepBatcher:
    def __init__(
        self, half, max_batch: int = 64, gather_s: float = 0.01, late_floor_s: float = 0.25, late_factor: float = 5.0, in_flight: int = 2,
        max_tokens: int = MAX_BATCHED_TOKENS,
    ):
        self.half = half
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.gather_s = gather_s
        self.late_floor_s, self.late_factor = late_floor_s, late_factor
        self.in_flight = in_flight
        self._queue: list[_Ticket] = []
        self._cond = threading.Condition()
        self._paces: dict[int, _Pace] = {}  # id of a session seen stepping lately -> its pace
        self._gaps: deque[float] = deque(maxlen=64)  # the latest seconds from a pass's end to its sessions' next steps
        self._passing: dict[int, _Running] = {}  # id of a session in a pass now -> that pass
        self._took: dict[tuple, deque[float]] = {}  # bucket -> seconds its latest passes took
        self._free_passes = threading.Semaphore(in_flight)
        self._closed = False
        self._thread: threading.Thread | None = None  # the scheduler, started by the first step
        self.batches = 0
        self.rows = 0
        self.backwards = 0  # batched backwards, and the rows they served
        self.backward_rows = 0

    def close(self) -> None:
        """Run the steps already queued, then stop the scheduler thread and its passes."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def takes(self, cache: DynamicCache | None, hidden: torch.Tensor, train: bool, attention_mask) -> bool:
        """Whether a step batches: a stateless step (scoring or training) of at most `max_tokens`
        tokens in all its rows; or an inference step of one sequence, of at most `max_tokens`
        new tokens, with no mask of its own, on a plain (non-sliding) cache."""
        if cache is None:
            return hidden.shape[0] * hidden.shape[1] <= self.max_tokens
        return (
            not train
            and attention_mask is None
            and hidden.shape[0] == 1
            and hidden.shape[1] <= self.max_tokens
            and all(type(layer) is DynamicLayer for layer in cache.layers)
        )

    def has_company(self, session) -> bool:
        """Whether another session made a step lately. A lone session runs its steps itself:
        batching would only add a hand-off to the scheduler and a copy of its cache."""
        now = time.monotonic()
        with self._cond:
            self._paces.setdefault(id(session), _Pace(now)).seen = now
            for key in [k for k, pace in self._paces.items() if now - pace.seen > COMPANY_WINDOW_S]:
                del self._paces[key]
            return len(self._paces) > 1

    def step(self, session, hidden: torch.Tensor) -> torch.Tensor:
        """Run one step of `session` on its cache in a batch; blocks until it ran."""
        cached = session.cache.get_seq_length() if session.cache is not None else 0
        return self._queued(_Ticket(session, hidden, cached)).result

    def stateless_step(self, session, hidden: torch.Tensor, mask: torch.Tensor | None, train: bool) -> tuple[torch.Tensor, SharedRows | None]:
        """Run a step of `session` without a cache in a batch; blocks until it ran. Returns its
        output, and for a training step its rows of the batch's graph, for its backward."""
        ticket = self._queued(_Ticket(session, hidden, 0, stateless=True, mask=mask, train=train))
        return ticket.result, SharedRows(ticket.graph, ticket) if train else None

    def _queued(self, ticket: _Ticket) -> _Ticket:
        with self._cond:
            if self._closed:
                raise SessionError("the service is stopping")
            if self._thread is None:
                self._thread = threading.Thread(target=self._schedule, name="plora-batcher", daemon=True)
                self._thread.start()
            self._came_back(id(ticket.session))
            self._queue.append(ticket)
            self._cond.notify_all()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket

    def _came_back(self, key: int) -> None:
        """Times a session's way back from its last pass, which the passes' wait for company follows."""
        pace = self._paces.get(key)
        if pace is not None and pace.ended is not None:
            gap, pace.ended = time.monotonic() - pace.ended, None
            if gap < COMPANY_WINDOW_S:
                self._gaps.append(gap)

    def _gather_wait(self) -> float:
        """How long a pass waits for the sessions on their way back to it: twice their usual way
        back, since over a real link the rows of one pass come back over some milliseconds;
        members of a pass that waited too little go in the next one, and the cohort stays split."""
        typical = statistics.median(self._gaps) if self._gaps else 0.0
        return min(MAX_GATHER_S, max(self.gather_s, 2 * typical))

    def _gather(self) -> tuple[list[_Ticket], _Running] | tuple[()]:
        """The next batch and its pass; nothing once closed with nothing queued."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return ()
                self._cond.wait()
            now, wait = time.monotonic(), self._gather_wait()
            # Wait for company: for the sessions on their way back (seen stepping lately, neither
            # queued nor in a pass), and for those of a pass past its middle, which end soon. A
            # pass that waited for neither would run beside the other one, step after step, for
            # as long as both groups decode: two passes where one would do, each reading every
            # weight of the stack.
            bucket = self._queue[0].bucket
            ending = {key for key, running in self._passing.items() if running.bucket == bucket and running.ending(now)}
            deadline = max([now + wait] + [self._passing[key].ends + wait for key in ending])
            while len(batch := self._next_batch()) < self.max_batch and sum(t.size for t in batch) < self.max_tokens:
                queued = {id(t.session) for t in self._queue}
                if all(key in queued or (key in self._passing and key not in ending) for key in self._paces):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._queue = [t for t in self._queue if t not in batch]
            now, took = time.monotonic(), self._took.get(bucket)
            running = _Running(bucket, now, now + statistics.median(took) if took else None)
            self._passing.update((id(t.session), running) for t in batch)
            return batch, running

    def _next_batch(self) -> list[_Ticket]:
        """The first step in line, with the next steps of its bucket up to `max_tokens` new
        tokens in all: a pass of more gains no matmul efficiency, and passes of fewer compute
        side by side, each on a core (measured on 2 cores: 16 training steps of 2 × 100 tokens
        in one pass ran at about half the speed of each alone)."""
        bucket, batch, tokens = self._queue[0].bucket, [], 0
        for ticket in self._queue:
            if ticket.bucket == bucket and len(batch) < self.max_batch and (not batch or tokens + ticket.size <= self.max_tokens):
                batch.append(ticket)
                tokens += ticket.size
        return batch

    def _schedule(self) -> None:
        with ThreadPoolExecutor(self.in_flight, thread_name_prefix="plora-pass") as passes:
            while self._free_passes.acquire() and (gathered := self._gather()):
                passes.submit(self._pass, *gathered)
                del gathered  # else the batch's sessions, graphs and tensors live on until the next batch

    def _pass(self, batch: list[_Ticket], running: _Running) -> None:
        try:
            with self.half.compute.computing(spread=False):
                self._run(batch)
        except BaseException as err:
            _fail_every(batch, err, "step")
        finally:
            with self._cond:
                self.batches += 1
                self.rows += len(batch)
                ended = time.monotonic()
                self._took.setdefault(running.bucket, deque(maxlen=16)).append(ended - running.began)
                for ticket in batch:
                    # A row taken out of this pass may be in the next one already.
                    if self._passing.get(id(ticket.session)) is running:
                        del self._passing[id(ticket.session)]
                    # Seen stepping: a pass over a slow link outlasts the company window.
                    pace = self._paces.setdefault(id(ticket.session), _Pace(ended))
                    pace.seen = pace.ended = ended
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

    def send(self, batch: list[_Ticket], phase: Phase, layer: int, group: str, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Each ticket's rows of `tensor` (u, or the gradient of u·M) go to its device now, so that
        the devices work in parallel. The function returned waits for the replies and returns
        them in their rows of one tensor: zeros for other rows, and for the tickets that fail
        or are late, which get their error."""
        started = time.monotonic()
        requests = [AdapterRequest(layer, group, phase, packed(tensor[t.rows, : t.tokens], t.real)) for t in batch]
        futures = [self._submit(t, r) for t, r in zip(batch, requests)]
        return lambda: self._replies(batch, requests, futures, tensor.shape[:2], started)

    def _replies(self, batch: list[_Ticket], requests: list[AdapterRequest], futures: list[Future | None], shape: torch.Size,
                 started: float) -> torch.Tensor:
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
                f"the reply for layer {requests[i].layer} {requests[i].group} came later than the batch's budget of "
                f"{deadline - started:.3f} s; this step was taken out of its batch",
                future,
            ))
        request = requests[0]
        replies = torch.zeros(*shape, self.half.width(request.group, request.phase, "up"))
        for ticket, request, future in zip(batch, requests, futures):
            if future is not None and ticket.error is None:
                try:
                    reply = ticket.session.checked(request, future, timeout=0)
                    replies[ticket.rows, : ticket.tokens] = unpacked(reply, ticket.real)
                except PloraError as err:
                    ticket.fail(err)
        return replies

    def _run(self, batch: list[_Ticket]) -> None:
        start = 0
        for ticket in batch:
            ticket.rows = slice(start, start + ticket.hidden.shape[0])
            start += ticket.hidden.shape[0]
        (self._run_stateless if batch[0].stateless else self._run_cached)(batch)

    def _run_stateless(self, batch: list[_Ticket]) -> None:
        widest = max(t.tokens for t in batch)
        hidden = torch.cat([F.pad(t.hidden.detach(), (0, 0, 0, widest - t.tokens)) for t in batch])
        masks = [torch.ones(t.hidden.shape[:2], dtype=torch.long) if t.mask is None else t.mask for t in batch]
        mask = torch.cat([F.pad(m, (0, widest - t.tokens)) for m, t in zip(masks, batch)])
        train = batch[0].train
        graph = SharedGraph(self, hidden.requires_grad_(train), batch) if train else None

        def exchange(layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
            if train:
                return round_trip(graph, layer, group, u)
            return self.send(batch, Phase.FORWARD, layer, group, u)

        with torch.set_grad_enabled(train), self.half.slot.using(exchange):
            out = self.half.stack(inputs_embeds=hidden, attention_mask=mask).last_hidden_state * mask[..., None]
        for ticket in batch:
            if ticket.error is None:
                ticket.result = out[ticket.rows, : ticket.tokens].detach().clone()
        if train:
            graph.hold(out, [t for t in batch if t.error is None])
            for ticket in batch:
                ticket.graph = graph

    def _run_cached(self, batch: list[_Ticket]) -> None:
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

        def exchange(layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
            return self.send(batch, Phase.FORWARD, layer, group, u)

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


class SharedGraph:
    """The graph of a batched training forward, which the sessions of its rows share: each sends
    the backward of its own rows, and those that come together run as one backward."""

    def __init__(self, batcher: StepBatcher, hidden: torch.Tensor, batch: list[_Ticket]):
        self.batcher = batcher
        self.hidden, self.out = hidden, None
        self.current = batch  # the tickets whose devices the exchanges ask now
        self._holding: set[_Ticket] = set()  # the rows whose sessions may still send their backward
        self._arrived: list[tuple[_Ticket, _Ticket]] = []  # (the row, its backward) waiting to run
        self._running = False
        self._cond = threading.Condition()
        self._ran_at = 0.0  # when the forward ended
        self._first_at: float | None = None  # when the first backward of the next run came

    def hold(self, out: torch.Tensor, rows: list[_Ticket]) -> None:
        self.out, self._holding, self._ran_at = out, set(rows), time.monotonic()

    def send(self, phase: Phase, layer: int, group: str, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.batcher.send(self.current, phase, layer, group, tensor)

    def backward(self, row: _Ticket, grad: torch.Tensor, alone: bool = False) -> torch.Tensor:
        """dL/d(hidden) of `row`'s rows, given dL/d(out) of them. It waits for the backwards of
        the other rows, up to max(floor, factor × how long the first of them took to come), and
        runs with those that came; `alone` runs it without waiting for any."""
        mine, run = _Ticket(row.session, grad, 0, mask=row.mask, rows=row.rows), None
        with self._cond:
            self._first_at = self._first_at or time.monotonic()
            self._arrived.append((row, mine))
            self._cond.notify_all()
            # Whoever finds the others come (or their time up) runs the backward for all who came.
            while run is None and not mine.done.is_set():
                if not self._running and (alone or self._everyone_came() or self._wait_left() == 0):
                    run, self._arrived, self._first_at, self._running = self._arrived, [], None, True
                else:
                    self._cond.wait(self._wait_left())
        if run is not None:
            self._run([backward for _, backward in run])
        if mine.error is not None:
            raise mine.error
        return mine.result

    def release(self, row: _Ticket) -> None:
        """The session of `row` sends no backward over this graph any more; the last to go frees it."""
        with self._cond:
            self._holding.discard(row)
            if not self._holding and not self._running:
                self.hidden = self.out = None
            self._cond.notify_all()

    def _everyone_came(self) -> bool:
        return self._holding <= {row for row, _ in self._arrived}

    def _wait_left(self) -> float | None:
        if self._first_at is None:
            return None
        budget = max(self.batcher.late_floor_s, self.batcher.late_factor * (self._first_at - self._ran_at))
        return max(0.0, self._first_at + budget - time.monotonic())

    def _run(self, run: list[_Ticket]) -> None:
        try:
            grad = torch.zeros_like(self.out)
            for ticket in run:
                grad[ticket.rows, : ticket.tokens] = ticket.hidden
            self.current = run
            with self.batcher.half.compute.computing(spread=False):
                # The graph is kept for the rows whose backward comes later.
                (grads,) = torch.autograd.grad(self.out, self.hidden, grad, retain_graph=True)
            for ticket in run:
                if ticket.error is None:
                    ticket.result = grads[ticket.rows, : ticket.tokens].clone()
            with self.batcher._cond:  # graphs of several passes count into the same figures
                self.batcher.backwards += 1
                self.batcher.backward_rows += len(run)
        except BaseException as err:
            _fail_every(run, err, "backward")
        finally:
            with self._cond:
                self._running = False
                if not self._holding:
                    self.hidden = self.out = None
                # Under the lock: a waiter that wakes finds its backward done, not to be run again.
                for ticket in run:
                    ticket.done.set()
                self._cond.notify_all()


@dataclass(frozen=True)
class SharedRows:
    """A session's rows of a SharedGraph: what it holds between its training forward and backward."""

    graph: SharedGraph
    row: _Ticket

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.row.result.shape)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        try:
            return self.graph.backward(self.row, grad)
        except LateReply as late:
            # As a late forward row does: once the late reply came, the backward runs again, alone.
            error = late.pending.exception()
            if error is not None:
                raise error
            return self.graph.backward(self.row, grad, alone=True)

    def release(self) -> None:
        self.graph.release(self.row)
