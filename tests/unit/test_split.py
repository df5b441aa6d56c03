"""The split model against a monolithic reference built independently of the split code.

The reference is plain transformers with forward hooks that add s·((x·A)·M)·B to each target
projection's output, using the published A and B and a copy of the device's M.
"""

from __future__ import annotations

import gc
import threading
from concurrent.futures import Future

import pytest
import torch

from plora.clients.device_model import DeviceModel
from plora.clients.generation import generate_batch, stream_tokens
from plora.clients.training import causal_lm_loss, labelled_loss
from plora.cloud_backbone.adapter_config import TARGET_MODULES, PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf, public_tensors
from plora.cloud_backbone.protocol.link import InProcessLink, TrafficCounter
from plora.cloud_backbone.protocol.messages import AdapterReply, CacheMode, ForwardRequest
from plora.platform.runtime import split_embedded
from plora.storage.errors import ConfigError
from tests.conftest import tiny_backbone, tiny_llama

CASES = [
    pytest.param(PrivateLoRAConfig(rank=4, device_layers=0), id="qkv-separateA-0dev"),
    pytest.param(PrivateLoRAConfig(rank=4, device_layers=2), id="qkv-separateA-2dev"),
    pytest.param(PrivateLoRAConfig(rank=4, shared_a=True, device_layers=0), id="qkv-sharedA-0dev"),
    pytest.param(PrivateLoRAConfig(rank=4, shared_a=True, device_layers=2), id="qkv-sharedA-2dev"),
    pytest.param(
        PrivateLoRAConfig(rank=3, targets=tuple(TARGET_MODULES), shared_a=True, scale=0.5, seed=7, device_layers=1),
        id="all-targets-sharedA-1dev",
    ),
    pytest.param(PrivateLoRAConfig(rank=4, device_layers=1, adapt_layers=(0, 2)), id="qkv-layers0,2-1dev"),
    pytest.param(PrivateLoRAConfig(rank=4, device_layers=1, device_last_layers=1), id="qkv-separateA-1dev-1last"),
    pytest.param(PrivateLoRAConfig(rank=3, targets=tuple(TARGET_MODULES), shared_a=True, device_last_layers=2, adapt_layers=(1, 3)),
                 id="all-targets-sharedA-2last-layers1,3"),
    pytest.param(PrivateLoRAConfig(rank=4, targets=("q", "v", "up"), projections="principal", device_layers=1, device_last_layers=1),
                 id="principal-1dev-1last"),
]


def random_ms(model: DeviceModel, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.weights.ms.values():
            m.normal_(0, 0.3)


def reference(config: PrivateLoRAConfig, ms: dict[str, torch.Tensor]):
    """A monolithic tiny Llama with hooks, and leaf copies of M to differentiate against."""
    model = tiny_llama()
    public = public_tensors(CloudHalf(tiny_backbone(), PrivateLoRAConfig(**{**config.to_dict(), "device_layers": 0, "device_last_layers": 0, "targets": config.targets})))
    leaves = {name: m.detach().clone().requires_grad_(True) for name, m in ms.items()}
    for i, layer in enumerate(model.model.layers):
        for target in config.targets if config.adapts(i) else ():
            module = TARGET_MODULES[target]
            prefix = f"layers.{i}.{module}"
            a, b, m = public[f"{prefix}.A"], public[f"{prefix}.B"], leaves[f"{prefix}.M"]
            layer.get_submodule(module).register_forward_hook(
                lambda mod, args, out, a=a, b=b, m=m: out + config.scale * ((args[0] @ a) @ m) @ b
            )
    return model, leaves


@pytest.mark.parametrize("config", CASES)
def test_split_logits_and_dm_equal_the_monolithic_reference(config):
    split = split_embedded(tiny_backbone(), config)
    random_ms(split)
    ms = dict(split.weights.named_tensors())
    ref, ref_ms = reference(config, ms)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))

    logits, ref_logits = split(ids), ref(ids).logits
    assert torch.allclose(logits, ref_logits, atol=1e-5), (logits - ref_logits).abs().max()

    target = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), target.reshape(-1))
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, 96), target.reshape(-1))
    loss.backward()
    ref_loss.backward()
    for name, m in ms.items():
        assert m.grad is not None and ref_ms[name].grad.abs().sum() > 0, name
        assert torch.allclose(m.grad, ref_ms[name].grad, atol=1e-5), name


@pytest.mark.parametrize("config", CASES)
def test_zero_m_gives_exactly_the_base_model(config):
    split = split_embedded(tiny_backbone(), config)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(split(ids), tiny_llama()(ids).logits)


def test_same_m_gives_the_same_model_at_every_split_point():
    outputs = []
    for first, last in ((0, 0), (1, 0), (3, 0), (0, 2), (1, 1)):
        split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=first, device_last_layers=last))
        random_ms(split)
        outputs.append(split(torch.arange(12)[None]))
    assert all(torch.allclose(outputs[0], o, atol=1e-5) for o in outputs[1:])


@pytest.mark.parametrize("last", [0, 1])
def test_cached_decoding_matches_full_recompute(last):
    split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=1, device_last_layers=last))
    random_ms(split)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = split(ids)
        steps = [split(ids[:, :6], CacheMode.START)[:, -1]]
        steps += [split(ids[:, t : t + 1], CacheMode.EXTEND)[:, -1] for t in range(6, 10)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 5:], atol=1e-5)


def test_a_pass_may_keep_the_logits_of_its_last_positions_alone():
    split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=1, device_last_layers=1))
    random_ms(split)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, last = split(ids), split(ids, logits_to_keep=2)
    assert last.shape == (2, 2, full.shape[-1]) and torch.allclose(last, full[:, -2:], atol=1e-6)


@pytest.mark.parametrize(("device_layers", "last"), [(0, 0), (2, 0), (1, 1)])
def test_batched_generation_matches_one_prompt_at_a_time(device_layers, last):
    split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=device_layers, device_last_layers=last))
    random_ms(split)
    rng = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (n,), generator=rng).tolist() for n in (9, 2, 5, 14)]
    stop = {int(prompts[1][0])}  # a plausible token, so some rows may stop early
    alone = [list(stream_tokens(split, p, 12, stop)) for p in prompts]
    assert generate_batch(split, prompts, 12, stop) == alone
    seeds = [11, 12, 13, 14]
    sampled = [list(stream_tokens(split, p, 12, set(), temperature=1.0, seed=s)) for p, s in zip(prompts, seeds)]
    assert generate_batch(split, prompts, 12, set(), temperature=1.0, seeds=seeds) == sampled


def _private_tensor_ptrs(model: DeviceModel) -> set[int]:
    return {m.data_ptr() for m in model.weights.ms.values()} | {
        m.grad.data_ptr() for m in model.weights.ms.values() if m.grad is not None
    }


def _reachable_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through attributes, containers and autograd graphs."""
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if obj.grad_fn is not None:
                stack.append(obj.grad_fn)
            continue
        if hasattr(obj, "next_functions"):  # autograd node
            stack.extend(fn for fn, _ in obj.next_functions if fn is not None)
            stack.extend(getattr(obj, name) for name in dir(obj) if name.startswith("_saved_") or name == "variable")
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


def test_cloud_half_holds_no_device_parameter():
    backbone = tiny_backbone()
    config = PrivateLoRAConfig(rank=4, device_layers=1)
    cloud = CloudHalf(backbone, config)
    session = cloud.open_session()
    device = DeviceModel(backbone.model, config, InProcessLink(session))
    random_ms(device)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = device(ids)
    # Mid-step, the cloud keeps its graph for backward: it must not reach M either.
    mid_step = _reachable_tensors(session)
    logits.sum().backward()
    gc.collect()
    private = _private_tensor_ptrs(device)
    cloud_side = mid_step + _reachable_tensors(session) + _reachable_tensors(cloud)
    assert len(cloud_side) > 10  # the walk does see the cloud's tensors
    assert not private & {t.data_ptr() for t in cloud_side}
    assert all(id(t) not in {id(m) for m in device.weights.ms.values()} for t in cloud_side)


class _ReplyIn(Future):
    """A device's reply that is already in; it notes when the cloud takes it."""

    def __init__(self, events: list[str], reply: AdapterReply):
        super().__init__()
        self.events = events
        self.set_result(reply)

    def result(self, timeout=None):
        self.events.append("reply taken")
        return super().result(timeout)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_the_cloud_computes_a_groups_base_projections_while_its_device_answers(train):
    half = CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=0))
    events: list[str] = []
    for layer in half.stack.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).base_layer.register_forward_hook(lambda *_, name=name: events.append(name))

    class NetworkDevice:  # as the service's handler: it sends without waiting for the reply
        def submit(self, request):
            events.append(f"u of layer {request.layer} sent")
            return _ReplyIn(events, AdapterReply(request.layer, request.group, request.phase, torch.zeros(1, 5, 12)))

    half.open_session().forward(ForwardRequest(torch.randn(1, 5, 32), train=train), NetworkDevice())
    assert events == [event for layer in range(4)
                      for event in (f"u of layer {layer} sent", "q_proj", "k_proj", "v_proj", "reply taken")]


class SlowDevice:
    """A device over a slow link: each reply (u·M with M of its own, fixed per layer) comes
    `delay_s` after its request, from a thread of the link's; it counts the requests in flight."""

    def __init__(self, delay_s: float):
        self.delay_s, self.in_flight, self.most_in_flight, self.lock = delay_s, 0, 0, threading.Lock()
        self.ms = {layer: torch.randn(12, 12, generator=torch.Generator().manual_seed(layer)) * 0.3 for layer in range(4)}

    def submit(self, request):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        reply = Future()

        def answer():
            with self.lock:
                self.in_flight -= 1
            reply.set_result(AdapterReply(request.layer, request.group, request.phase, request.tensor @ self.ms[request.layer]))

        threading.Timer(self.delay_s, answer).start()
        return reply


@pytest.mark.parametrize("past", [0, 5], ids=["start", "extend"])
def test_a_prefill_pipelined_in_chunks_through_the_layers_equals_the_one_pass(past):
    halves = {chunk: CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=0)) for chunk in (0, 3)}
    hidden = torch.randn(1, past + 11 + 1, 32, generator=torch.Generator().manual_seed(0))
    results, devices = {}, {}
    for chunk, half in halves.items():
        half.prefill_chunk_tokens = chunk  # 0: one pass; 3: chunks of 4, 4 and 3 tokens
        session, devices[chunk] = half.open_session(), SlowDevice(delay_s=0.05)
        steps = [ForwardRequest(hidden[:, past : past + 11], CacheMode.EXTEND), ForwardRequest(hidden[:, -1:], CacheMode.EXTEND)]
        if past:
            steps.insert(0, ForwardRequest(hidden[:, :past], CacheMode.START))
        else:
            steps[0] = ForwardRequest(hidden[:, :11], CacheMode.START)
        results[chunk] = [session.forward(step, devices[chunk]).hidden for step in steps]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0], results[3], strict=True))
    # The chunks were in flight together: the next one computed while one waited for its reply.
    assert devices[0].most_in_flight == 1 and devices[3].most_in_flight >= 2


def test_traffic_is_one_hidden_state_each_way_plus_r_vectors_per_group():
    rank, layers = 4, 4
    for shared_a, up_width in ((False, 3 * rank), (True, rank)):
        split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=rank, shared_a=shared_a))
        traffic, seen = TrafficCounter(), []
        split.link.taps += [traffic, lambda direction, message: seen.append((direction, type(message).__name__))]
        with torch.no_grad():
            split(torch.arange(5)[None])
        assert seen[0] == ("up", "ForwardRequest") and seen[-1] == ("down", "ForwardResult")
        assert seen.count(("down", "AdapterRequest")) == layers == seen.count(("up", "AdapterReply"))
        hidden = 5 * 32 * 4  # tokens × d × float32
        assert traffic.bytes["up"] == hidden + layers * 5 * 3 * rank * 4  # u·M for q, k and v
        assert traffic.bytes["down"] == hidden + layers * 5 * up_width * 4  # u: one per A


def test_adapting_fewer_layers_drops_their_round_trips_and_keeps_old_versions_digests():
    config = PrivateLoRAConfig(rank=4, device_layers=1, adapt_layers=(3, 0, 2))
    assert config.adapt_layers == (0, 2, 3) and config.round_trips(4) == 2  # layers 2 and 3 in the cloud, one group each
    split = split_embedded(tiny_backbone(), config)
    counter = TrafficCounter()
    split.link.taps.append(counter)
    with torch.no_grad():
        split(torch.arange(5)[None])
    assert counter.messages["down"] == config.round_trips(4) + 1  # the requests for u·M, and the result
    assert len(list(split.weights.named_tensors())) == 3 * 3
    assert "adapt_layers" not in PrivateLoRAConfig().to_dict()  # so versions made before it keep their digest
    assert PrivateLoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="layer 4"):
        PrivateLoRAConfig(adapt_layers=(4,)).check_backbone(4)


def test_last_layers_on_the_device_drop_their_round_trips_and_keep_old_versions_digests():
    config = PrivateLoRAConfig(rank=4, device_layers=1, device_last_layers=2)
    assert config.cloud_layers(4) == range(1, 2) and config.round_trips(4) == 1
    assert "device_last_layers" not in PrivateLoRAConfig().to_dict()
    assert PrivateLoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="no decoder layer for the cloud"):
        PrivateLoRAConfig(device_layers=2, device_last_layers=2).check_backbone(4)


def test_public_projections_are_deterministic_orthonormal_and_seeded():
    def tensors(seed):
        return public_tensors(CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=4, seed=seed)))

    first, again, other = tensors(0), tensors(0), tensors(1)
    assert set(first) == {f"layers.{i}.self_attn.{p}_proj.{m}" for i in range(4) for p in "qkv" for m in "AB"}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.allclose(first[k], other[k]) for k in first)
    a, b = first["layers.0.self_attn.q_proj.A"], first["layers.0.self_attn.k_proj.B"]
    assert torch.allclose(a.T @ a, torch.eye(4), atol=1e-5)  # orthonormal columns
    assert torch.allclose(b @ b.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    shared = public_tensors(CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=4, shared_a=True)))
    assert torch.equal(shared["layers.2.self_attn.q_proj.A"], shared["layers.2.self_attn.v_proj.A"])


def test_principal_projections_span_each_weights_top_singular_directions_and_keep_old_versions_digests():
    backbone = tiny_backbone()
    weight = backbone.model.model.layers[1].self_attn.k_proj.weight.detach().double()  # (16, 32) in the tiny model
    public = public_tensors(CloudHalf(backbone, PrivateLoRAConfig(rank=4, projections="principal")))
    again = public_tensors(CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=4, projections="principal", seed=1)))
    assert all(torch.equal(public[name], again[name]) for name in public)  # the weights alone fix them, not the seed
    a, b = public["layers.1.self_attn.k_proj.A"].double(), public["layers.1.self_attn.k_proj.B"].double()
    assert torch.allclose(a.T @ a, torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(b @ b.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    top = torch.linalg.svdvals(weight)[:4]
    # W restricted to A's directions in, B's out, is diagonal with W's 4 largest singular values
    assert torch.allclose(b @ weight @ a, torch.diag(top), atol=1e-4)
    assert (a.abs().argmax(0) == a.argmax(0)).all()  # the sign fixed: each column's largest entry positive
    assert "projections" not in PrivateLoRAConfig().to_dict()
    config = PrivateLoRAConfig(projections="principal")
    assert PrivateLoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="cannot be shared"):
        PrivateLoRAConfig(projections="principal", shared_a=True)
    with pytest.raises(ConfigError, match="singular vectors"):
        CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=40, projections="principal"))


def test_the_loss_on_labelled_positions_only_equals_the_full_causal_lm_loss_and_its_gradient():
    split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=1))
    random_ms(split)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[2, 8:] = -100  # padding
    grads = []
    for loss_of in (lambda: causal_lm_loss(split(ids), labels), lambda: labelled_loss(split, ids, labels)):
        split.zero_grad()
        loss, count = loss_of()
        loss.backward()
        grads.append((loss.item(), count, [m.grad.clone() for m in split.weights.ms.values()]))
    (full, full_count, full_grads), (part, part_count, part_grads) = grads
    assert full_count == part_count == 4 + 4 + 2
    assert abs(full - part) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full_grads, part_grads))
