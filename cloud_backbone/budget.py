"""The memory the service holds for its sessions, accounted in bytes before it is allocated.

A session holds three kinds of memory on the cloud:
- ``kv``: its cached keys and values, which grow with every decoded token;
- ``graph``: the activations autograd keeps between a training forward and its backward;
- ``pending``: the tensors of the step in flight (its input and its output).

Each step declares what it will hold before it runs; a step that would take its session over
the session budget, or the service over its total, is refused with a CapacityError and
nothing is allocated. A new session is refused the same way when not even its smallest step
(one token) would fit, so that a full service says so at once rather than at the first step.
The sizes come from the backbone's shapes (`StepCosts`), so the same budget means the same
thing on every backbone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from plora.storage.errors import CapacityError

KINDS = ("kv", "graph", "pending")


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class StepCosts:
    """Bytes per token of the cloud's layers, from the decoder's config (float32)."""

    kv_per_token: int  # keys and values of every cloud layer
    graph_per_token: int  # activations a training forward keeps, apart from attention scores
    scores_per_token_pair: int  # attention probabilities kept per (query, key) pair
    hidden_per_token: int  # one hidden state crossing the wire

    @classmethod
    def of(cls, config, num_layers: int, itemsize: int = 4) -> StepCosts:
        d, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        kv = 2 * config.num_key_value_heads * head_dim
        # What autograd saves per token and layer, an upper estimate for a Llama block: the two
        # norms' inputs and outputs, q/k/v/o inputs and outputs, the residual stream, rotary
        # q and k (about 12 d), and the MLP's gate, up, activation and product (4 × intermediate).
        saved = 12 * d + 4 * config.intermediate_size
        return cls(
            kv_per_token=num_layers * kv * itemsize,
            graph_per_token=num_layers * saved * itemsize,
            scores_per_token_pair=num_layers * 2 * heads * itemsize,  # softmax input and output
            hidden_per_token=d * itemsize,
        )

    def smallest_step(self) -> int:
        """What a step of one token holds: its cached keys and values, its input and its output."""
        return self.kv_per_token + 2 * self.hidden_per_token

    def graph(self, batch: int, tokens: int, past: int = 0) -> int:
        return batch * tokens * (self.graph_per_token + (past + tokens) * self.scores_per_token_pair)


class MemoryBudget:
    """Bytes held by every session together, against a total and a per-session limit.
    None means unlimited (an in-process link holds one session of one user)."""

    def __init__(self, total_bytes: int | None = None, session_bytes: int | None = None):
        self.total_bytes, self.session_bytes = total_bytes, session_bytes
        self._used = dict.fromkeys(KINDS, 0)
        self._lock = threading.Lock()

    def open(self, smallest_step: int = 0) -> SessionAccount:
        """An account for a new session, refused unless a step of `smallest_step` bytes would fit."""
        if self.session_bytes is not None and smallest_step > self.session_bytes:
            raise CapacityError(f"a session's budget of {_mib(self.session_bytes)} cannot hold even one token's step ({_mib(smallest_step)})")
        with self._lock:
            held = sum(self._used.values())
        if self.total_bytes is not None and held + smallest_step > self.total_bytes:
            raise CapacityError(f"the service holds {_mib(held)} of its {_mib(self.total_bytes)} budget, no room for a new session; retry later")
        return SessionAccount(self)

    def used(self) -> dict[str, int]:
        with self._lock:
            return dict(self._used)


class SessionAccount:
    """What one session holds, per kind. `hold` sets a kind's bytes to a new figure."""

    def __init__(self, budget: MemoryBudget):
        self._budget = budget
        self.held = dict.fromkeys(KINDS, 0)

    def hold(self, kind: str, nbytes: int) -> None:
        """Set what this session holds of `kind`; growing past either limit raises and changes nothing."""
        budget = self._budget
        with budget._lock:
            grow = nbytes - self.held[kind]
            if grow > 0:
                mine = sum(self.held.values()) + grow
                if budget.session_bytes is not None and mine > budget.session_bytes:
                    raise CapacityError(
                        f"this step would make the session hold {_mib(mine)} ({kind}: {_mib(nbytes)}), over its budget of "
                        f"{_mib(budget.session_bytes)}; send fewer tokens per step or start a shorter sequence"
                    )
                everyone = sum(budget._used.values()) + grow
                if budget.total_bytes is not None and everyone > budget.total_bytes:
                    raise CapacityError(
                        f"the service holds {_mib(everyone - grow)} of its {_mib(budget.total_bytes)} budget; "
                        f"this step needs {_mib(grow)} more; retry later"
                    )
            budget._used[kind] += grow
            self.held[kind] = nbytes

    def close(self) -> None:
        for kind in KINDS:
            self.hold(kind, 0)
