"""Pretrained weights without a network: local encoder files, clear errors offline."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from models import PretrainedWeightsError, build_model, export_encoder, read_state_dict
from tests.trainkit import demo_model

# Light variants as configs spell them: the demo's UNet, and zoo models on ResNet-18.
VARIANTS = {
    "unet_mobilenetv3": demo_model(),
    "pranet_resnet18": {"arch": "pranet", "kwargs": {"encoder_name": "resnet18"}},
    "unet_resnet18": {"arch": "unet", "kwargs": {"encoder_name": "resnet18"}},
}


def variant(name: str, **kwargs) -> torch.nn.Module:
    entry = VARIANTS[name]
    return build_model(entry["arch"], **{**entry["kwargs"], **kwargs})


torch.set_num_threads(1)


def encoder_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", ["unet_mobilenetv3", "pranet_resnet18", "unet_resnet18"])
def test_encoder_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    torch.manual_seed(0)
    a = variant(name)
    path = export_encoder(a, tmp_path / f"encoder{suffix}")
    torch.manual_seed(1)
    fresh = variant(name)
    assert not encoder_equal(a, fresh)  # different seeds, so the load below is what matters
    torch.manual_seed(1)
    b = variant(name, pretrained=str(path))
    assert encoder_equal(a, b)
    # only the encoder comes from the file: the rest keeps b's own initialisation
    decoder_a = {k: v for k, v in a.state_dict().items() if not k.startswith("encoder.")}
    decoder_b = {k: v for k, v in b.state_dict().items() if not k.startswith("encoder.")}
    assert any(not torch.equal(decoder_a[k], decoder_b[k]) for k in decoder_a)


def test_plain_timm_checkpoint_loads_into_smp_timm_encoder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a user downloads from the hub: the whole timm classifier, keys without smp's
    # `model.` prefix, classifier weights included.
    torch.manual_seed(0)
    backbone = timm.create_model("mobilenetv3_small_100")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    with caplog.at_level(logging.WARNING, logger="models.pretrained"):
        model = variant("unet_mobilenetv3", pretrained=path)
    loaded = model.encoder.state_dict()
    for key, value in backbone.state_dict().items():
        if f"model.{key}" in loaded:
            assert torch.equal(loaded[f"model.{key}"], value)
    assert "classifier.weight" in caplog.text  # reported as unused, not silently dropped


def test_training_checkpoint_wrapper_is_unwrapped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = variant("pranet_resnet18")
    path = tmp_path / "best.pt"
    torch.save({"model": a.state_dict(), "epoch": 3}, path)
    assert encoder_equal(a, variant("pranet_resnet18", pretrained=path))


def test_shape_mismatch_is_refused_naming_the_keys(tmp_path: Path) -> None:
    narrow = variant("unet_mobilenetv3", encoder_name="tu-mobilenetv3_small_050")
    path = export_encoder(narrow, tmp_path / "narrow.safetensors")
    with pytest.raises(
        PretrainedWeightsError,
        match=r"wrong shape.*model\.blocks\.0\.0\.bn2\.bias: file \(8,\) vs encoder \(16,\)",
    ):
        variant("unet_mobilenetv3", pretrained=path)


def test_file_matching_nothing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"head.fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(PretrainedWeightsError, match="none of its 1 keys"):
        variant("unet_mobilenetv3", pretrained=path)


def test_missing_keys_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = variant("pranet_resnet18")
    state = a.encoder.state_dict()
    dropped = "layer4.1.conv2.weight"
    del state[dropped]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="models.pretrained"):
        variant("pranet_resnet18", pretrained=path)
    assert "1 encoder keys not in the file" in caplog.text and dropped in caplog.text


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(PretrainedWeightsError, match=r"broken\.safetensors"):
        read_state_dict(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match=r"not found.*pretrained: none"):
        variant("unet_mobilenetv3", pretrained=tmp_path / "nope.pth")


@pytest.mark.parametrize("spec", [None, "none", "None", ""])
def test_none_means_random_init(spec: str | None) -> None:
    torch.manual_seed(0)
    a = variant("unet_mobilenetv3", pretrained=spec)
    torch.manual_seed(0)
    assert encoder_equal(a, variant("unet_mobilenetv3"))


@pytest.mark.parametrize("name", ["pranet_resnet18", "unet_resnet18", "unet_mobilenetv3"])
def test_imagenet_offline_fails_fast_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # huggingface_hub reads these once at import, so patch the module constants too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Offline means no connection is even tried (a try would hang on a firewalled host):
    # every attempt is recorded and refused.
    attempts: list[tuple[object, ...]] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # name lookup comes first
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(PretrainedWeightsError) as info:
        variant(name, pretrained="imagenet")
    assert attempts == []
    message = str(info.value)
    arch = VARIANTS[name]["arch"]
    assert arch in message and "pretrained: none" in message and "local file" in message
