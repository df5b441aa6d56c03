"""Who may enroll (the open-enrollment gate) and the device's credential file."""

import json
import stat

import pytest

from plora.clients.grpc_link import Credentials
from plora.cloud_backbone.device_access import Enrollment, OpenEnrollmentGate
from plora.storage.errors import AuthenticationError, CapacityError, ConfigError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_open_enrollment_a_device_needs_a_token():
    with pytest.raises(AuthenticationError, match="only devices that bring an enrollment token.*--enroll-token"):
        OpenEnrollmentGate(Enrollment()).admit()


def test_open_enrollment_takes_a_burst_of_its_rate_then_refills_at_that_rate():
    clock = Clock()
    gate = OpenEnrollmentGate(Enrollment(open=True, per_minute=3), clock)
    for _ in range(3):
        gate.admit()
    with pytest.raises(CapacityError, match=r"at most 3 devices per minute; retry in 20\.0 s"):
        gate.admit()
    clock.now += 19.9
    with pytest.raises(CapacityError):
        gate.admit()
    clock.now += 0.2  # 20 s: one enrollment's worth
    gate.admit()
    clock.now += 3600  # a long quiet spell refills the bucket, never beyond its size
    for _ in range(3):
        gate.admit()
    with pytest.raises(CapacityError):
        gate.admit()


def test_open_enrollment_needs_a_positive_rate():
    with pytest.raises(ConfigError, match="at least 1 device per minute"):
        Enrollment(open=True, per_minute=0)


def test_credentials_stay_owner_only_when_they_overwrite_a_wider_file(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text("{}")
    path.chmod(0o644)
    Credentials("0" * 32, "secret").save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"device_id": "0" * 32, "token": "secret"}
    assert Credentials.load(path) == Credentials("0" * 32, "secret")
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.json"]  # no temp file left behind
