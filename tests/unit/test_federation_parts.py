"""The federation's parts that need no fleet: its settings, what a device accepts as the fleet's
M, the privacy accounting, and the Flower App it runs as."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.platform.fleet import federation, superlink
from plora.platform.fleet.settings import FEDAVG, FleetSettings
from plora.storage.errors import ConfigError, ValidationError

IDENTITY = BackboneIdentity("tiny", "hash", 4, 64, PrivateLoRAConfig(rank=4))


def settings(**overrides) -> FleetSettings:
    return FleetSettings(Path("/tmp/fleet"), "127.0.0.1:50051", **overrides)


def test_federation_settings_travel_in_the_run_config_and_are_checked():
    chosen = settings(strategy=FEDAVG, secure_aggregation=False, dp_noise=1.5, opt_out="3,7")
    assert FleetSettings.from_run_config(chosen.to_run_config()) == chosen
    assert [chosen.opts_out(i) for i in (3, 4, 7)] == [True, False, True]
    for bad in ({"strategy": "fedprox"}, {"dp_noise": -1.0}, {"dp_clip": 0.0}, {"dp_delta": 1.0}, {"opt_out": "3;7"}):
        with pytest.raises(ConfigError):
            settings(**bad)
    with pytest.raises(ConfigError, match="secure-aggregation"):  # a bool, not a number or a string
        FleetSettings.from_run_config({**chosen.to_run_config(), "secure-aggregation": 1})


def test_a_federated_fleet_runs_the_federation_apps():
    assert superlink.flower_app(settings(strategy=FEDAVG))["tool"]["flwr"]["app"]["components"] == superlink.FEDERATION_COMPONENTS
    assert superlink.flower_app(settings())["tool"]["flwr"]["app"]["components"] == superlink.COMPONENTS


def test_a_device_takes_as_the_fleets_m_only_finite_matrices_of_its_own_shape():
    names = federation.tensor_names(IDENTITY)
    good = [np.zeros((4, 4), dtype=np.float32) for _ in names]
    assert list(federation.as_tensors(good, IDENTITY)) == names
    nan = [*good[:-1], np.full((4, 4), np.nan, dtype=np.float32)]
    for bad in (good[:-1], [*good, good[0]], [*good[:-1], np.zeros((4, 5), np.float32)],
                [*good[:-1], np.zeros((4, 4), np.int64)], nan, [*good[:-1], np.zeros((16,), np.float32)]):
        with pytest.raises(ValidationError):
            federation.as_tensors(bad, IDENTITY)


def test_a_device_said_identity_is_checked_field_by_field():
    assert federation.identity_from_json(federation.identity_json(IDENTITY)) == IDENTITY
    for bad in ("", "[]", '{"name": "x"}', federation.identity_json(IDENTITY).replace('"num_layers": 4', '"num_layers": "four"')):
        with pytest.raises(ValidationError):
            federation.identity_from_json(bad)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert federation.epsilon(1.0, 0, 1e-5) == 0.0
    one, ten = federation.epsilon(1.0, 1, 1e-5), federation.epsilon(1.0, 10, 1e-5)
    assert 0 < one < ten < 10 * one  # RDP composes better than adding epsilons
    assert federation.epsilon(4.0, 10, 1e-5) < ten


def test_what_is_not_m_in_a_round_is_left_out_as_a_failure(tmp_path):
    from flwr.common import Code, FitRes, Status, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    names = federation.tensor_names(IDENTITY)

    def result(arrays: list[np.ndarray]) -> tuple[None, FitRes]:
        return None, FitRes(Status(Code.OK, ""), federation.ndarrays_to_parameters(arrays), num_examples=1, metrics={})

    ones = [np.ones((4, 4), np.float32) for _ in names]
    threes = [np.full((4, 4), 3.0, np.float32) for _ in names]
    hostile = [result(ones[:-1]), result([*ones[:-1], np.ones((400, 400), np.float32)]),
               result([*ones[:-1], np.full((4, 4), np.inf, np.float32)])]
    rounds = federation.FederatedRounds(FedAvg(), set(), settings(strategy=FEDAVG), IDENTITY, tmp_path / "m0.safetensors", 0,
                                        tmp_path / "federation.jsonl")
    rounds.line = {"sampled": 5}
    aggregate, _ = rounds.aggregate_fit(1, [result(ones), *hostile, result(threes)], [])
    assert all(np.allclose(array, 2.0) for array in parameters_to_ndarrays(aggregate))
    assert (rounds.line["contributed"], rounds.line["dropped"]) == (2, 3)


def test_a_round_takes_the_version_most_joined_devices_are_bound_to():
    newer = BackboneIdentity("tiny", "hash-2", 4, 64, PrivateLoRAConfig(rank=4))

    def said(identity) -> dict:
        return {"reply": {"identity": federation.identity_json(identity)}}

    joined = {1: said(IDENTITY), 2: said(newer), 3: said(newer), 4: {"reply": {"identity": "{"}}, 5: {"reply": {}}}
    assert federation._version_of_the_round(joined) == (newer, [2, 3])
    assert federation._version_of_the_round({4: joined[4]}) == (None, [])
