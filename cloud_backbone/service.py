"""The backbone service's domain: hosted versions, device credentials, sessions and limits.

It knows nothing of gRPC. The servicer parses, checks and maps errors; this module decides.
"""

from __future__ import annotations

import copy
import hmac
import logging
import os
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.batching import MAX_BATCHED_TOKENS
from plora.cloud_backbone.budget import MemoryBudget
from plora.cloud_backbone.compute import CloudHalf, CloudSession
from plora.cloud_backbone.device_access import Enrollment, OpenEnrollmentGate, RevocationWatcher
from plora.cloud_backbone.loading import Backbone, save_checkpoint
from plora.cloud_backbone.protocol.messages import BackboneIdentity, OpenSession
from plora.cloud_backbone.protocol.bundle import bundle_digest
from plora.cloud_backbone.recording import Recording
from plora.cloud_backbone.slots import ComputeSlots
from plora.cloud_backbone.versions import ensure_version
from plora.storage.errors import AuthenticationError, CapacityError, ConfigError, RegistryError, VersionMismatchError
from plora.storage.files import exclusive
from plora.storage.models import BackboneStatus, utcnow
from plora.storage.registry import JobReport, Registry
from plora.storage.tokens import hash_token, new_token

log = logging.getLogger(__name__)

LAST_SEEN_EVERY = timedelta(minutes=1)
"""How stale a device's last-seen time may get: updating it costs a registry write."""


def _half_of_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 32 << 20
    max_tokens_per_session: int = 4096
    max_step_tokens: int = 8192
    """Batch × tokens of one forward or backward step."""
    max_sessions: int = 64
    max_sessions_per_device: int = 4
    """Streams a device may hold, open or still opening."""
    session_memory_bytes: int = 4 << 30
    """KV cache, training graph and the step in flight of one session (see budget.py)."""
    total_memory_bytes: int = field(default_factory=_half_of_memory)
    """The same, for every session together."""
    first_frame_timeout_s: float = 5.0
    """A stream that has not sent OpenSession by then is closed."""
    reply_timeout_s: float = 30.0
    """How long the service waits for a device's adapter reply before failing its session."""
    write_timeout_s: float = 10.0
    """How long a write to a device may wait for it to read, before its session is closed."""
    max_batched_tokens: int = MAX_BATCHED_TOKENS
    """Steps of at most this many tokens (all their rows) run batched with other sessions'
    concurrent steps; longer ones run alone. 0: every step runs alone."""
    late_reply_floor_s: float = 0.25
    late_reply_factor: float = 5.0
    """A row of a batched step is taken out of the batch once its reply is later than
    max(floor, factor × the median reply time of the batch's other rows)."""
    idle_timeout_s: float = 600.0
    """A session with no step for this long is closed and its memory freed."""
    max_bundle_downloads: int = 4
    bundle_timeout_s: float = 600.0
    max_unary_calls: int = 16
    """Register, Describe, ForgetDevice, ReportJobs and authentication calls in flight, each; more are refused, not queued."""
    compute_slots: int = 0
    """Steps that run torch at once, each with torch's threads (cloud_backbone.slots); 0: any number."""
    failed_steps_per_minute: int = 10
    """Steps a device may make fail by its own fault (malformed input, steps out of protocol)
    before its next ones are refused unrun, until the allowance refills; 0: no limit."""

    @property
    def max_tensor_elements(self) -> int:
        return self.max_message_bytes // 2  # the smallest wire dtype has 2 bytes


def export_device_bundle(backbone: Backbone, config: PrivateLoRAConfig, folder: Path) -> None:
    """Write the device's half as a Hugging Face checkpoint folder: config (with only the
    device-side layers: the first ones, then the last ones), tokenizer, embeddings, those
    layers, final norm and LM head. No A or B: the device derives its own layers' projections
    from the public seed."""
    model = backbone.model
    num_layers = backbone.num_layers
    # Bundle layer j holds backbone layer kept[j].
    kept = [*range(config.device_layers), *range(num_layers - config.device_last_layers, num_layers)]
    config_k = copy.deepcopy(model.config)
    config_k.num_hidden_layers = len(kept)
    if isinstance(getattr(config_k, "layer_types", None), list):
        config_k.layer_types = [config_k.layer_types[i] for i in kept]
    device_part = type(model)(config_k)
    source = model.state_dict()

    def source_key(key: str) -> str:
        prefix, dot, rest = key.partition("layers.")
        if not dot:
            return key
        j, _, name = rest.partition(".")
        return f"{prefix}layers.{kept[int(j)]}.{name}"

    device_part.load_state_dict({k: source[source_key(k)] for k in device_part.state_dict()}, strict=True)
    save_checkpoint(device_part, backbone.tokenizer, folder)


@dataclass
class HostedVersion:
    half: CloudHalf
    source: str  # the spec that loads it: "embedded" or a path
    bundle: Path
    bundle_sha256: str
    bundle_size: int

    @property
    def identity(self) -> BackboneIdentity:
        return self.half.identity


def prepare_version(
    backbone: Backbone, config: PrivateLoRAConfig, bundle_root: Path, limits: Limits = Limits(), compute: ComputeSlots | None = None
) -> HostedVersion:
    """Prepare a backbone version for serving: its device bundle first, then its cloud half
    (which takes the decoder layers out of the model), computing in `compute`'s slots."""
    bundle = bundle_root / backbone.identity(config).version
    bundle_root.mkdir(parents=True, exist_ok=True)
    # Replicas sharing this folder start together: one writes the bundle, the others find it.
    with exclusive(bundle_root / f".{bundle.name}.lock"):
        if not (bundle / "config.json").is_file():
            export_device_bundle(backbone, config, bundle)
    digest, size = bundle_digest(bundle)
    half = CloudHalf(backbone, config, compute)
    if limits.max_batched_tokens:
        half.enable_batching(late_floor_s=limits.late_reply_floor_s, late_factor=limits.late_reply_factor,
                             max_tokens=limits.max_batched_tokens)
    return HostedVersion(half, backbone.source.spec, bundle, digest, size)


@dataclass
class ServiceSession:
    session_id: str
    device_id: str
    version: HostedVersion
    cloud: CloudSession
    on_end: Callable[[str], None] | None = None
    """Set by whoever serves the session, right after it opens: ends it from any thread."""

    def end(self, reason: str) -> None:
        """End the session for `reason` (its device was revoked or forgotten). Before `on_end` is
        set this does nothing, and the revocation watcher asks again a moment later."""
        if self.on_end is not None:
            self.on_end(reason)


class BackboneService:
    def __init__(
        self,
        versions: list[HostedVersion],
        registry: Registry,
        limits: Limits = Limits(),
        enrollment: Enrollment = Enrollment(),
        recording: Recording | None = None,
    ):
        if not versions:
            raise ConfigError("the service needs at least one backbone version to host")
        self.versions = {v.identity.version: v for v in versions}
        self.registry = registry
        self.limits = limits
        self.recording = recording  # an audit's captures of every session, when the operator asked for them
        self._sessions: dict[str, ServiceSession] = {}
        self._lock = threading.Lock()
        self.memory = MemoryBudget(limits.total_memory_bytes, limits.session_memory_bytes)
        self.draining = False
        for version in versions:
            ensure_version(registry, version.identity, version.source)
        self._open_enrollment = OpenEnrollmentGate(enrollment)
        self._revocations = RevocationWatcher(registry, self._live_devices, self.end_sessions_of)
        self._revocations.start()

    def hosted(self, name: str = "") -> HostedVersion:
        """A hosted version by name; with none, the one new devices are bound to: the
        registry's default if hosted here, else the first hosted active version."""
        if name:
            if name not in self.versions:
                raise VersionMismatchError(f"backbone version {name!r} is not hosted here; hosted: {sorted(self.versions)}")
            return self.versions[name]
        default = self.registry.default_backbone()
        if default is not None and default.name in self.versions:
            return self.versions[default.name]
        for version in self.versions.values():
            if self.registry.get_backbone(version.identity.version).status == BackboneStatus.ACTIVE:
                return version
        raise VersionMismatchError(f"no active version is hosted here; hosted: {sorted(self.versions)}")

    def register_device(
        self, backbone: str = "", label: str | None = None, enroll_token: str = ""
    ) -> tuple[str, str, HostedVersion]:
        """A new device bound to a hosted, active version: (device id, token shown once, version).

        It needs an enrollment token the operator issued, whose use it takes up, unless
        enrollment is open (rate limited)."""
        if not enroll_token:
            self._open_enrollment.admit()
        version = self.hosted(backbone)
        status = self.registry.get_backbone(version.identity.version).status
        if status != BackboneStatus.ACTIVE:
            raise VersionMismatchError(f"backbone version {version.identity.version!r} is {status}: it takes no new devices")
        device_id, token = uuid.uuid4().hex, new_token()
        self.registry.register_device(device_id, version.identity.version, label=label or None, token_hash=hash_token(token),
                                      enrollment_token=enroll_token or None)
        log.info("registered device %s on %s (%s)", device_id, version.identity.version,
                 "enrollment token" if enroll_token else "open enrollment")
        return device_id, token, version

    def authenticate(self, device_id: str, token: str, allow_revoked: bool = False) -> None:
        """Check a device's credentials. A revoked device is refused, except where `allow_revoked`:
        a revoked device may still have itself forgotten."""
        if not device_id or not token:
            raise AuthenticationError("missing device credentials; send x-plora-device and a bearer token")
        try:
            device = self.registry.get_device(device_id)
        except RegistryError:
            device = None
        stored = device.token_hash if device is not None else None
        # Compare even for unknown devices, so timing does not reveal which ids exist.
        if not hmac.compare_digest(stored or "", hash_token(token)) or stored is None:
            raise AuthenticationError(f"wrong credentials for device {device_id!r}")
        if device.revoked_at is not None and not allow_revoked:
            raise AuthenticationError(
                f"device {device_id} was revoked by the service's operator on {device.revoked_at:%Y-%m-%d %H:%M} UTC; "
                "ask the operator, or enroll a new device"
            )
        if device.last_seen_at is None or utcnow() - device.last_seen_at > LAST_SEEN_EVERY:
            self.registry.touch_device(device_id)

    def open_session(self, device_id: str, request: OpenSession) -> ServiceSession:
        if self.draining:
            raise CapacityError("the service is shutting down; reconnect to another instance")
        version = self.versions.get(request.expected.version)
        if version is None:
            raise VersionMismatchError(
                f"no hosted version matches the device's {request.expected.version} "
                f"({request.expected.name}, hash {request.expected.content_hash[:12]}); hosted: {sorted(self.versions)}"
            )
        version.identity.require_match(request.expected)
        if self.registry.get_backbone(version.identity.version).status == BackboneStatus.RETIRED:
            raise VersionMismatchError(f"backbone version {version.identity.version!r} is retired; migrate the device to a newer one")
        max_tokens = min(request.max_tokens or self.limits.max_tokens_per_session, self.limits.max_tokens_per_session)
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise CapacityError(f"the service holds its limit of {self.limits.max_sessions} sessions; retry later")
            mine = sum(s.device_id == device_id for s in self._sessions.values())
            if mine >= self.limits.max_sessions_per_device:
                raise CapacityError(f"device {device_id} already has {mine} sessions, the limit per device")
            account = self.memory.open(version.half.costs.smallest_step())
            cloud = version.half.open_session(max_tokens, self.limits.max_step_tokens, account)
            session = ServiceSession(uuid.uuid4().hex, device_id, version, cloud)
            self._sessions[session.session_id] = session
        return session

    def close(self) -> None:
        """Stop the revocation watcher and every hosted version's decode batching; call once no
        session runs any more."""
        self._revocations.stop()
        for version in self.versions.values():
            version.half.close()

    def close_session(self, session: ServiceSession) -> None:
        with self._lock:
            self._sessions.pop(session.session_id, None)
        session.cloud.close()

    def _live_devices(self) -> set[str]:
        with self._lock:
            return {s.device_id for s in self._sessions.values()}

    def end_sessions_of(self, device_id: str, reason: str) -> None:
        """End every live session of the device, from any thread."""
        with self._lock:
            theirs = [s for s in self._sessions.values() if s.device_id == device_id]
        for session in theirs:
            session.end(reason)

    def record_job_reports(self, device_id: str, reports: list[JobReport]) -> int:
        """Keep what a device reports of its jobs (metadata only; see Registry.record_job_report),
        so that the operator's `plora jobs list` shows the jobs of devices on hosts of their own."""
        for report in reports:
            self.registry.record_job_report(device_id, report)
        return len(reports)

    def forget_device(self, device_id: str) -> dict[str, int]:
        """Delete everything the service keeps about the device, and end its sessions; returns
        the records deleted, by kind. This is the one place that forgets a device: whatever
        comes to keep data about devices (audit captures, reported job metadata) deletes it here."""
        removed = self.registry.forget_device(device_id)
        self.end_sessions_of(device_id, "the device was forgotten")
        if self.recording is not None:
            removed["captured steps"] = self.recording.forget(device_id)
        return removed

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def accounted_bytes(self) -> dict[str, int]:
        """Bytes the sessions hold, per kind (kv, graph, pending)."""
        return self.memory.used()

    def batching(self) -> dict[str, int]:
        """What every hosted version's batcher ran since the service started: passes and their
        rows (steps), batched backwards and their rows."""
        batchers = [v.half.batcher for v in self.versions.values() if v.half.batcher is not None]
        return {what: sum(getattr(b, what) for b in batchers) for what in ("batches", "rows", "backwards", "backward_rows")}
