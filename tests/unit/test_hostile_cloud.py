"""The device checks the cloud too: a broken or hostile service gets a typed error, and the
device's M is never touched by what it sent."""

from __future__ import annotations

import pytest
import torch

from plora.clients.device_model import DeviceModel
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.protocol.link import InProcessLink
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackwardResult,
    ForwardResult,
    Phase,
)
from plora.storage.errors import ValidationError
from tests.conftest import tiny_backbone

CONFIG = PrivateLoRAConfig(rank=4)


def _nan(request: AdapterRequest) -> AdapterRequest:
    return AdapterRequest(request.layer, request.group, request.phase, torch.full_like(request.tensor, float("nan")))


def _retyped(field: str, value):
    def tamper(request: AdapterRequest) -> AdapterRequest:
        fields = {**vars(request), field: value}
        return AdapterRequest(**fields)

    return tamper


def _reshaped(request: AdapterRequest) -> AdapterRequest:
    return AdapterRequest(request.layer, request.group, request.phase, request.tensor[..., :-1])


def _short(request: AdapterRequest) -> AdapterRequest:
    return AdapterRequest(request.layer, request.group, request.phase, request.tensor[:, :1])


def _as_double(request: AdapterRequest) -> AdapterRequest:
    return AdapterRequest(request.layer, request.group, request.phase, request.tensor.double())


TAMPERED_REQUESTS = {
    "NaN": _nan,
    "unknown layer": _retyped("layer", 99),
    "unknown group": _retyped("group", "mlp_in\udcff"),
    "wrong phase": lambda r: AdapterRequest(r.layer, r.group, Phase.BACKWARD if r.phase is Phase.FORWARD else Phase.FORWARD, r.tensor),
    "wrong width": _reshaped,
    "fewer tokens": _short,
    "float64": _as_double,
}


class HostileCloud:
    """A real cloud session whose requests (in `phase`) or results are tampered with."""

    def __init__(self, phase: Phase | None = None, tamper=None, result=None, config: PrivateLoRAConfig = CONFIG):
        self.session = CloudHalf(tiny_backbone(), config).open_session()
        self.identity = self.session.identity
        self.phase, self.tamper, self.result = phase, tamper, result

    def _ask(self, ask):
        """Send the device the tampered request, and hand the session a well-formed reply
        whatever the device answered: a hostile cloud does not stop at its own checks."""

        def call(request):
            if request.phase is not self.phase:
                return ask(request)
            ask(self.tamper(request))
            width = self.session.half.width(request.group, request.phase, "up")
            return AdapterReply(request.layer, request.group, request.phase, torch.zeros(*request.tensor.shape[:-1], width))

        return call

    def forward(self, request, ask):
        out = self.session.forward(request, self._ask(ask))
        return ForwardResult(self.result(out.hidden)) if self.result else out

    def backward(self, request, ask):
        out = self.session.backward(request, self._ask(ask))
        return BackwardResult(self.result(out.grad_input) if self.result else out.grad_input)

    def close(self):
        self.session.close()


def _device(cloud: HostileCloud) -> DeviceModel:
    model = DeviceModel(tiny_backbone().model, cloud.identity.adapter, InProcessLink(cloud))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.weights.ms.values():
            m.normal_(0, 0.1)
    return model


def _train_step(model: DeviceModel) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(torch.tensor([[1, 2, 3, 4]]))
    logits.logsumexp(-1).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("phase", [Phase.FORWARD, Phase.BACKWARD], ids=lambda p: p.value)
@pytest.mark.parametrize("name", TAMPERED_REQUESTS)
def test_a_tampered_adapter_request_is_refused_and_m_is_untouched(phase, name):
    model = _device(HostileCloud(phase, TAMPERED_REQUESTS[name]))
    before = {k: m.detach().clone() for k, m in model.weights.ms.items()}
    with pytest.raises(ValidationError):
        _train_step(model)
    assert all(torch.equal(before[k], m) for k, m in model.weights.ms.items())


@pytest.mark.parametrize("phase", [Phase.FORWARD, Phase.BACKWARD], ids=lambda p: p.value)
@pytest.mark.parametrize("layer", [0, 3], ids=["its first layer", "its last layer"])
def test_the_device_never_answers_for_a_layer_it_runs_itself(phase, layer):
    """u·M of the device's own layers would give the cloud their M by least squares."""
    config = PrivateLoRAConfig(rank=4, device_layers=1, device_last_layers=1)
    model = _device(HostileCloud(phase, _retyped("layer", layer), config=config))
    with pytest.raises(ValidationError, match=f"layer {layer} "):
        _train_step(model)


@pytest.mark.parametrize(
    "result",
    [lambda h: h[:, :-1], lambda h: torch.full_like(h, float("inf")), lambda h: h.double(), lambda h: h[..., :8]],
    ids=["fewer tokens", "infinity", "float64", "narrow"],
)
def test_a_tampered_result_is_refused(result):
    model = _device(HostileCloud(result=result))
    with pytest.raises(ValidationError, match="from the service"), torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
