"""Which devices may use the backbone service: how they enroll, and ending the sessions of
devices that may no longer use it.

A device enrolls with a token the operator issued (`plora backbone enroll create`; the
registry keeps its hash, its uses left and its expiry). Open enrollment, where anyone who
reaches the port may enroll, must be asked for, and is rate limited so that a flood of
registrations cannot fill the registry. A revoke or a forget may come from another process
sharing the registry (the CLI), so a watcher thread polls the registry about the devices that
hold sessions, and ends the sessions of those that were revoked or forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from plora.storage.errors import AuthenticationError, CapacityError, ConfigError, PloraError
from plora.storage.registry import Registry

log = logging.getLogger(__name__)

REVOCATION_POLL_S = 0.25
"""How often the watcher asks the registry; a revoke ends live sessions within about this long."""


@dataclass(frozen=True)
class Enrollment:
    open: bool = False
    """Enroll devices that bring no enrollment token, up to `per_minute` of them."""
    per_minute: int = 10
    """Open enrollments accepted per minute, in bursts of up to as many."""

    def __post_init__(self) -> None:
        if self.per_minute < 1:
            raise ConfigError(f"open enrollment needs a rate of at least 1 device per minute, got {self.per_minute}")


class OpenEnrollmentGate:
    """Admits registrations that bring no enrollment token: none unless enrollment is open, and
    then a token bucket, refilled at `per_minute` and holding as many."""

    def __init__(self, enrollment: Enrollment, clock: Callable[[], float] = time.monotonic):
        self.enrollment, self._clock = enrollment, clock
        self._level, self._at = float(enrollment.per_minute), clock()
        self._lock = threading.Lock()

    def admit(self) -> None:
        if not self.enrollment.open:
            raise AuthenticationError(
                "this service enrolls only devices that bring an enrollment token; ask its operator for one "
                "(`plora backbone enroll create`) and pass it with `plora device init --enroll-token`"
            )
        rate = self.enrollment.per_minute / 60.0
        with self._lock:
            now = self._clock()
            self._level = min(float(self.enrollment.per_minute), self._level + (now - self._at) * rate)
            self._at = now
            if self._level < 1.0:
                wait = (1.0 - self._level) / rate
                raise CapacityError(
                    f"open enrollment takes at most {self.enrollment.per_minute} devices per minute; retry in {wait:.1f} s"
                )
            self._level -= 1.0


class RevocationWatcher:
    """A thread that ends the sessions of devices revoked or forgotten, whichever process did it.

    `live_devices` names the devices holding sessions now; `end(device_id, reason)` ends theirs."""

    def __init__(
        self,
        registry: Registry,
        live_devices: Callable[[], set[str]],
        end: Callable[[str, str], None],
        every_s: float = REVOCATION_POLL_S,
    ):
        self._registry, self._live_devices, self._end, self._every_s = registry, live_devices, end, every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plora-revocations", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            devices = self._live_devices()
            if not devices:
                continue
            try:
                inactive = self._registry.inactive_devices(devices)
            except (SQLAlchemyError, PloraError) as err:
                if not self._failing:  # once per outage, not four times a second
                    log.warning("cannot check the registry for revoked devices (retrying): %s", err)
                self._failing = True
                continue
            if self._failing:
                log.info("the registry answers again; revoked devices are checked again")
                self._failing = False
            for device_id, reason in inactive.items():
                log.info("ending the sessions of device %s: %s", device_id, reason)
                self._end(device_id, reason)
