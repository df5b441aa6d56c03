"""The cloud's compute: frozen decoder layers with PrivateLoRA's public projections.

Nothing here knows about any wire. A session runs forward and backward steps and reaches
the device only through the `ask` callable it is handed for each step, which makes the
same code serve the in-process link and the network service.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from plora.cloud_backbone.adapter_config import TARGET_MODULES, PrivateLoRAConfig
from plora.cloud_backbone.batching import (
    MAX_BATCHED_TOKENS,
    LateReply,
    SharedRows,
    StepBatcher,
    packed,
    real_positions,
    round_trip,
    unpacked,
)
from plora.cloud_backbone.budget import MemoryBudget, SessionAccount, StepCosts
from plora.cloud_backbone.loading import Backbone
from plora.cloud_backbone.privatelora import AdaptedGroup, attach, decoder_slice, truncate_cache
from plora.cloud_backbone.protocol.link import DeviceHandler
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    BackwardResult,
    CacheMode,
    ForwardRequest,
    ForwardResult,
    Phase,
    all_finite,
)
from plora.cloud_backbone.slots import ComputeSlots
from plora.storage.errors import CapacityError, PloraError, SessionError, TransportError, ValidationError, quoted


# A prefill of at least twice this many tokens runs in chunks of about it (at least it),
# pipelined through the layers. Each chunk costs a round trip per adapted layer of its own: 64 makes a 128-token
# prompt two chunks, which hides most of a layer's compute and bytes behind the next one's
# round trip at 20 ms, and adds the fewest messages where the link is fast.
PREFILL_CHUNK_TOKENS = 64
# A padded stateless step of at most this many real tokens computes them alone, packed as one
# sequence (CloudSession._packed). Attention over the packed sequence costs its length squared,
# masked per row: at 652 tokens (6 rows of up to 128) it took 26 ms a layer, forward and
# backward, where the padded rows took 8 ms, and the rest of the layer about 140 ms either way.
PACKED_MAX_TOKENS = 1024
# A long prompt's chunks are longer rather than more: once a chunk computes a layer for longer
# than a round trip takes, the next chunk's wait is hidden anyway, and every chunk's exchanges
# are messages each side handles. (Only 128-token prompts were measured.)
PREFILL_CHUNKS = 4
# Over a slow link, a packed training step computes in groups of its rows, each in a thread of
# its own, so that while one group waits for the device's reply at a layer, the others compute
# (CloudSession._pipelined_training): a row a group, up to TRAINING_GROUPS groups of at least
# TRAINING_GROUP_TOKENS real tokens on average, since each group pays a round trip per adapted
# layer of its own. The default job's step of 6 rows of up to 128 tokens (652 real), one device
# on the embedded backbone (4 steps each; alone; emulated): at 20 ms and 100 Mbit/s 5.31 to 5.42 s
# in one pass, 4.92 to 5.13 s in 2 groups, 4.35 in 3, 4.25 to 4.33 in 4 and 3.69 in 6; at 5 ms
# 4.26 s in one pass and 2.75 s in 6; on loopback 2.21 to 2.46 s in one pass and 2.34 s in 6.
# Where replies come fast there is little wait to hide and the groups' extra exchanges cost
# CPU: `plora demo`'s two devices on loopback trained in 2 min 46 s grouped against 2 min 16 s in
# one pass. So a session groups only once the median of its recent exchanges' round trips
# (ROUND_TRIPS_KEPT) reaches GROUPING_ROUND_TRIP_S. That is a proxy: what costs is another
# session's step filling the core the groups would use. But a gate on that load, which grouped a
# lone device on any link, gained it −1% to 9% in three sets of runs, within the machine's
# noise (README, **A training step in row groups**), so the round trip stays the gate.
TRAINING_GROUPS = 8
TRAINING_GROUP_TOKENS = 64
GROUPING_ROUND_TRIP_S = 0.010
ROUND_TRIPS_KEPT = 32


class CloudHalf(nn.Module):
    """The decoder layers between the device's first and last ones (config.cloud_layers), adapted with A and B.

    Takes the layers out of `backbone.model`: after this the full model must not be run. Its
    sessions compute in `compute`'s slots, which a service shares among all its versions.
    """

    def __init__(self, backbone: Backbone, config: PrivateLoRAConfig, compute: ComputeSlots | None = None):
        super().__init__()
        self.compute = compute or ComputeSlots()
        num_layers = backbone.num_layers
        config.check_backbone(num_layers)
        self.config = config
        self.identity = backbone.identity(config)
        layers = config.cloud_layers(num_layers)
        self.stack = decoder_slice(backbone.model, layers.start, layers.stop)
        self.slot = attach(self.stack.layers, layers.start, config)
        self.costs = StepCosts.of(self.stack.config, len(layers))
        self.batcher: StepBatcher | None = None
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        self.training_groups, self.training_group_tokens = TRAINING_GROUPS, TRAINING_GROUP_TOKENS
        self.grouping_round_trip_s = GROUPING_ROUND_TRIP_S

    def pipelines(self, request: ForwardRequest, cache: DynamicCache | None) -> bool:
        """Whether a step runs as a pipelined prefill (`CloudSession._pipelined`): an inference
        step of one sequence into the cache, of two chunks or more, on a stack whose layers
        take sdpa's boolean mask with no sliding window, as that path builds it."""
        return (
            self.prefill_chunk_tokens > 0
            and not request.train
            and cache is not None
            and request.attention_mask is None
            and request.hidden.shape[0] == 1
            and request.hidden.shape[1] >= 2 * self.prefill_chunk_tokens
            and self._plain_sdpa
        )

    def training_groups_of(self, request: ForwardRequest, cache: DynamicCache | None, real: torch.Tensor | None,
                           round_trips_s: Collection[float]) -> int:
        """In how many groups of rows a step computes (`CloudSession._pipelined_training`), `real`
        its real positions (None: all of them), `round_trips_s` its session's recent exchanges':
        a packed stateless training step whose round trips' median is `grouping_round_trip_s` or
        more, in a group a row, up to `training_groups` groups of `training_group_tokens` real
        tokens or more on average; 1 for any other step."""
        if not (request.train and cache is None and statistics.median(round_trips_s or [0.0]) >= self.grouping_round_trip_s):
            return 1
        real = _all_real(request.hidden) if real is None else real
        groups = min(self.training_groups, real.shape[0], int(real.sum()) // max(1, self.training_group_tokens))
        return groups if groups >= 2 and self.packs(real) else 1

    def packs(self, real: torch.Tensor) -> bool:
        """Whether a stateless step with padding, `real` its (rows, tokens) real positions, runs
        packed (`CloudSession._packed`): each row's real tokens come first (right padding), there
        are at most PACKED_MAX_TOKENS of them, and the stack's layers take sdpa's mask of packed
        sequences with no sliding window."""
        lengths = real.sum(dim=1, keepdim=True)
        return (
            int(lengths.sum()) <= PACKED_MAX_TOKENS
            and bool((real == (torch.arange(real.shape[1])[None, :] < lengths)).all())
            and self._plain_sdpa
        )

    @property
    def _plain_sdpa(self) -> bool:
        """Whether the stack's layers take sdpa's mask with no sliding window: the masks that
        a pipelined prefill builds, and that packed sequences get."""
        config = self.stack.config
        return config._attn_implementation == "sdpa" and getattr(config, "sliding_window", None) is None

    def enable_batching(self, max_batch: int = 64, gather_s: float = 0.01, late_floor_s: float = 0.25, late_factor: float = 5.0,
                        max_tokens: int = MAX_BATCHED_TOKENS) -> None:
        """Run concurrent sessions' steps of up to `max_tokens` tokens as one batch (see batching.py)."""
        self.batcher = StepBatcher(self, max_batch, gather_s, late_floor_s, late_factor, max_tokens=max_tokens)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def open_session(self, max_tokens: int = 4096, max_step_tokens: int = 1 << 16, account: SessionAccount | None = None) -> CloudSession:
        return CloudSession(self, max_tokens, max_step_tokens, account or MemoryBudget().open())

    def width(self, group: str, phase: Phase, direction: str) -> int:
        """The last dimension of a group's tensor: u and dL/du are a·r wide, u·M and its grad members·r."""
        return self.config.width(group, a_side=(phase is Phase.FORWARD) == (direction == "down"))


@dataclass(frozen=True)
class _OwnGraph:
    """The graph of a training forward the session ran alone."""

    hidden: torch.Tensor  # the input, a leaf
    out: torch.Tensor
    compute: ComputeSlots

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.out.shape)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        with self.compute.computing():
            torch.autograd.backward(self.out, grad)
        return self.hidden.grad

    def release(self) -> None:
        pass  # dropping it frees it


class _RowGroup:
    """Rows of a pipelined training step (`CloudSession._pipelined_training`): their input leaf,
    their packed exchanges' first token among the step's, and, once run, their output. The
    asker of their exchanges: the graph holds it weakly, the step's `_GroupGraphs` strongly."""

    def __init__(self, session: CloudSession, start: int, hidden: torch.Tensor, real: torch.Tensor):
        self.session, self.start, self.hidden, self.real = session, start, hidden, real
        self.out: torch.Tensor | None = None

    def send(self, phase: Phase, layer: int, group: str, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.session.send(phase, layer, group, tensor, self.start)

    def forward(self, half: CloudHalf) -> None:
        with torch.enable_grad(), half.slot.using(lambda layer, group, u: round_trip(self, layer, group, u)):
            self.out = _packed_pass(half.stack, self.hidden, self.real)


class _GroupGraphs:
    """The graphs of a pipelined training step's row groups, whose backwards run each in a
    thread of its own, as their forwards did."""

    def __init__(self, groups: list[_RowGroup], compute: ComputeSlots):
        self.groups, self.compute = groups, compute

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(group.out.shape[0] for group in self.groups), *self.groups[0].out.shape[1:])

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        grads = grad.split([group.out.shape[0] for group in self.groups])
        _in_threads([functools.partial(torch.autograd.backward, group.out, g) for group, g in zip(self.groups, grads)], self.compute, "rows")
        return torch.cat([group.hidden.grad for group in self.groups])

    def release(self) -> None:
        pass  # dropping it frees it


class CloudSession:
    """One device's session: its KV cache and, between a training forward and its
    backward, the cloud's autograd graph. It never holds M or any device parameter.

    A failed step leaves the session as it was before the step: its cache is truncated back
    to its earlier length (`truncate`), or the earlier cache restored after a failed START.
    Every byte it holds is declared to its account before it is allocated."""

    def __init__(self, half: CloudHalf, max_tokens: int, max_step_tokens: int, account: SessionAccount):
        self.half = half
        self.identity = half.identity
        self.max_tokens = max_tokens
        self.max_step_tokens = max_step_tokens
        self.account = account
        self.cache: DynamicCache | None = None  # keys and values of the cloud layers
        self._graph: _OwnGraph | _GroupGraphs | SharedRows | None = None
        self._handler: DeviceHandler | None = None
        self._real: torch.Tensor | None = None  # the real positions of its stateless step, if padded (batching.real_positions)
        self._round_trips: deque[float] = deque(maxlen=ROUND_TRIPS_KEPT)  # of its recent exchanges, in seconds

    def send(self, phase: Phase, layer: int, group: str, tensor: torch.Tensor, start: int = 0) -> Callable[[], torch.Tensor]:
        """One adapter round trip, begun: the request goes now, and the function returned waits
        for the reply and checks it before it touches the graph. The step's compute slot is
        free while it waits. `start`: the tensor's first token among the step's exchanged ones."""
        real = self._real
        request = AdapterRequest(layer, group, phase, packed(tensor, real), start)
        sent = time.monotonic()
        reply = self.submit(request)
        reply.add_done_callback(lambda _: self._round_trips.append(time.monotonic() - sent))

        def answer() -> torch.Tensor:
            if not reply.done():
                with self.half.compute.waiting():
                    wait([reply])
            return unpacked(self.checked(request, reply), real)

        return answer

    def submit(self, request: AdapterRequest) -> Future:
        """Send `request` now; the future holds the device's reply.

        A handler with `submit` (the network service's) sends without waiting, so a batch of
        sessions has all its requests in flight at once; any other is simply called."""
        submit = getattr(self._handler, "submit", None)
        if submit is not None:
            return submit(request)
        future = Future()
        try:
            future.set_result(self._handler(request))
        except Exception as err:
            future.set_exception(err)
        return future

    def checked(self, request: AdapterRequest, reply: Future, timeout: float | None = None) -> torch.Tensor:
        """The reply's tensor, once it passed every check. Whatever went wrong on the way is
        a PloraError of this session, never a foreign exception that could fail a batch."""
        try:
            answer = reply.result(timeout)
        except PloraError:
            raise
        except BaseException as err:  # a cancelled or broken exchange, whatever its type
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise TransportError(f"no reply for layer {request.layer} {request.group}: {type(err).__name__}") from None
        if not isinstance(answer, AdapterReply):
            raise ValidationError(f"expected an AdapterReply, got {type(answer).__name__}")
        if (answer.layer, answer.group, answer.phase) != (request.layer, request.group, request.phase):
            raise ValidationError(
                f"reply for layer {answer.layer} {quoted(answer.group)} {answer.phase.value}, "
                f"expected layer {request.layer} {request.group} {request.phase.value}"
            )
        expected = (*request.tensor.shape[:-1], self.half.width(request.group, request.phase, "up"))
        check_tensor(answer.tensor, expected, f"layer {request.layer} {request.group} reply")
        return answer.tensor

    def _exchange(self, layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
        return round_trip(self, layer, group, u)

    def forward(self, request: ForwardRequest, ask: DeviceHandler) -> ForwardResult:
        hidden = request.hidden
        batch, tokens = self._check_hidden(hidden)
        past = self._past(request.cache, batch, request.keep_cached)
        if request.attention_mask is not None:
            check_mask(request.attention_mask, (batch, past + tokens))
        self._drop_graph()  # a new step abandons an unfinished training step
        self._real = real_positions(request.attention_mask) if request.cache is CacheMode.NONE else None
        self._hold_step(hidden, request.cache, batch, past + tokens, request.train)
        if request.keep_cached is not None:
            self.truncate(past)  # only once the step passed every check: a refused step changes nothing
        previous, previous_length = self.cache, past
        cache = self._cache_for(request.cache)
        if request.train:
            hidden = hidden.detach().requires_grad_(True)
        groups = self.half.training_groups_of(request, cache, self._real, self._round_trips)
        self._handler = ask
        try:
            batcher = self.half.batcher
            # Every step counts, so that sessions starting together batch from their first step.
            company = batcher is not None and batcher.has_company(self)
            out = None
            if company and batcher.takes(cache, hidden, request.train, request.attention_mask):
                out = self._batched(batcher, hidden, cache is None, request.attention_mask, request.train)
            elif self.half.pipelines(request, cache):
                out = self._pipelined(hidden, cache, past)
            elif groups > 1:
                out, self._graph = self._pipelined_training(hidden, groups)
            if out is None:
                with torch.set_grad_enabled(request.train), self.half.slot.using(self._exchange), self.half.compute.computing():
                    if self._real is not None and self.half.packs(self._real):
                        out = self._packed(hidden)
                    else:
                        out = self.half.stack(
                            inputs_embeds=hidden,
                            attention_mask=request.attention_mask,
                            cache=cache,
                            use_cache=cache is not None,
                        ).last_hidden_state
                        if self._real is not None:
                            out = out * self._real[..., None]  # the padding's outputs are zeros, as packed
                if request.train:
                    self._graph = _OwnGraph(hidden, out, self.half.compute)
        except BaseException:
            if request.cache is CacheMode.START:
                self.cache = previous
            elif request.cache is CacheMode.EXTEND:
                self.truncate(previous_length)
            self._drop_graph()
            raise
        finally:
            self._handler = None
            self.account.hold("pending", 0)
            self.account.hold("kv", self._kv_bytes())
        return ForwardResult(out.detach())

    def _packed(self, hidden: torch.Tensor) -> torch.Tensor:
        real, self._real = self._real, None  # its exchanges hold the real positions already
        return _packed_pass(self.half.stack, hidden, real)

    def _pipelined(self, hidden: torch.Tensor, cache: DynamicCache, past: int) -> torch.Tensor:
        """An inference prefill in chunks of the sequence, each in a thread of its own, that
        follow each other through the layers: chunk c enters a layer once chunk c-1 has left
        it, its keys and values cached. So while one chunk waits for the device's reply at
        a layer, the next computes, and its exchange travels, at the layer before; over a real
        link a prefill then pays each layer's round trip about once, not its compute and its
        bytes besides. The result is the one pass's up to float rounding (tested)."""
        # As many chunks as whole chunks of prefill_chunk_tokens fit, up to PREFILL_CHUNKS, of
        # equal sizes: a short last chunk would cost a round trip per layer for a few tokens.
        count = min(hidden.shape[1] // self.half.prefill_chunk_tokens, PREFILL_CHUNKS)
        stack, chunks = self.half.stack, hidden.tensor_split(count, dim=1)
        left = [[threading.Event() for _ in stack.layers] for _ in chunks]  # left[c][l]: chunk c is past layer l
        outs: list[torch.Tensor | None] = [None] * len(chunks)
        failed = threading.Event()

        def run(c: int, x: torch.Tensor, start: int) -> None:
            def exchange(layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
                return self.send(Phase.FORWARD, layer, group, u, start)  # from its first token; no graph keeps it

            positions = torch.arange(past + start, past + start + x.shape[1])[None]
            # Causal over the chunk, and every position cached before it (sdpa's boolean mask).
            mask = (torch.arange(past + start + x.shape[1])[None, :] <= positions[0][:, None])[None, None]
            try:
                with torch.no_grad(), self.half.slot.using(exchange):
                    embeddings = stack.rotary_emb(x, position_ids=positions)
                    for l, layer in enumerate(stack.layers):
                        if c:
                            with self.half.compute.waiting():
                                left[c - 1][l].wait()
                            if failed.is_set():
                                return
                        x = layer(x, attention_mask=mask, position_embeddings=embeddings, position_ids=positions,
                                  cache=cache, use_cache=True)
                        left[c][l].set()
                    outs[c] = stack.norm(x)
            except BaseException:
                failed.set()  # before its events wake the chunks after it
                raise
            finally:
                for event in left[c]:
                    event.set()  # a chunk that failed holds no other back

        starts = itertools.accumulate(chunk.shape[1] for chunk in chunks[:-1])
        _in_threads([functools.partial(run, c, chunk, start) for c, (chunk, start) in enumerate(zip(chunks, [0, *starts]))],
                    self.half.compute, "prefill")
        return torch.cat(outs, dim=1)

    def _pipelined_training(self, hidden: torch.Tensor, groups: int) -> tuple[torch.Tensor, _GroupGraphs]:
        """A packed training step in `groups` groups of rows, each packed and computed in a
        thread of its own, forward now and backward later (`_GroupGraphs`): while one group
        waits for the device's reply at a layer, the others compute, and over a real link a
        step pays its compute and its round trips about once, not one after the other. A
        group's exchanges start at its first token among the step's packed ones, so the device
        tells them apart. The result is the one pass's up to float rounding (tested)."""
        real, self._real = _all_real(hidden) if self._real is None else self._real, None  # its exchanges are packed already
        rows = torch.arange(hidden.shape[0]).tensor_split(groups)
        tokens = [int(real[group].sum()) for group in rows]
        row_groups = [_RowGroup(self, start, hidden[group].detach().requires_grad_(True), real[group])
                      for group, start in zip(rows, itertools.accumulate([0, *tokens[:-1]]))]
        _in_threads([functools.partial(group.forward, self.half) for group in row_groups], self.half.compute, "rows")
        return torch.cat([group.out.detach() for group in row_groups]), _GroupGraphs(row_groups, self.half.compute)

    def _batched(self, batcher: StepBatcher, hidden: torch.Tensor, stateless: bool, mask: torch.Tensor | None, train: bool) -> torch.Tensor | None:
        """The step run in the next batch (a training step keeps its rows of the batch's graph);
        None when the device's reply came too late for the batch, and the step must run alone."""
        try:
            if not stateless:
                return batcher.step(self, hidden)
            out, self._graph = batcher.stateless_step(self, hidden, mask, train)
            return out
        except LateReply as late:
            # Let the late reply arrive (its exchange's own timeout bounds the wait); a device
            # that never replied fails its step.
            error = late.pending.exception()
            if error is not None:
                raise error
            return None

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions of every layer. It undoes a failed step
        (layers below the failure were extended, the others not) and drops rejected drafts."""
        truncate_cache(self.cache, length)

    def _check_hidden(self, hidden: torch.Tensor) -> tuple[int, int]:
        d = self.identity.hidden_size
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValidationError(f"hidden state must be (batch, tokens, {d}), got {_shape(hidden)}")
        batch, tokens = hidden.shape[:2]
        if batch < 1 or tokens < 1:
            raise ValidationError(f"hidden state {_shape(hidden)} is empty; send at least one token")
        if batch * tokens > self.max_step_tokens:
            raise CapacityError(
                f"a step of {batch}×{tokens} tokens is over the service's limit of {self.max_step_tokens} per step; "
                "send smaller batches or shorter chunks"
            )
        check_tensor(hidden, (batch, tokens, d), "hidden state")
        return batch, tokens

    def _past(self, mode: CacheMode, batch: int, keep: int | None) -> int:
        """Cached positions the step attends to, after checking the step fits the cache."""
        if keep is not None and mode is not CacheMode.EXTEND:
            raise ValidationError(f"keep_cached applies to an EXTEND step only, not to {mode.value}")
        if mode is not CacheMode.EXTEND:
            return 0
        if self.cache is None:
            raise SessionError("EXTEND needs a cached sequence; start one with CacheMode.START")
        past = self.cache.get_seq_length()
        if keep is not None:
            if not 0 <= keep <= past:
                raise ValidationError(f"keep_cached={keep}, but the session holds {past} cached positions")
            past = keep
        if past and self.cache.layers[0].keys.shape[0] != batch:
            raise ValidationError(f"batch of {batch} does not match the cached batch of {self.cache.layers[0].keys.shape[0]}")
        return past

    def _hold_step(self, hidden: torch.Tensor, mode: CacheMode, batch: int, length: int, train: bool) -> None:
        """Declare what the step will hold, before it allocates anything."""
        if mode is not CacheMode.NONE and batch * length > self.max_tokens:
            raise CapacityError(
                f"session would hold {batch}×{length} cached positions, over its limit of {self.max_tokens}; "
                "start a new sequence, or send fewer rows"
            )
        costs, tokens = self.half.costs, hidden.shape[1]
        try:
            self.account.hold("pending", 2 * hidden.numel() * hidden.element_size())  # its input and its output
            if mode is not CacheMode.NONE:
                # A START keeps the old cache until it succeeds: count both.
                kept = self._kv_bytes() if mode is CacheMode.START else 0
                self.account.hold("kv", kept + batch * length * costs.kv_per_token)
            if train:
                self.account.hold("graph", costs.graph(batch, tokens, length - tokens))
        except BaseException:
            self.account.hold("pending", 0)
            self.account.hold("kv", self._kv_bytes())
            raise

    def _cache_for(self, mode: CacheMode) -> DynamicCache | None:
        if mode is CacheMode.NONE:
            return None
        if mode is CacheMode.START:
            self.cache = DynamicCache(config=self.half.stack.config)
        return self.cache

    def _kv_bytes(self) -> int:
        if self.cache is None or not self.cache.get_seq_length():
            return 0
        batch = self.cache.layers[0].keys.shape[0]
        return batch * self.cache.get_seq_length() * self.half.costs.kv_per_token

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.release()
        self._graph = None
        self.account.hold("graph", 0)

    def backward(self, request: BackwardRequest, ask: DeviceHandler) -> BackwardResult:
        if self._graph is None:
            raise SessionError("backward needs a preceding forward with train=True")
        try:
            check_tensor(request.grad_hidden, self._graph.shape, "gradient of the hidden state")
            self.account.hold("pending", 2 * request.grad_hidden.numel() * request.grad_hidden.element_size())
            self._handler = ask
            grad = self._graph.backward(request.grad_hidden)
        finally:
            self._handler = None
            self._drop_graph()
            self.account.hold("pending", 0)
        return BackwardResult(grad if request.want_input_grad else None)

    def close(self) -> None:
        self.cache = None
        self._drop_graph()
        self.account.close()


def _packed_pass(stack: nn.Module, hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """A right-padded stateless step computed on its real tokens alone: the rows laid end to end
    as one sequence, whose positions start again at each row, so that the stack masks each row
    from the others, as it does packed training sequences. The padding's outputs are zeros."""
    positions = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    out = stack(inputs_embeds=packed(hidden, real), position_ids=packed(positions[..., None], real)[..., 0],
                attention_mask=None, cache=None, use_cache=False).last_hidden_state
    return unpacked(out, real)


def _in_threads(works: list[Callable[[], object]], compute: ComputeSlots, name: str) -> None:
    """Every work at once, each in a thread of its own (plora-{name}-{i}) and a compute slot; the
    first error raised."""
    errors: list[BaseException] = []

    def run(work: Callable[[], object]) -> None:
        try:
            with compute.computing(spread=False):
                work()
        except BaseException as err:  # the step's error, raised by the caller
            errors.append(err)

    threads = [threading.Thread(target=run, args=(work,), name=f"plora-{name}-{i}") for i, work in enumerate(works)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _all_real(hidden: torch.Tensor) -> torch.Tensor:
    return torch.ones(hidden.shape[:2], dtype=torch.bool)


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_tensor(tensor: object, shape: tuple[int, ...], what: str) -> None:
    """Refuse anything but a finite float32 tensor of exactly `shape`."""
    if not isinstance(tensor, torch.Tensor):
        raise ValidationError(f"{what}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise ValidationError(f"{what}: dtype {tensor.dtype}, expected torch.float32")
    if tuple(tensor.shape) != tuple(shape):
        raise ValidationError(f"{what}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if not all_finite(tensor):
        raise ValidationError(f"{what}: contains NaN or infinity")


def check_mask(mask: object, shape: tuple[int, int]) -> None:
    """An attention mask is int64 of (batch, cached + new tokens), of 0 and 1 only, and every
    row attends to at least one position."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.int64:
        raise ValidationError(f"attention mask: expected an int64 tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValidationError(
            f"attention mask: shape {tuple(mask.shape)}, expected {tuple(shape)} (batch, cached tokens + new tokens)"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValidationError("attention mask: values must be 0 (padding) or 1 (a real token)")
    if not mask.any(dim=1).all():
        raise ValidationError("attention mask: a row masks every position; each row needs at least one real token")


def public_tensors(half: CloudHalf) -> dict[str, torch.Tensor]:
    """The A and B the cloud applies, named layers.{i}.{module}.A / .B, for anyone to audit.

    With a shared A, every member of a group is written with the same A.
    """
    config, r = half.config, half.config.rank
    out = {}
    for group in half.stack.modules():
        if not isinstance(group, AdaptedGroup):
            continue
        for i, member in enumerate(config.groups[group.name]):
            prefix = f"layers.{group.layer}.{TARGET_MODULES[member]}"
            column = 0 if config.shared_a else i
            # Copies: safetensors refuses tensors that share memory.
            out[f"{prefix}.A"] = group.a[:, column * r : (column + 1) * r].clone()
            out[f"{prefix}.B"] = getattr(group, f"b{i}").clone()
    return out
