"""The training tools of the recipe: optimizer and schedule by name, EMA, multi-scale
batches, class-aware sampling, polyp paste, extra losses, gradient clipping, early stop."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from core.config import ConfigError, load_config
from core.paths import RunFiles
from core.settings import TrainSettings
from data.loader import SeededSampler, stratum_weights
from data.paste import free_space, paste_one
from models.inference import load_checkpoint
from models.losses import SegLoss
from tests.trainkit import best_only_at, fold_path, history, run_main, write_config
from training import engine, optim


def recipe(tcfg: dict) -> TrainSettings:
    """A `train:` section (over the defaults) as the optimizer and schedule read it."""
    return TrainSettings.from_config({"train": tcfg})


def lr_curve(tcfg: dict, steps_per_epoch: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    train = recipe(tcfg)
    opt = optim.build_optimizer([param], train)
    sched = optim.build_scheduler(opt, train, steps_per_epoch)
    out = []
    for _ in range(train.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        # 4 epochs x 10 steps, lr 1: the value at steps 0, 10, 20 and 39.
        ({"name": "step", "step_epochs": 1, "gamma": 0.5}, [1.0, 0.5, 0.25, 0.125]),
        ({"name": "cosine"}, [1.0, (1 + math.cos(math.pi * 10 / 40)) / 2, 0.5, None]),
        ({"name": "poly", "power": 1.0}, [1.0, 0.75, 0.5, 1 / 40]),
        ({"name": "none"}, [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedules_follow_their_named_curve(scheduler: dict, expected: list) -> None:
    curve = lr_curve({"lr": 1.0, "epochs": 4, "scheduler": scheduler}, 10)
    for step, value in zip((0, 10, 20, 39), expected, strict=True):
        if value is not None:
            assert curve[step] == pytest.approx(value, rel=1e-6), step
    if scheduler["name"] == "cosine":
        assert curve[39] < 0.01


def test_warmup_and_onecycle_ramp_up_then_down() -> None:
    warm = lr_curve(
        {"lr": 1.0, "epochs": 4, "scheduler": {"name": "cosine", "warmup_epochs": 1}}, 10
    )
    assert warm[0] == pytest.approx(0.01)
    assert max(warm) == pytest.approx(1.0) and warm.index(max(warm)) == 10
    cycle = lr_curve(
        {"lr": 2.0, "epochs": 4, "scheduler": {"name": "onecycle", "pct_start": 0.25}}, 10
    )
    assert cycle[0] == pytest.approx(2.0 / 25)
    assert max(cycle) == pytest.approx(2.0) and 8 <= cycle.index(max(cycle)) <= 10
    assert cycle[-1] < 1e-3


def test_default_schedule_is_the_seed_recipe_per_epoch() -> None:
    curve = lr_curve({"lr": 1.0, "epochs": 12, "lr_step": 5, "lr_gamma": 0.6}, 3)
    assert curve[14] == 1.0 and curve[15] == pytest.approx(0.6) and curve[30] == pytest.approx(0.36)


@pytest.mark.parametrize(
    ("tcfg", "message"),
    [
        ({"optimizer": {"name": "adamx"}}, "not an optimizer timm knows; did you mean adam"),
        ({"optimizer": {"name": "adahessian"}}, "second order"),
        ({"encoder_lr_ratio": 0}, "positive number or null"),
        ({"optimizer": {"name": "adamw", "momentum": 0.9}}, "weight_decay"),
        ({"scheduler": {"name": "cosin"}}, "step, cosine, onecycle, poly, none"),
        ({"scheduler": {"name": "cosine", "gamma": 0.5}}, "min_lr_ratio"),
        ({"scheduler": {"name": "cosine", "warmup_epochs": "one"}}, "must be a number"),
    ],
)
def test_unknown_names_and_arguments_list_the_choices(tcfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        optim.check_recipe(recipe({"lr": 1.0, "epochs": 1, **tcfg}))


def test_optimizers_come_from_timms_factory_with_its_names_and_defaults() -> None:
    param = [torch.nn.Parameter(torch.zeros(1))]

    def build(name: str, **args) -> torch.optim.Optimizer:
        tcfg = {"lr": 0.1, "optimizer": {"name": name, **args}}
        optim.check_recipe(recipe({**tcfg, "epochs": 1}))
        return optim.build_optimizer(param, recipe(tcfg))

    assert type(build("adamw", weight_decay=0.01)) is torch.optim.AdamW
    assert build("adamw", weight_decay=0.01).defaults["weight_decay"] == 0.01
    assert type(build("adam")) is torch.optim.Adam
    assert type(build("lion")).__name__ == "Lion"
    assert build("sgd").defaults["nesterov"] and build("sgd").defaults["momentum"] == 0.9
    assert type(build("lookahead_adamw")).__name__ == "Lookahead"


def test_an_encoder_ratio_keeps_the_encoders_rate_a_fixed_share_on_every_schedule() -> None:
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(2, 1)
    schedules = [
        {"name": "step", "step_epochs": 1, "gamma": 0.5},
        {"name": "cosine", "min_lr_ratio": 0.2, "warmup_epochs": 1},
        {"name": "onecycle", "pct_start": 0.25},
        {"name": "poly", "power": 1.0},
    ]
    for scheduler in schedules:
        tcfg = recipe({"lr": 1.0, "epochs": 4, "encoder_lr_ratio": 0.1, "scheduler": scheduler})
        opt = optim.build_optimizer(optim.param_groups(model, tcfg), tcfg)
        head, encoder = opt.param_groups
        assert [id(p) for p in encoder["params"]] == [id(p) for p in model.encoder.parameters()]
        assert [id(p) for p in head["params"]] == [id(p) for p in model.head.parameters()]
        sched = optim.build_scheduler(opt, tcfg, 10)
        for _ in range(39):
            assert encoder["lr"] == pytest.approx(0.1 * head["lr"], rel=1e-9), scheduler
            opt.step()
            sched.step()
    single = optim.param_groups(model, recipe({"lr": 1.0}))
    assert [id(p) for p in single] == [id(p) for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"no `\.encoder`"):
        optim.param_groups(torch.nn.Linear(2, 2), recipe({"lr": 1.0, "encoder_lr_ratio": 0.1}))


def test_a_timm_optimizer_and_a_library_transform_train_a_fold_as_its_recipe_and_log_record(
    tmp_path: Path, tiny_data: Path, capsys
) -> None:
    config = write_config(
        tmp_path,
        tiny_data,
        optimizer={"name": "lion", "weight_decay": 0.01},
        encoder_lr_ratio=0.1,
        lr=1e-4,
    )
    bad = "data.augment={CLAHE: {clip_limt: 2.0}}"
    assert run_main(config, "--fold", "0", "--set", bad) == 2
    assert "augment.CLAHE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any data was read
    started = time.perf_counter()
    assert run_main(config, "--fold", "0", "--set", "data.augment={CLAHE: 0.5}") == 0
    took = time.perf_counter() - started
    recipe = json.loads((fold_path(tmp_path) / "recipe.json").read_text())["recipe"]
    assert recipe["data.augment.CLAHE"] == 0.5 and recipe["train.optimizer.name"] == "lion"
    log = history(fold_path(tmp_path))
    assert len(log) == 2
    for record in log:
        assert record["encoder_lr"] == pytest.approx(0.1 * record["lr"])
        assert {"train_loss", "train_loss_total", "images_per_s"} <= set(record)
        assert 0 < record["epoch_time_s"] < took  # a duration, not a clock reading
        assert record["precision"] == "fp32"  # the CPU's, whatever train.precision says
    assert log[1]["lr"] == pytest.approx(0.5 * log[0]["lr"])  # the step schedule of both groups


def test_loss_arguments_are_checked_before_any_data(
    tmp_path: Path, tiny_data: Path, capsys
) -> None:
    config = write_config(tmp_path, tiny_data, loss={"ce_wieght": 1.0})
    assert run_main(config, "--fold", "0") == 2
    assert "ce_wieght" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_multiscale_batches_take_each_scale_in_multiples_of_32() -> None:
    images, masks = torch.randn(2, 3, 128, 160), torch.randint(0, 3, (2, 128, 160))
    shapes = Counter()
    for seed in range(60):
        x, y = engine.scaled_batch(images, masks, (0.75, 1.0, 1.25), seed)
        assert x.shape[-2:] == y.shape[-2:] and x.shape[-2] % 32 == 0 == x.shape[-1] % 32
        assert set(y.unique().tolist()) <= {0, 1, 2} and y.dtype == torch.long
        shapes[tuple(x.shape[-2:])] += 1
    assert set(shapes) == {(96, 128), (128, 160), (160, 192)}
    same = engine.scaled_batch(images, masks, (0.75, 1.0, 1.25), 7)[0].shape
    assert engine.scaled_batch(images, masks, (0.75, 1.0, 1.25), 7)[0].shape == same


def test_class_aware_sampling_draws_in_proportion_to_the_weights() -> None:
    strata = ["red"] * 70 + ["green"] * 25 + ["both"] * 5
    weights = stratum_weights(strata, {"green": 2.0, "both": 2.0})
    counts = Counter()
    sampler = SeededSampler(len(strata), seed=0, weights=weights)
    for epoch in range(200):
        sampler.set_epoch(epoch)
        counts.update(strata[i] for i, _ in sampler)
    total = sum(counts.values())
    # Expected shares: red 70 / 130, green 50 / 130, both 10 / 130.
    assert counts["red"] / total == pytest.approx(70 / 130, abs=0.01)
    assert counts["green"] / total == pytest.approx(50 / 130, abs=0.01)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)
    shards = [SeededSampler(len(strata), 0, rank, 2, weights) for rank in (0, 1)]
    assert all(len(list(s)) == 50 for s in shards)


def _scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A target with one red polyp and a black border; a donor with one green polyp."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 200, (96, 128, 3), dtype=np.uint8)
    image[:, :8] = 0
    mask = np.zeros((96, 128), np.uint8)
    mask[20:50, 30:60] = 1
    donor = rng.integers(60, 200, (96, 128, 3), dtype=np.uint8)
    donor_mask = np.zeros((96, 128), np.uint8)
    yy, xx = np.mgrid[:96, :128]
    donor_mask[(yy - 60) ** 2 + (xx - 90) ** 2 < 12**2] = 2
    return image, mask, donor, donor_mask


def test_paste_never_overlaps_a_polyp_and_labels_exactly_the_pasted_pixels() -> None:
    placed_any = 0
    for seed in range(40):
        image, mask, donor, donor_mask = _scene(seed)
        free = free_space(image, mask, margin=4)
        out_img, out_mask, where = paste_one(
            image, mask, donor, donor_mask, np.random.default_rng(seed), classes=(2,)
        )
        if where is None:
            assert (out_mask == mask).all() and (out_img == image).all()
            continue
        placed_any += 1
        changed = out_mask != mask
        assert (out_mask[changed] == 2).all() and (mask[changed] == 0).all()
        assert free[changed].all(), "pasted onto a polyp, its margin or the border"
        assert (out_mask[mask == 1] == 1).all()
        h, w = where.region.shape
        box = (slice(where.y, where.y + h), slice(where.x, where.x + w))
        assert (changed[box] == where.region).all() and changed.sum() == where.region.sum()
        # The pasted pixels are the donor's polyp pixels; everything else is untouched.
        dy, dx = np.nonzero(donor_mask == 2)
        donor_box = (slice(dy.min(), dy.max() + 1), slice(dx.min(), dx.max() + 1))
        assert (out_img[box][where.region] == donor[donor_box][where.region]).all()
        assert (out_img[~changed] == image[~changed]).all()
    assert placed_any > 30


def test_paste_gives_up_when_there_is_no_free_space() -> None:
    image, mask, donor, donor_mask = _scene(0)
    mask[:] = 1
    _, out_mask, where = paste_one(image, mask, donor, donor_mask, np.random.default_rng(0))
    assert where is None and (out_mask == 1).all()


def test_extra_losses_on_hand_made_cases() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, 2:6, 2:6] = 2
    perfect = (torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 2 - 1) * 20
    wrong = perfect[:, [0, 2, 1]]  # the polyp called neoplastic
    for key in ("focal_weight", "tversky_weight", "lovasz_weight"):
        only = SegLoss(ce_weight=0, dice_weight=0, **{key: 1.0})
        assert only(perfect, mask).item() < 1e-3, key
        assert only(wrong, mask).item() > 0.2, key
    # Tversky with beta > alpha punishes a missed polyp more than the same area extra.
    missed, extra = perfect.clone(), perfect.clone()
    missed[0, :, 2:4, 2:6] = perfect[0, :, 0:2, 0:4]  # 8 polyp pixels called background
    extra[0, :, 6:8, 2:6] = perfect[0, :, 2:4, 2:6]  # 8 background pixels called polyp
    tv = SegLoss(ce_weight=0, dice_weight=0, tversky_weight=1, tversky_alpha=0.3, tversky_beta=0.7)
    assert tv(missed, mask) > tv(extra, mask)


def test_ema_weights_are_validated_saved_and_resumed_exactly(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight_dir, resumed_dir = tmp_path / "a", tmp_path / "b"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    recipe = {"ema": 0.5, "epochs": 2}
    with monkeypatch.context() as forced:  # best.pt from the last epoch, on every run
        forced.setattr(train, "fit", best_only_at(2))
        assert run_main(write_config(straight_dir, tiny_data, **recipe), "--fold", "0") == 0
    last = load_checkpoint(fold_path(straight_dir) / "last.pt")
    best = load_checkpoint(fold_path(straight_dir) / "best.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    raw = last["model"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert best["epoch"] == 2
    for k, v in best["model"].items():
        torch.testing.assert_close(v, ema[k])

    config = write_config(resumed_dir, tiny_data, **recipe)
    cfg = load_config(config)
    assert run_main(config, "--fold", "0", "--epochs", "1") == 0
    assert cfg["train"]["epochs"] == 2
    assert run_main(config, "--fold", "0", "--resume") == 0
    again = load_checkpoint(fold_path(resumed_dir) / "last.pt")
    for k, v in last["ema"].items():
        torch.testing.assert_close(again["ema"][k], v, rtol=1e-4, atol=1e-5)
    for a, b in zip(history(fold_path(resumed_dir)), history(fold_path(straight_dir)), strict=True):
        assert a["competition"] == pytest.approx(b["competition"], abs=1e-6)


def test_each_epoch_is_seeded_by_the_seed_the_fold_and_the_epoch(monkeypatch) -> None:
    """So that another seed, another fold or the next epoch draws other batches and
    augmentations, and a resumed epoch the same ones."""
    from core.runtime import derive_seed

    seen: list[int] = []

    def recorded(learner, loaders, epoch, dist, desc, seed):
        seen.append(seed)
        return {"competition": 0.1 * epoch}

    monkeypatch.setattr(engine, "run_epoch", recorded)

    def seeds(seed: int, fold: int, start: int = 0) -> list[int]:
        seen.clear()
        cfg = {"seed": seed, "train": {"epochs": 3}}
        list(engine.fit(cfg, None, None, fold, None, "demo", engine.FitState(epoch=start)))
        return list(seen)

    first = seeds(0, 0)
    assert first == [derive_seed(0, 0, e) for e in range(3)] and len(set(first)) == 3
    assert set(first).isdisjoint(seeds(1, 0)) and set(first).isdisjoint(seeds(0, 1))
    assert seeds(0, 0, start=2) == first[2:]


def test_best_pt_is_picked_by_the_configured_metric(tmp_path: Path, tiny_data: Path) -> None:
    config = write_config(tmp_path, tiny_data, epochs=2, best_metric="dice_seg")
    assert run_main(config, "--fold", "0") == 0
    records = history(fold_path(tmp_path))
    best = max(records, key=lambda r: r["dice_seg"])
    assert [r["best"] for r in records] == [True, records[1]["dice_seg"] > records[0]["dice_seg"]]
    last = load_checkpoint(fold_path(tmp_path) / "last.pt")
    assert last["best_score"] == best["dice_seg"] != max(r["competition"] for r in records)
    assert load_checkpoint(fold_path(tmp_path) / "best.pt")["epoch"] == best["epoch"]


def test_early_stop_ends_a_flat_fold_and_counts_it_complete(
    tmp_path: Path, tiny_data: Path
) -> None:
    # A near-zero lr leaves only BatchNorm statistics moving: the score soon stops improving.
    config = write_config(tmp_path, tiny_data, epochs=8, lr=1e-12, early_stop_patience=1)
    assert run_main(config, "--fold", "0") == 0
    records = history(fold_path(tmp_path))
    assert len(records) < 8 and records[-1]["stopped_early"]
    best_so_far = [max(r["competition"] for r in records[: i + 1]) for i in range(len(records))]
    # It stopped at the first epoch that did not beat the best before it, not earlier.
    improved = [records[0]["competition"] == best_so_far[0]] + [
        records[i]["competition"] > best_so_far[i - 1] for i in range(1, len(records))
    ]
    assert improved[:-1] == [True] * (len(records) - 1) and not improved[-1]
    assert not any(r["stopped_early"] for r in records[:-1])
    assert engine.fold_complete(RunFiles(fold_path(tmp_path)), 8)
    assert (fold_path(tmp_path) / "oof" / "meta.json").is_file()


def test_grad_clip_bounds_the_update() -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    from core.runtime import choose_precision

    precision = choose_precision(torch.device("cpu"), "fp32", False)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 4) * 100

    class SquareLoss:
        def terms(self, out, _):
            loss = out.square().sum()
            return loss, loss

    engine.train_step(model, x, None, SquareLoss(), opt, scaler, precision, grad_clip=0.5)
    moved = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert moved.item() == pytest.approx(0.5, rel=1e-4)


def test_a_changed_epoch_count_is_refused_only_where_the_curve_depends_on_it(
    tmp_path: Path, tiny_data: Path, capsys
) -> None:
    config = write_config(tmp_path, tiny_data, scheduler={"name": "cosine"}, epochs=2)
    assert run_main(config, "--fold", "0", "--epochs", "1") == 0
    assert run_main(config, "--fold", "0", "--resume") == 2
    assert "train.epochs: 1 -> 2" in capsys.readouterr().err


def test_weighted_sampling_gives_every_rank_the_same_count_and_fresh_seeds() -> None:
    weights = [1.0] * 79
    shards = [SeededSampler(79, 0, rank, 2, weights) for rank in (0, 1)]
    draws = [list(s) for s in shards]
    assert len(draws[0]) == len(draws[1]) == len(shards[0])
    seeds = [seed for shard in draws for _, seed in shard]
    assert len(set(seeds)) == len(seeds)


def test_a_failing_compile_falls_back_to_eager_with_the_same_outputs(monkeypatch, caplog):
    model = torch.nn.Linear(4, 2).eval()
    x = torch.randn(3, 4)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    with torch.no_grad():
        assert torch.equal(engine.compile_guarded(model, broken_backend)(x), model(x))

    def no_compile(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compile)
    with caplog.at_level("WARNING", logger="engine"):
        assert engine.compile_guarded(model) is model
    assert "training eagerly" in caplog.text
