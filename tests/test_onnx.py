"""ONNX export of every zoo architecture: onnxruntime gives torch's probabilities."""

from __future__ import annotations

import pytest
import torch

from export import ONNX_OPSET, export_onnx
from infer import OnnxNetwork
from models import ZOO, build_model
from models.inference import Probabilities
from tests.trainkit import demo_model

# On probabilities, what the chain averages: a quarter of the store's 1/255 step. Float
# sums in another order moved them by 1e-7 to 1.3e-4 here (the most for the random
# ResNet-34 UNet, whose logits reach 40).
TOLERANCE = 1e-3
# The zoo's entries as the competition config builds them, but DeepLabV3+ on RegNetX-320
# (109M parameters, a 440 MB file) is checked with the smallest RegNetX: the same
# decoder and encoder family, a hundredth of the weights.
LIGHTER = {"deeplabv3plus_regnetx320": {"encoder_name": "tu-regnetx_002"}}
DEMO = {name: demo_model(name) for name in ("unet_mobilenetv3", "fpn_mobilenetv3")}


def networks() -> list[tuple[str, str, dict]]:
    zoo = [(name, name, LIGHTER.get(name, {})) for name in sorted(ZOO)]
    return zoo + [(name, m["arch"], m["kwargs"]) for name, m in DEMO.items()]


@pytest.mark.parametrize(("name", "arch", "kwargs"), networks(), ids=[n[0] for n in networks()])
def test_onnx_matches_torch_at_other_batches_and_sizes(name, arch, kwargs, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, **kwargs).eval()
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, (64, 96))
    onnx = OnnxNetwork(path, threads=1, device=torch.device("cpu"))
    for shape in [(1, 3, 64, 96), (3, 3, 96, 128)]:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = Probabilities(model)(images)
            got = Probabilities(onnx)(images)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < TOLERANCE, (name, shape)


def test_the_exported_graph_states_its_opset(tmp_path):
    import onnx

    model = build_model(DEMO["fpn_mobilenetv3"]["arch"], **DEMO["fpn_mobilenetv3"]["kwargs"])
    export_onnx(model.eval(), tmp_path / "m.onnx", (64, 64))
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {ONNX_OPSET}
