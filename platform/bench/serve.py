"""`plora bench serve`: the backbone service over gRPC loopback against monolithic baselines.

The service runs in a child process, as it would on its own machine; the devices run as
threads of this process. On one small machine the devices' own work (embedding, LM head,
u·M) competes with the service for the same cores, which a real fleet would not do: with
16 devices, their 16 LM heads alone read the head's weights 16 times per token where the
batched base model reads them once. So besides the wall-clock fleet ratio the bench reports
what the fleet costs the cloud: the base model's CPU time per token, batched at the same
size, over the service process's CPU time per token serving the fleet.

Two ceilings say what this machine allows, measured in the same run. A decode step makes one
round trip per adapted layer, so one device can decode no faster than the monolithic model
plus that many bare round trips of the transport (the protocol's messages answered at once by
a process that does nothing else). And a fleet sharing the cores with the cloud can decode no
faster than the cores can supply the CPU time that the devices and the cloud spend per token.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import torch
from transformers import DynamicCache

from plora.clients.anchor import Anchor, AnchorSettings
from plora.clients.data import DEVICE_JOB_MAX_LENGTH, TokenizedExample
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Endpoint
from plora.clients.training import TrainSettings, causal_lm_loss, personalize
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol import wire
from plora.cloud_backbone.protocol.messages import AdapterReply, AdapterRequest, CacheMode, Phase
from plora.platform.bench import neighbour
from plora.platform.bench.split import MonolithicModel, rate
from plora.platform.bench.workloads import decode_workload
from plora.platform.jobs import device_anchor
from plora.platform.runtime import Device, init_device, open_device
from plora.storage.db import open_database
from plora.storage.registry import Registry

# gRPC adds a 5-byte message prefix and HTTP/2 a 9-byte DATA frame header per message.
FRAMING_BYTES = 14
PROMPT, NEW_TOKENS = list(range(100, 116)), 32  # every decode figure: this prompt, this many new tokens
FIRST_TOKEN_PROMPT = 128  # tokens of the prompt whose first answer token is timed
JOB_BATCH = (4, DEVICE_JOB_MAX_LENGTH)  # a personalization job's batch: rows, tokens
JOB_ROWS_WITH_ANCHOR = JOB_BATCH[0] + AnchorSettings.rows  # the rows of its one pass a step, anchor rows included
FLEET_TRAIN_BATCH = (1, 64)  # each device's batch when a fleet trains at once: rows, tokens
BARE_ROUND_TRIPS = 2000
NOISY_FRAMES_PER_S = 200
SESSIONS_PER_DEVICE = 4  # the service's default; the noisy neighbour opens as many


@dataclass
class ServeBench:
    backbone: str
    config: dict
    figures: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, value: float, target: str, **detail) -> None:
        self.figures[name] = {"value": value, "target": target, **detail}

    def rows(self) -> list[dict]:
        """One row per figure: its value, its target and the measurements behind it."""
        return [{"figure": name, "value": f["value"], "target": f["target"],
                 "detail": {k: v for k, v in f.items() if k not in ("value", "target")}} for name, f in self.figures.items()]

    def to_json(self) -> dict:
        return {"backbone": self.backbone, "config": self.config, "figures": self.figures}


def bench_registry_url(home: str) -> str:
    return f"sqlite:///{home}/bench.db"  # a throwaway registry; converted backbones are reused


def serve_backbone(spec: str, config: dict, home: str, ports, limits: dict) -> None:
    os.environ["PLORA_DB_URL"] = bench_registry_url(home)
    from plora.cloud_backbone.server import start_service
    from plora.cloud_backbone.service import Limits
    from plora.cloud_backbone.slots import STEP_TORCH_THREADS, set_step_threads
    from plora.storage.registry import open_registry

    set_step_threads(STEP_TORCH_THREADS)  # as `plora backbone serve` does by default
    server = start_service([spec], PrivateLoRAConfig.from_dict(config), open_registry(),
                           Limits(max_sessions_per_device=SESSIONS_PER_DEVICE, **limits))
    ports.put(server.port)
    server.wait()


def _base_batched_decode(model, batch: int, prompt_len: int, new_tokens: int) -> Callable[[], int]:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run() -> int:
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(new_tokens):
            logits = model(input_ids=logits.argmax(-1, keepdim=True), cache=cache, use_cache=True).logits[:, -1]
        return batch * new_tokens

    return run


def _concurrently(jobs: list[Callable[[], object]]) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _fleet_decode(devices, prompt: list[int], new_tokens: int) -> Callable[[], int]:
    def run() -> int:
        _concurrently([decode_run(device.model, prompt, new_tokens) for device in devices])
        return len(devices) * new_tokens

    return run


def _fleet_train(devices, ids: torch.Tensor) -> Callable[[], int]:
    """A training step of every device at once, each with its own optimizer."""
    steps = [train_run(device.model, list(device.model.weights.parameters()), ids) for device in devices]

    def run() -> int:
        _concurrently(steps)
        return len(devices) * ids.numel()

    return run


def train_run(model, params, ids: torch.Tensor) -> Callable[[], int]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> int:
        logits = model(ids)
        logits = getattr(logits, "logits", logits)
        loss, _ = causal_lm_loss(logits, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return ids.numel()

    return run


def run_serve_bench(spec: str, fleet: int, repeats: int, echo: Callable[[str], None]) -> ServeBench:
    from peft import LoraConfig, get_peft_model

    config = PrivateLoRAConfig()
    context = multiprocessing.get_context("spawn")
    results = ServeBench(spec, config.to_dict())
    with service_process(context, spec, config) as (home, port, pid):
        endpoint = Endpoint(f"127.0.0.1:{port}", insecure=True)
        echo(f"service up on port {port}; enrolling {fleet + 2} devices")
        enroll(home, endpoint, fleet + 2)  # the last one is the noisy neighbour
        single = DeviceProcess(context, Path(home) / "device0")
        fleet_devices = [open_device(Path(home) / f"device{i}") for i in range(1, fleet + 1)]
        mono = MonolithicModel(loading.load(spec), config)

        echo("single-device greedy decode: gRPC vs monolithic")
        runs = {"grpc": lambda: single.call("decode"), "mono": decode_run(mono, PROMPT, NEW_TOKENS)}
        rates = _alternate(runs, repeats)
        results.add("single_decode_ratio", _ratio(rates, "grpc", "mono"), ">= 0.85",
                    grpc_tok_s=statistics.median(rates["grpc"]), monolithic_tok_s=statistics.median(rates["mono"]))
        echo(f"{BARE_ROUND_TRIPS} bare round trips of the protocol's messages over gRPC loopback")
        round_trip = bare_round_trip(context, config, BARE_ROUND_TRIPS)
        round_trips = config.round_trips(mono.weights.num_layers)
        mono_s = 1 / statistics.median(rates["mono"])
        results.add("single_decode_ceiling", mono_s / (mono_s + round_trips * round_trip), "report",
                    round_trip_us=1e6 * round_trip, round_trips_per_token=round_trips)

        echo(f"noisy neighbour: single-device decode while a hostile device sends {NOISY_FRAMES_PER_S} broken frames/s into its batches")
        noisy = neighbour.measure(context, runs["grpc"], Path(home) / f"device{fleet + 1}", endpoint.address,
                                  NOISY_FRAMES_PER_S, SESSIONS_PER_DEVICE, repeats)
        results.add("noisy_neighbour_ratio", noisy.pop("ratio"), ">= 0.9", **noisy)

        echo("wire bytes per decoded token")
        per_token, minimum = single.call("wire")
        results.add("wire_bytes_ratio", per_token / minimum, "<= 1.2", bytes_per_token=per_token, minimum=float(minimum))

        echo(f"{fleet} concurrent devices vs monolithic batched decode of the base model at batch {fleet}")
        base = loading.load(spec).model
        runs = {"fleet": _fleet_decode(fleet_devices, PROMPT, NEW_TOKENS), "mono": _base_batched_decode(base, fleet, len(PROMPT), NEW_TOKENS)}
        rates = _alternate(runs, repeats)
        results.add(f"fleet{fleet}_decode_ratio", _ratio(rates, "fleet", "mono"), ">= 0.75",
                    fleet_tok_s=statistics.median(rates["fleet"]), monolithic_tok_s=statistics.median(rates["mono"]))
        service = psutil.Process(pid)
        # The fleet's devices are threads of this process, and nothing else here runs meanwhile.
        cpu = _cpu_seconds_per_token(runs["fleet"], {"cloud": lambda: sum(service.cpu_times()[:2]), "devices": time.process_time})
        alone = _cpu_seconds_per_token(runs["mono"], {"alone": time.process_time})["alone"]
        results.add(f"fleet{fleet}_cloud_cpu_ratio", alone / cpu["cloud"], "report",
                    cloud_cpu_ms_per_token=1e3 * cpu["cloud"], monolithic_cpu_ms_per_token=1e3 * alone)
        results.add(f"fleet{fleet}_decode_ceiling", alone / (cpu["cloud"] + cpu["devices"]), "report",
                    device_cpu_ms_per_token=1e3 * cpu["devices"])
        echo(f"{fleet} devices prefilling {FIRST_TOKEN_PROMPT}-token prompts at once vs the base model's batch-{fleet} prefill")
        prompt = random_prompt(FIRST_TOKEN_PROMPT, base.config.vocab_size)
        prefill = {"fleet": _fleet_decode(fleet_devices, prompt, 1), "mono": _base_batched_decode(base, fleet, len(prompt), 0)}
        runs = {name: lambda run=run: (run(), fleet * len(prompt))[1] for name, run in prefill.items()}
        rates = _alternate(runs, repeats)
        results.add(f"fleet{fleet}_prefill_ratio", _ratio(rates, "fleet", "mono"), "report",
                    fleet_tok_s=statistics.median(rates["fleet"]), monolithic_tok_s=statistics.median(rates["mono"]))
        echo(f"{fleet} devices each taking a training step at once: the default service (unbounded compute slots, "
             "steps batched) vs a slot per core, one slot, and no batching, each on a service of its own")
        _compare_services(results, context, spec, config, fleet_devices, service, repeats)

        echo("fine-tuning: split over gRPC vs monolithic PEFT LoRA (r=16, q/k/v)")
        ids = train_ids(base.config.vocab_size)
        peft_model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj"]))
        runs = {"split": lambda: single.call("train"), "lora": train_run(peft_model, [p for p in peft_model.parameters() if p.requires_grad], ids)}
        rates = _alternate(runs, repeats)
        results.add("train_ratio", _ratio(rates, "split", "lora"), ">= 0.6",
                    split_tok_s=statistics.median(rates["split"]), lora_tok_s=statistics.median(rates["lora"]))
        single.close()
        for device in fleet_devices:
            device.close()
    return results


def _compare_services(results: ServeBench, context, spec: str, config: PrivateLoRAConfig, devices, service: psutil.Process,
                      repeats: int) -> None:
    """Concurrent training steps on the bench's service (the defaults: unbounded compute slots,
    the steps batched across sessions) against services with a slot per core, with one slot, and
    with no batching, alternated: time and the service's CPU, as ratios."""
    ids = train_ids(devices[0].model.embed.num_embeddings, FLEET_TRAIN_BATCH)
    runs, services = {"default": _fleet_train(devices, ids)}, {"default": service}
    variants = {"per core": {"compute_slots": os.cpu_count() or 1}, "one": {"compute_slots": 1}, "unbatched": {"max_batched_tokens": 0}}
    with ExitStack() as stack:
        for name, limits in variants.items():
            home, port, pid = stack.enter_context(service_process(context, spec, config, **limits))
            enroll(home, Endpoint(f"127.0.0.1:{port}", insecure=True), len(devices))
            others = [stack.enter_context(closing(open_device(home / f"device{i}"))) for i in range(len(devices))]
            runs[name], services[name] = _fleet_train(others, ids), psutil.Process(pid)
        rates = _alternate(runs, repeats)
        cpu = {name: _cpu_seconds_per_token(run, {"cloud": lambda s=services[name]: sum(s.cpu_times()[:2])})["cloud"]
               for name, run in runs.items()}
    results.add(f"fleet{len(devices)}_train_slots_ratio", _ratio(rates, "per core", "default"), "report",
                one_slot=_ratio(rates, "one", "default"), cloud_cpu_per_core=cpu["per core"] / cpu["default"],
                cloud_cpu_one_slot=cpu["one"] / cpu["default"], default_tok_s=statistics.median(rates["default"]))
    results.add(f"fleet{len(devices)}_train_batched_ratio", _ratio(rates, "default", "unbatched"), "report",
                cloud_cpu_unbatched_per_batched=cpu["unbatched"] / cpu["default"],
                unbatched_tok_s=statistics.median(rates["unbatched"]))


def enroll(home: Path, endpoint: Endpoint, count: int) -> None:
    """Devices device0, device1, ... in `home`, enrolled with the service at `endpoint`."""
    _, token = Registry(open_database(bench_registry_url(home))).issue_enrollment_token(count)
    for i in range(count):
        init_device(home / f"device{i}", endpoint.address, endpoint=endpoint, enroll_token=token)


@contextmanager
def service_process(context, spec: str, config: PrivateLoRAConfig, **limits) -> Iterator[tuple[Path, int, int]]:
    """The backbone service in a child process, as it would be on its own machine, with a
    throwaway registry and `limits` (Limits' fields; the others its defaults); yields (a scratch folder for the
    bench's devices, the service's port, its pid). The folder goes when the block ends: with many
    devices' bundles, gigabytes."""
    home = tempfile.mkdtemp(prefix="plora-bench-")
    ports = context.Queue()
    server = context.Process(target=serve_backbone, args=(spec, config.to_dict(), home, ports, limits), daemon=True)
    server.start()
    try:
        yield Path(home), ports.get(timeout=600), server.pid
    finally:
        server.terminate()
        server.join()
        shutil.rmtree(home, ignore_errors=True)


class DeviceProcess:
    """A device in a process of its own, as it would be on its own machine.

    Its OpenMP threads wait passively. Spinning after each op, as they do by default, would
    burn the cores the service needs while the device waits for it, which only sharing one
    small machine with the service causes (on 2 cores, split training ran at about 0.55 of
    LoRA spinning and 0.7 to 0.85 not). The monolithic baselines keep the default."""

    def __init__(self, context, folder: Path, address: str | None = None, wire_dtypes: wire.WireDtypes = wire.WireDtypes()):
        self._pipe, child = context.Pipe()
        previous = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when the child's OpenMP starts
        try:
            self._process = context.Process(target=_device_loop, args=(folder, child, address, wire_dtypes), daemon=True)
            self._process.start()
        finally:
            if previous is None:
                del os.environ["OMP_WAIT_POLICY"]
            else:
                os.environ["OMP_WAIT_POLICY"] = previous

    def call(self, what: str, *args):
        self.send(what, *args)
        return self.answer()

    def send(self, what: str, *args) -> None:
        """Start a run of `what`; `answer` waits for it."""
        self._pipe.send((what, *args))

    def answer(self):
        answer = self._pipe.recv()
        if isinstance(answer, str):
            raise RuntimeError(f"the device process failed: {answer}")
        return answer

    def close(self) -> None:
        self._pipe.send(("stop",))
        self._process.join()


def _device_loop(folder: Path, pipe, address: str | None, wire_dtypes: wire.WireDtypes) -> None:
    device = open_device(folder, address, wire_dtypes=wire_dtypes)
    model = device.model
    vocab = model.embed.num_embeddings
    job_step = job_step_run(device)
    runs = {
        "decode": decode_run(model, PROMPT, NEW_TOKENS),
        "first_token": decode_run(model, random_prompt(FIRST_TOKEN_PROMPT, vocab), 1),
        "train": train_run(model, list(model.weights.parameters()), train_ids(vocab)),
        "job_step": lambda: _seconds_and_wire_bytes(model, job_step),
        "round_trips": lambda: model.config.round_trips(model.weights.num_layers),
        "wire": lambda: (_decode_wire_bytes(model, PROMPT, NEW_TOKENS),
                         _minimum_bytes_per_token(model.config, model)),
        "workload": lambda *args: decode_workload(device, *args),
        "replay": lambda tokens: _replay(model, tokens),
    }
    while (message := pipe.recv()) != ("stop",):
        what, *args = message
        try:
            pipe.send(runs[what](*args))
        except Exception as err:  # the parent raises it with this text
            pipe.send(f"{type(err).__name__}: {err}")
    device.close()


@torch.no_grad()
def _replay(model, tokens: int) -> int:
    """The cloud's half of decoding `tokens` tokens after PROMPT, and none of the device's: the
    prompt's embeddings cross as the state at the cut, each step sends the last one again, and
    no device layer or LM head runs. What remains is the cloud's work and the link's."""
    prompt = model.embed(torch.tensor([PROMPT]))
    model.remote(prompt, CacheMode.START)
    for _ in range(tokens):
        model.remote(prompt[:, -1:], CacheMode.EXTEND)
    return tokens


def job_step_run(device: Device) -> Callable[[], int]:
    """One optimizer step of `plora personalize`'s default job, through its own loop: a batch of
    JOB_BATCH random tokens, every one labelled, and the device's anchor rows (written on the
    first call, then kept in the device's folder, as a job keeps them). M is put back after it:
    at the job's rate, a few steps on random tokens change what the device then decodes."""
    settings = TrainSettings(steps=1, batch_size=JOB_BATCH[0], anchor=AnchorSettings(drift_budget=None))
    examples = [TokenizedExample(row, row) for row in train_ids(device.model.embed.num_embeddings, JOB_BATCH).tolist()]
    anchor: list[Anchor] = []

    def run() -> int:
        if not anchor:
            anchor.append(device_anchor(device, settings.anchor))
        kept = {name: m.detach().clone() for name, m in device.model.weights.named_tensors()}
        try:
            return personalize(device.model, examples, device.tokenizer.pad_token_id, settings, anchor=anchor[0]).tokens
        finally:
            device.model.weights.load_named_tensors(kept)

    return run


def train_ids(vocab_size: int, shape: tuple[int, int] = (4, 64)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(1))


def random_prompt(length: int, vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(2)).tolist()


def _seconds_and_wire_bytes(model, run: Callable[[], int]) -> tuple[float, float]:
    """Seconds one call of `run` takes, and the bytes it put on the wire both ways, framing included."""
    link = model.link
    bytes_before, frames_before = sum(link.wire_bytes.values()), link.wire_frames
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return seconds, sum(link.wire_bytes.values()) - bytes_before + FRAMING_BYTES * (link.wire_frames - frames_before)


def decode_run(model, prompt: list[int], new_tokens: int) -> Callable[[], int]:
    return lambda: sum(1 for _ in stream_tokens(model, prompt, new_tokens, stop_ids=set()))


@torch.no_grad()
def _decode_wire_bytes(model, prompt: list[int], new_tokens: int) -> float:
    """Bytes on the wire per decode step (one token each), prefill excluded."""
    link = model.link
    model(torch.tensor([prompt]), CacheMode.START)
    bytes_before, frames_before = sum(link.wire_bytes.values()), link.wire_frames
    for token in range(new_tokens):
        model(torch.tensor([[token]]), CacheMode.EXTEND)
    frames = link.wire_frames - frames_before
    return (sum(link.wire_bytes.values()) - bytes_before + FRAMING_BYTES * frames) / new_tokens


def _cpu_seconds_per_token(run: Callable[[], int], clocks: dict[str, Callable[[], float]]) -> dict[str, float]:
    """CPU seconds per token that one call of `run` costs on each of `clocks`."""
    before = {name: clock() for name, clock in clocks.items()}
    tokens = run()
    return {name: (clock() - before[name]) / tokens for name, clock in clocks.items()}


def _bare_messages(config: PrivateLoRAConfig) -> tuple[AdapterRequest, AdapterReply]:
    """One adapter round trip's request and reply at the configuration's widths."""
    group, members = next(iter(config.groups.items()))
    u = torch.zeros(1, 1, config.rank * config.a_count(group))
    return AdapterRequest(0, group, Phase.FORWARD, u), AdapterReply(0, group, Phase.FORWARD, torch.zeros(1, 1, config.rank * len(members)))


def _echo_serve(config: dict, ports) -> None:
    """A Session stream that answers every device message at once with an adapter request."""
    frame = wire.cloud_frame(1, _bare_messages(PrivateLoRAConfig.from_dict(config))[0])

    async def session(requests, context):
        async for _ in requests:
            yield frame

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(session)  # frames as bytes, both ways
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, {"Session": handler}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def bare_round_trip(context, config: PrivateLoRAConfig, count: int) -> float:
    """Seconds per round trip of the split protocol's messages over gRPC loopback, sent and
    read the way GrpcLink does, to a process that answers at once: serialize u·M, send it,
    receive u, parse it. No compute and no checks on either side: what the transport alone costs
    a round trip, as the device's link uses it."""
    ports = context.Queue()
    server = context.Process(target=_echo_serve, args=(config.to_dict(), ports), daemon=True)
    server.start()
    try:
        endpoint = Endpoint(f"127.0.0.1:{ports.get(timeout=60)}", insecure=True)
        request, reply = _bare_messages(config)
        with endpoint.channel() as channel:
            outbox: queue.Queue = queue.Queue()
            call = channel.stream_stream(wire.SESSION_METHOD)(iter(outbox.get, None))

            def once() -> None:
                outbox.put(wire.device_frame(1, reply))
                wire.parse_cloud_frame(next(call), request.tensor.numel())

            once()  # connects
            started = time.perf_counter()
            for _ in range(count):
                once()
            elapsed = time.perf_counter() - started
            outbox.put(None)
            call.cancel()
    finally:
        server.terminate()
        server.join()
    return elapsed / count


def _alternate(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Warm each side up, then alternate timed runs so that drift hits both alike."""
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(rate(run))
    return rates


def _ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float:
    return statistics.median(rates[top]) / statistics.median(rates[bottom])


def _minimum_bytes_per_token(config: PrivateLoRAConfig, model) -> int:
    """The hidden state both ways plus, per adapted group and layer, u down and u·M up, in float32."""
    d = model.embed.embedding_dim
    per_layer = sum((config.a_count(g) + len(members)) * config.rank for g, members in config.groups.items())
    return 4 * (2 * d + config.adapted_cloud_layers(model.weights.num_layers) * per_layer)

