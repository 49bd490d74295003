"""The training step and epoch by themselves, on hand-made batches and losses: what the
log's training losses mean, when a non-finite loss is caught, what multi-scale batches
look like, and that a learner's recipe reaches its step (from engine.py's mutation run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.runtime import Dist, choose_precision
from training import engine

CPU = torch.device("cpu")


class Recorded:
    """A learner whose step returns given (main, total) losses and counts the schedule."""

    def __init__(self, losses: list[tuple[float, float]]) -> None:
        self.losses = iter(losses)
        self.train_net = torch.nn.Identity()
        self.precision = choose_precision(CPU, "fp32", False)
        self.multiscale = (1.0,)
        self.ema = None
        self.scheduled = 0
        self.scheduler = type("Schedule", (), {"step": lambda _: self._scheduled()})()

    def _scheduled(self) -> None:
        self.scheduled += 1

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        main, total = next(self.losses)
        return torch.tensor(main), torch.tensor(total)


def _batches(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    return [
        {"image": torch.zeros(n, 3, 32, 32, dtype=torch.uint8), "mask": torch.zeros(n, 32, 32)}
        for n in sizes
    ]


def _epoch(learner: Recorded, sizes: list[int]) -> dict[str, float]:
    dist = Dist(rank=0, world_size=1, device=CPU)
    return engine.train_epoch(learner, _batches(sizes), dist, "epoch", seed=0)


def test_the_epochs_losses_are_means_over_images_of_each_heads_loss() -> None:
    learner = Recorded([(1.0, 2.0), (4.0, 8.0), (0.5, 1.0)])
    record = _epoch(learner, [3, 1, 2])
    assert record["train_loss"] == pytest.approx((3 * 1.0 + 4.0 + 2 * 0.5) / 6)
    assert record["train_loss_total"] == pytest.approx((3 * 2.0 + 8.0 + 2 * 1.0) / 6)
    assert record["images_per_s"] > 0
    assert learner.scheduled == 3  # the schedule steps with every optimizer step


def test_a_non_finite_loss_stops_the_epoch_at_the_next_check(monkeypatch) -> None:
    monkeypatch.setattr(engine, "LOSS_CHECK_EVERY", 2)
    learner = Recorded([(1.0, float("inf")), (1.0, 1.0), (1.0, 1.0)])
    # checked every 2 steps and at the last: the loss of step 1 is caught at step 2
    with pytest.raises(engine.TrainingError, match="by step 2"):
        _epoch(learner, [2, 2, 2])
    learner = Recorded([(1.0, 1.0), (1.0, 1.0), (1.0, float("nan"))])
    with pytest.raises(engine.TrainingError, match="by step 3"):
        _epoch(learner, [2, 2, 2])


@pytest.mark.parametrize(
    ("shape", "scales", "sizes"),
    [
        ((64, 96), (0.25, 1.5), {(32, 32), (96, 128)}),  # never below 32; 4.5 rounds to 4
        ((64, 64), (0.75, 2.0), {(64, 64), (128, 128)}),  # 1.5 rounds to 2: unchanged
    ],
)
def test_multiscale_batches_take_each_scale_rounded_to_multiples_of_32(shape, scales, sizes):
    images = torch.rand(2, 3, *shape)
    masks = torch.randint(0, 3, (2, *shape))
    seen = set()
    for seed in range(20):
        out, out_masks = engine.scaled_batch(images, masks, scales, seed)
        size = tuple(out.shape[-2:])
        seen.add(size)
        if size == shape:
            assert out is images and out_masks is masks
            continue
        expected = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        nearest = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]
        assert torch.equal(out_masks, nearest.long())
    assert seen == sizes


def test_a_learners_step_clips_the_gradient_norm_it_was_built_with() -> None:
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]

    class SquareLoss:
        def terms(self, out, _):
            loss = out.square().sum()
            return loss, loss

    learner = engine.Learner(
        raw=model,
        net=model,
        train_net=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        scheduler=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=SquareLoss(),
        precision=choose_precision(CPU, "fp32", False),
        grad_clip=0.5,
    )
    learner.step(torch.randn(5, 4) * 100, None)
    moved = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert moved.item() == pytest.approx(0.5, rel=1e-4)


def _learner(monkeypatch, seed: int = 0, fold: int = 0, **train) -> engine.Learner:
    """build_learner on a small config: a tiny smp UNet with the given `train` keys."""
    built = []
    real = engine.build_model

    def build_model(arch, **kwargs):
        built.append(kwargs["pretrained"])
        return real(arch, **{**kwargs, "pretrained": None})

    monkeypatch.setattr(engine, "build_model", build_model)
    cfg = {
        "seed": seed,
        "train": {"lr": 1e-3, "epochs": 1, "optimizer": {"name": "adam"}, **train},
    }
    entry = {
        "arch": "smp.Unet",
        "kwargs": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [8, 8, 8]},
        "pretrained": "/weights/encoder.safetensors",
    }
    learner = engine.build_learner(cfg, entry, fold, Dist(rank=0, world_size=1, device=CPU))
    assert built == ["/weights/encoder.safetensors"]  # the entry's weights reach the model
    return learner


def test_a_learner_takes_every_recipe_key_of_the_train_section(monkeypatch) -> None:
    plain = _learner(monkeypatch)
    assert plain.grad_clip == 0.0 and plain.multiscale == (1.0,) and plain.ema is None
    assert plain.net is plain.raw and plain.loss_fn.ce_weight == 1.0
    learner = _learner(
        monkeypatch,
        grad_clip=0.7,
        multiscale=[0.75, 1.25],
        loss={"ce_weight": 0.25, "dice_weight": 2.0},
    )
    assert learner.grad_clip == 0.7 and learner.multiscale == (0.75, 1.25)
    assert (learner.loss_fn.ce_weight, learner.loss_fn.dice_weight) == (0.25, 2.0)
    compiled = []
    monkeypatch.setattr(engine, "compile_guarded", lambda model: compiled.append(model) or model)
    learner = _learner(monkeypatch, compile=True)
    assert compiled == [learner.raw]


def test_a_learners_weights_start_from_the_seed_and_the_fold(monkeypatch) -> None:
    def weights(**kwargs) -> torch.Tensor:
        return torch.cat([p.flatten() for p in _learner(monkeypatch, **kwargs).raw.parameters()])

    same = weights(seed=1, fold=0)
    assert torch.equal(same, weights(seed=1, fold=0))
    assert not torch.equal(same, weights(seed=2, fold=0))
    assert not torch.equal(same, weights(seed=1, fold=1))


def test_the_ema_averages_weights_and_batchnorm_statistics_with_its_decay(monkeypatch) -> None:
    learner = _learner(monkeypatch, ema=0.9)
    learner.ema.update_parameters(learner.raw)  # the first update copies the weights
    start = {k: v.clone() for k, v in learner.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in learner.raw.parameters():
            p.add_(1.0)
    for m in learner.raw.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(1.0)
    learner.ema.update_parameters(learner.raw)
    now = learner.ema.module.state_dict()
    raw = learner.raw.state_dict()
    for key, value in start.items():
        if value.is_floating_point():
            # decay 0.9: 0.9 of the average so far and 0.1 of the new weights
            torch.testing.assert_close(now[key], 0.9 * value + 0.1 * raw[key])
    assert any("running_mean" in k and not torch.equal(now[k], start[k]) for k in now)


def test_multiscale_sizes_follow_the_epoch_seed_and_the_step() -> None:
    def sizes(seed: int) -> list[tuple[int, ...]]:
        learner = Recorded([(1.0, 1.0)] * 12)
        learner.multiscale = (0.5, 1.0)
        drawn = []

        def step(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
            drawn.append(tuple(images.shape[-2:]))
            return torch.tensor(1.0), torch.tensor(1.0)

        learner.step = step
        batches = [
            {"image": torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "mask": torch.zeros(1, 64, 64)}
        ] * 12
        engine.train_epoch(learner, batches, Dist(rank=0, world_size=1, device=CPU), "e", seed)
        return drawn

    first = sizes(seed=3)
    assert set(first) == {(32, 32), (64, 64)}  # each step draws its own scale
    assert first == sizes(seed=3)  # a resumed epoch draws the same sizes
    assert first != sizes(seed=4)  # another epoch (its own seed) draws others
