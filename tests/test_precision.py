"""train.precision by the GPU's capability: bf16 only where the GPU does it natively.

No GPU here: the capability is faked, which is all `choose_precision` reads of the device."""

from __future__ import annotations

import argparse

import pytest
import torch

from core.config import ConfigError, apply_overrides, load_config
from core.runtime import choose_precision
from core.settings import PRECISIONS
from workflow import cli

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("capability", "auto"), [((6, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_auto_is_bf16_only_on_gpus_that_have_it_natively(monkeypatch, capability, auto) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # torch answers yes on a T4 too (emulation): the choice must not rest on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen = choose_precision(CUDA, "auto", True)
    assert (chosen.name, chosen.needs_scaler, chosen.channels_last) == (auto, auto == "fp16", True)
    fp16 = choose_precision(CUDA, "fp16", False)
    assert (fp16.dtype, fp16.needs_scaler) == (torch.float16, True)
    assert choose_precision(CUDA, "fp32", False).dtype is None
    if auto == "bf16":
        bf16 = choose_precision(CUDA, "bf16", False)
        assert (bf16.dtype, bf16.needs_scaler) == (torch.bfloat16, False)
    else:
        with pytest.raises(ConfigError, match=f"capability {capability[0]}.{capability[1]}"):
            choose_precision(CUDA, "bf16", False)


@pytest.mark.parametrize("asked", PRECISIONS)
def test_the_cpu_computes_in_fp32_whatever_is_asked(asked: str) -> None:
    chosen = choose_precision(torch.device("cpu"), asked, True)
    assert (chosen.name, chosen.dtype, chosen.channels_last) == ("fp32", None, False)


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of auto, bf16, fp16, fp32"):
        choose_precision(torch.device("cpu"), "fp8", False)


@pytest.mark.parametrize(
    ("argv", "precision"),
    [
        ([], None),
        (["--amp"], "auto"),
        (["--no-amp"], "fp32"),
        (["--precision", "fp16"], "fp16"),
        (["--precision", "bf16", "--no-amp"], "bf16"),
    ],
)
def test_the_amp_flags_map_onto_train_precision(argv: list[str], precision: str | None) -> None:
    parser = argparse.ArgumentParser()
    cli.add_runtime_arguments(parser)
    assert cli.runtime_flags(parser.parse_args(argv))["train.precision"] == precision


def test_a_config_with_the_old_amp_key_is_told_what_replaced_it(tmp_path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("train: {amp: false}\n")
    with pytest.raises(ConfigError, match=r"train\.amp'; it is now train\.precision"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"it is now train\.precision"):
        apply_overrides({"train": {"epochs": 1}}, ["train.amp=false"])
