"""Starting and stopping the backbone service: gRPC, TLS, health and metrics over HTTP."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc

from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.device_access import Enrollment
from plora.cloud_backbone.metrics import Metrics
from plora.cloud_backbone.recording import Recording
from plora.cloud_backbone.service import BackboneService, Limits, prepare_version
from plora.cloud_backbone.servicer import SplitBackboneServicer, add_to_server
from plora.cloud_backbone.slots import ComputeSlots
from plora.cloud_backbone.versions import load_version
from plora.storage.errors import ConfigError
from plora.storage.paths import plora_home
from plora.storage.registry import Registry

log = logging.getLogger(__name__)

MIN_PING_INTERVAL_MS = 500
"""How often a device may ping the service while no data flows; a ping sooner is a strike, and
gRPC ends a connection with GOAWAY "too_many_pings" at its third. A device's keepalive pings
every 30 s and gRPC's client adds BDP pings, at most one a second (gRPC's client waits 1 s
between pings), more often than gRPC's default of one in 5 minutes allows. Until this option
was given under gRPC's own name (an unknown one is ignored), 10 of 16 devices idle for 200 s on a
busy machine got GOAWAY, and a retry on a new session, at or before their next step."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path

    def credentials(self) -> grpc.ServerCredentials:
        for path in (self.cert, self.key):
            if not path.is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())])


def _http_handler(server: RunningServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/healthz":
                self._reply(200, b"ok\n", "text/plain")
            elif self.path == "/readyz":
                ready = not server.service.draining
                self._reply(200 if ready else 503, b"ready\n" if ready else b"draining\n", "text/plain")
            elif self.path == "/metrics":
                self._reply(200, server.metrics.exposition(), "text/plain; version=0.0.4")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # keep probes out of the log
            pass

    return Handler


class RunningServer:
    """A started service. `port` is the bound gRPC port (useful with port 0).

    gRPC's asyncio server runs on an event loop of its own thread, so that starting,
    stopping and waiting stay plain calls for the command line and for tests."""

    def __init__(
        self, service: BackboneService, host: str, port: int, tls: TLSFiles | None, http_port: int | None, http_host: str = "127.0.0.1"
    ):
        self.service = service  # from here on, stopping the server closes it
        self.metrics = Metrics()
        self.metrics.track_memory(service.memory.used)
        self.metrics.track_batching(service.batching)
        self._servicer = SplitBackboneServicer(service, self.metrics)
        self.http = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="plora-grpc", daemon=True)
        try:
            # Bind the HTTP port first: if it is taken, nothing has started yet.
            if http_port is not None:
                try:
                    self.http = ThreadingHTTPServer((http_host, http_port), _http_handler(self))
                except OSError as err:
                    raise ConfigError(f"cannot listen on {http_host}:{http_port} for health and metrics: {err}") from err
            self._thread.start()
            self.grpc, self.port = self._call(self._start(host, port, tls))
        except BaseException:
            if self._thread.is_alive():
                self._stop_loop()
            if self.http:
                self.http.server_close()
            self._close_compute()
            raise
        if self.http:
            threading.Thread(target=self.http.serve_forever, name="plora-http", daemon=True).start()
        log.info("serving %s on %s:%d", sorted(service.versions), host, self.port)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _start(self, host: str, port: int, tls: TLSFiles | None) -> tuple[grpc.aio.Server, int]:
        limits = self.service.limits
        options = [
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # gRPC shares a port with another server by default; a second service on the same
            # port would take half the devices' sessions, so a taken port must be an error.
            ("grpc.so_reuseport", 0),
            # Keepalive finds devices that vanished without closing their connection.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        # Each kind of call has its own budget in the servicer, so that a flood of one kind
        # cannot starve the others; gRPC's own cap only bounds what is left (unauthenticated calls).
        budgets = limits.max_sessions + limits.max_bundle_downloads + 5 * limits.max_unary_calls
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=2 * budgets)
        add_to_server(self._servicer, server)
        address = f"{host}:{port}"
        try:
            bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"cannot listen on {address}")
        await server.start()
        return server, bound

    @property
    def http_port(self) -> int | None:
        return self.http.server_address[1] if self.http else None

    def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new sessions, give those in flight `grace_s` to finish, then cancel them."""
        self.service.draining = True
        if self._loop.is_running():
            self._call(self.grpc.stop(grace_s))
            self._stop_loop()
            self._close_compute()
        if self.http:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def _close_compute(self) -> None:
        self._servicer.close()
        self.service.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()


class PeerGone(logging.Filter):
    """gRPC's asyncio server logs a traceback when the status that ends a call cannot be sent
    because its device has gone (it cancelled, or its connection dropped, just as the handler
    returned): a race no handler can close, and nothing failed but the goodbye. Such a record
    keeps its line, as INFO, without the traceback, so that devices that come and go cannot
    flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ == "ExecuteBatchError" and "SendStatusFromServerOperation" in str(error):
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg} (the device had gone; its status was not sent)"
        return True


def _quiet_gone_peers() -> None:
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, PeerGone) for f in grpc_log.filters):
        grpc_log.addFilter(PeerGone())


def start_service(
    specs: list[str],
    config: PrivateLoRAConfig,
    registry: Registry,
    limits: Limits = Limits(),
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TLSFiles | None = None,
    http_port: int | None = None,
    http_host: str = "127.0.0.1",
    registered: Sequence[str] = (),
    enrollment: Enrollment = Enrollment(),
    record: Path | None = None,
) -> RunningServer:
    """Load each backbone, prepare its device bundle and cloud half, and start serving.

    `specs` are backbones to host with adapter `config`; `registered` names versions from
    the registry, each hosted with its own registered config. Devices enroll as `enrollment`
    says: by default only with an enrollment token from the registry. With `record`, every
    session's traffic is captured there for a privacy audit (cloud_backbone.recording)."""
    _quiet_gone_peers()
    loaded = [(loading.load(spec), config) for spec in specs]
    loaded += [load_version(registry.get_backbone(name)) for name in registered]
    names = [backbone.identity(cfg).version for backbone, cfg in loaded]
    if len(set(names)) != len(names):
        raise ConfigError(f"a backbone version is listed twice: {names}")
    bundles = plora_home() / "bundles"
    compute = ComputeSlots(limits.compute_slots)  # the versions share the cores
    versions = [prepare_version(backbone, cfg, bundles, limits, compute) for backbone, cfg in loaded]
    recording = Recording(record) if record is not None else None
    service = BackboneService(versions, registry, limits, enrollment, recording)
    return RunningServer(service, host, port, tls, http_port, http_host)
