"""Every zoo model: builds offline, honours the output contract, trains, has its size."""

from __future__ import annotations

import pytest
import timm
import torch

from bench.model_sizes import main as models_main
from bench.model_sizes import measure
from core.config import ConfigError
from models import ZOO, build_model
from models.losses import SegLoss
from models.pranet import RFB, PraNet
from tests.trainkit import demo_model

torch.set_num_threads(1)  # the CPUs are shared: more threads only spin

DEEP_SUPERVISION = {"pranet", "emcad"}
SIZED = {"pranet", "emcad", "deeplabv3plus_resnet50", "deeplabv3plus_regnetx320"}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3)

    entry = ZOO[name]
    if entry.comparable_m is not None:
        millions = n_params(model) / 1e6
        assert abs(millions - entry.comparable_m) <= 0.05 * entry.comparable_m, millions

    model.train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, 3, (2, 64, 64))
    out = model(x)
    if name in DEEP_SUPERVISION:
        assert isinstance(out, dict)
        assert out["logits"].shape == (2, 3, 64, 64)
        assert len(out["aux"]) == 3
        for side in out["aux"]:
            assert side.shape[:2] == (2, 3) and side.shape[-1] < 64
        binary = out.get("aux_binary", [])
        assert len(binary) == (4 if name.startswith("pranet") else 0)
        for side in binary:
            assert side.shape[:2] == (2, 1)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64, 64)

    SegLoss()(out, mask).backward()
    first = next(p for p in model.encoder.parameters() if p.requires_grad)
    assert first.grad is not None and torch.isfinite(first.grad).all()
    assert first.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 96))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (1, 3, 64, 96)
    assert torch.isfinite(logits).all()


def test_sized_models_have_published_figures() -> None:
    for name in SIZED:
        assert ZOO[name].published_m is not None, name


def test_pranet_published_count_includes_the_unused_classifier() -> None:
    """The published figure is the reference model with Res2Net-50's ImageNet classifier
    left in; PraNet never uses it, so the comparable count leaves it out."""
    with torch.device("meta"):
        res2net = timm.create_model("res2net50_26w_4s")
    entry = ZOO["pranet"]
    assert entry.comparable_m == pytest.approx(entry.published_m - n_params(res2net.fc) / 1e6)
    with torch.device("meta"):
        pranet = build_model("pranet")
    assert not any(m.out_features == 1000 for m in pranet.modules() if hasattr(m, "out_features"))


def test_num_classes_and_kwargs_override() -> None:
    model = build_model("unet", num_classes=2, encoder_name="resnet18").eval()
    assert n_params(model.encoder) == n_params(timm.create_model("resnet18", features_only=True))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_pranet_polyp_logit_drives_the_attention() -> None:
    torch.manual_seed(0)
    model = PraNet(num_classes=3, encoder_name="resnet18").eval()
    feat = torch.randn(1, 128, 8, 8)
    sure = torch.full((1, 4, 8, 8), 20.0)  # polyp logit ≫ 0: attention ≈ 0
    out = model.ra2(feat, sure)
    # everything already claimed: the stage adds only its (input-independent) bias
    assert torch.allclose(out - sure, model.ra2(torch.zeros_like(feat), sure) - sure, atol=1e-4)
    unsure = torch.full((1, 4, 8, 8), -20.0)  # nothing claimed yet: features pass
    seen = model.ra2(feat, unsure) - model.ra2(torch.zeros_like(feat), unsure)
    assert seen.abs().max() > 1e-3


def test_rfb_keeps_spatial_size_and_squeezes_channels() -> None:
    block = RFB(64, 32).eval()
    with torch.no_grad():
        assert block(torch.randn(1, 64, 11, 13)).shape == (1, 32, 11, 13)


def test_unknown_model_lists_the_zoo() -> None:
    with pytest.raises(ConfigError, match=r"unetplusplus.*smp\.<Name>"):
        build_model("unet_resnet1000")


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("unet", {}), (demo_model()["arch"], demo_model()["kwargs"]), ("pranet", {})],
)
def test_unknown_argument_is_a_config_error(arch: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="decoder_chanels"), torch.device("meta"):
        build_model(arch, decoder_chanels=16, **kwargs)


def test_the_light_variants_keep_their_published_sizes() -> None:
    """EMCAD-T (PVTv2-b0) is published at 3.92M parameters; a config entry builds it."""
    with torch.device("meta"):
        tiny = build_model("emcad", encoder_name="pvt_v2_b0")
    assert n_params(tiny) / 1e6 == pytest.approx(3.92, rel=0.05)


def test_size_table_counts_real_parameters_and_flops(capsys: pytest.CaptureFixture) -> None:
    small = measure("unet", (64, 64))
    with torch.device("meta"):
        assert small["params_m"] * 1e6 == n_params(build_model("unet"))
    # a plain conv net (no squeeze-excitation): FLOPs grow exactly with the pixel count
    assert measure("unet", (128, 128))["gflops"] == pytest.approx(
        4 * measure("unet", (64, 64))["gflops"], rel=1e-9
    )
    models_main(["--names", "emcad", "--size", "64", "96"])
    table = capsys.readouterr().out
    row = measure("emcad", (64, 96))
    line = next(x for x in table.splitlines() if x.startswith("| emcad |"))
    assert line.startswith(f"| emcad | {row['params_m']:.2f} | {row['encoder_m']:.2f} |")
    assert f"| {ZOO['emcad'].published_m:.2f} |" in line and "1×3×64×96" in table


def test_any_smp_architecture_builds_by_name_with_the_shared_encoder_argument():
    model = build_model("smp.MAnet", encoder_name="resnet18").eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    assert n_params(model.encoder) == n_params(build_model("unet", encoder_name="resnet18").encoder)
    with pytest.raises(ConfigError, match=r"smp\.Nope"):
        build_model("smp.Nope")
