import dataclasses
import itertools
import json

import cv2
import numpy as np
import pytest
import yaml

import postprocess as submission_stage
from chain import postprocessing as pp
from chain.postprocessing import PostprocessParams, postprocess
from chain.records import load_params
from data.probstore import load_probs, save_probs
from data.submission import check_submission, rle_decode

# numpy's divide-by-zero and invalid-cast warnings mean a wrong array operation, not noise
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def probs_from(class_map, conf=0.8):
    """Soft probabilities whose argmax is `class_map` (confidence `conf`)."""
    p = np.full((3, *class_map.shape), (1 - conf) / 2, np.float32)
    for c in range(3):
        p[c][class_map == c] = conf
    return p


def test_all_steps_off_is_argmax_of_resized_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 16, 20)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    out = postprocess(probs, (37, 53), PostprocessParams())
    assert out.shape == (37, 53) and out.dtype == np.uint8
    resized = cv2.resize(probs.transpose(1, 2, 0), (53, 37), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, resized.argmax(-1))
    # uint8 store codes give the argmax of the resized codes
    codes = np.rint(probs * 255).astype(np.uint8)
    out8 = postprocess(codes, (37, 53))
    resized8 = cv2.resize(codes.transpose(1, 2, 0), (53, 37), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out8, resized8.argmax(-1))


def test_split_region_becomes_one_class_by_probability_or_by_vote():
    probs = np.zeros((3, 40, 40), np.float32)
    probs[0] = 1.0
    # one 20x20 region: left 12 columns weakly class 1, right 8 columns strongly class 2
    probs[:, 10:30, 10:22] = np.array([0.1, 0.6, 0.3])[:, None, None]
    probs[:, 10:30, 22:30] = np.array([0.1, 0.2, 0.7])[:, None, None]
    plain = postprocess(probs, (40, 40))
    assert set(np.unique(plain[10:30, 10:30])) == {1, 2}
    # summed p1 = 240*.6 + 160*.2 = 176 < summed p2 = 240*.3 + 160*.7 = 184
    by_prob = postprocess(probs, (40, 40), PostprocessParams(region_mode="prob"))
    assert (by_prob[10:30, 10:30] == 2).all() and (by_prob != 2).sum() == 40 * 40 - 400
    # the vote is 240 pixels of class 1 against 160 of class 2
    by_vote = postprocess(probs, (40, 40), PostprocessParams(region_mode="majority"))
    assert (by_vote[10:30, 10:30] == 1).all() and by_vote.sum() == 400


@pytest.mark.parametrize("region_mode", pp.REGION_MODES)
def test_specks_below_min_area_disappear(region_mode: str) -> None:
    """In every region mode: tune.py's second starting trial combines both steps."""
    cm = np.zeros((100, 100), np.uint8)
    cm[10:12, 10:12] = 2  # 4 px
    cm[50:55, 50:55] = 1  # 25 px
    params = PostprocessParams(min_area_frac=0.001, region_mode=region_mode)
    out = postprocess(probs_from(cm), (100, 100), params)
    # a region of exactly the minimum area stays
    at_limit = PostprocessParams(min_area_frac=0.0025, region_mode=region_mode)
    np.testing.assert_array_equal(
        postprocess(probs_from(cm), (100, 100), at_limit)[50:55, 50:55], 1
    )
    assert out[10:12, 10:12].sum() == 0
    np.testing.assert_array_equal(out[50:55, 50:55], 1)
    assert (postprocess(probs_from(cm), (100, 100)) == cm).all()


def test_holes_fill_and_classes_follow_probabilities():
    cm = np.zeros((60, 60), np.uint8)
    cm[10:40, 10:40] = 2
    cm[20:30, 20:30] = 0  # hole
    cm[0:8, 50:60] = 1  # touches the border: its surroundings are not a hole
    # hole pixels have p1 == p2, so their class comes from the region's summed probability
    params = PostprocessParams(fill_holes=True, region_mode="prob")
    out = postprocess(probs_from(cm), (60, 60), params)
    np.testing.assert_array_equal(out[10:40, 10:40], 2)
    assert (out[cm == 1] == 1).all() and out.sum() == 900 * 2 + 80
    assert (postprocess(probs_from(cm), (60, 60))[20:30, 20:30] == 0).all()


def test_opening_removes_thin_spurs_and_closing_bridges_gaps():
    cm = np.zeros((100, 100), np.uint8)
    cm[30:60, 30:60] = 1
    cm[44, 60:90] = 1  # one-pixel spur
    out = postprocess(probs_from(cm), (100, 100), PostprocessParams(open_frac=0.05))
    assert out[44, 62:90].sum() == 0
    # the smallest kernel: 2 px of the side, made odd (3 px), still opens
    out = postprocess(probs_from(cm), (100, 100), PostprocessParams(open_frac=0.02))
    assert out[44, 62:90].sum() == 0
    # 4 and 5 px of the side are both the odd 5 x 5 ellipse: round corners, centred
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    expected = cv2.morphologyEx((cm > 0).astype(np.uint8), cv2.MORPH_OPEN, disc)
    for frac in (0.04, 0.05):
        out = postprocess(probs_from(cm), (100, 100), PostprocessParams(open_frac=frac))
        np.testing.assert_array_equal(out, expected)
    assert out[30, 30] == 0  # a square's corner does not survive a round kernel
    np.testing.assert_array_equal(out[33:57, 33:57], 1)

    cm = np.zeros((100, 100), np.uint8)
    cm[30:60, 20:49] = 2
    cm[30:60, 51:80] = 2  # 2-px gap
    params = PostprocessParams(close_frac=0.07, region_mode="prob")
    out = postprocess(probs_from(cm), (100, 100), params)
    np.testing.assert_array_equal(out[35:55, 49:51], 2)
    assert (postprocess(probs_from(cm), (100, 100))[:, 49:51] == 0).all()
    cm[30:60, 47:49] = cm[30:60, 51:53] = 0  # a 6-px gap: a 7-px kernel still bridges it
    out = postprocess(probs_from(cm), (100, 100), params)
    np.testing.assert_array_equal(out[35:55, 47:53], 2)


def disc(cm, cy, cx, r, cls):
    yy, xx = np.ogrid[: cm.shape[0], : cm.shape[1]]
    cm[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = cls


def test_adaptive_kernels_and_min_area_follow_each_regions_size():
    cm = np.zeros((200, 200), np.uint8)
    disc(cm, 60, 60, 40, 1)  # the main lesion, ~5000 px
    cm[58:61, 100:140] = 1  # a 3-px spur on it
    disc(cm, 150, 150, 5, 2)  # a small polyp, ~80 px
    cm[20:23, 180:183] = 2  # a 9-px speck
    probs = probs_from(cm)
    # an 11-px opening (0.055 x 200) erases the small polyp along with the spur ...
    fixed = postprocess(probs, (200, 200), PostprocessParams(open_frac=0.055))
    assert fixed[150, 150] == 0 and fixed[59, 110:140].sum() == 0
    # ... the small polyp's own kernel is 11 x sqrt(80/5000) ~ 1 px: it stays whole (and so
    # does the speck), while the main lesion still loses its spur
    adaptive = postprocess(probs, (200, 200), PostprocessParams(open_frac=0.055, adaptive=True))
    assert (adaptive[cm == 2] == 2).all() and adaptive[59, 110:140].sum() == 0
    np.testing.assert_array_equal(adaptive[40:80, 40:80], 1)
    # min area 1%: of the image (400 px) drops the small polyp too; of the largest
    # region (~50 px) only the speck
    by_image = postprocess(probs, (200, 200), PostprocessParams(min_area_frac=0.01))
    assert by_image[150, 150] == 0 and by_image[21, 181] == 0
    by_region = postprocess(probs, (200, 200), PostprocessParams(min_area_frac=0.01, adaptive=True))
    assert by_region[150, 150] == 2 and by_region[21, 181] == 0 and by_region[60, 60] == 1
    # a lone small polyp is its image's largest region: kept
    lone = np.zeros((200, 200), np.uint8)
    disc(lone, 150, 150, 5, 2)
    out = postprocess(
        probs_from(lone), (200, 200), PostprocessParams(min_area_frac=0.01, adaptive=True)
    )
    np.testing.assert_array_equal(out, lone)


def test_foreground_threshold_turns_uncertain_polyp_into_polyp():
    probs = np.zeros((3, 10, 10), np.float32)
    probs[:] = np.array([0.5, 0.2, 0.3])[:, None, None]
    assert postprocess(probs, (10, 10)).sum() == 0
    out = postprocess(probs, (10, 10), PostprocessParams(fg_threshold=0.4))
    np.testing.assert_array_equal(out, 2)
    assert postprocess(probs, (10, 10), PostprocessParams(fg_threshold=0.6)).sum() == 0
    codes = np.rint(probs * 255).astype(np.uint8)
    np.testing.assert_array_equal(postprocess(codes, (10, 10), PostprocessParams(0.4)), 2)


def test_params_serialise_validate_and_switch_steps_off():
    params = PostprocessParams(0.45, 0.002, "prob", 0.01, 0.02, True, True)
    again = PostprocessParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params
    assert params.active_steps() == list(PostprocessParams.STEPS)
    assert params.without("region").region_mode == "none"
    steps = list(PostprocessParams.STEPS)
    assert params.without("adaptive").active_steps() == steps[:-1]
    assert params.without("fill_holes").active_steps() == [s for s in steps if s != "fill_holes"]
    assert PostprocessParams().active_steps() == []
    with pytest.raises(ValueError, match="unknown"):
        PostprocessParams.from_dict({"fg_thresh": 0.5})
    with pytest.raises(ValueError, match="region_mode"):
        PostprocessParams(region_mode="vote")
    with pytest.raises(ValueError, match="fg_threshold"):
        PostprocessParams(fg_threshold=1.5)


def test_min_area_alone_keeps_each_pixels_class():
    """Without region_mode, a region big enough to stay keeps its two classes."""
    cm = np.zeros((40, 40), np.uint8)
    cm[10:20, 10:15], cm[10:20, 15:20] = 1, 2
    out = postprocess(probs_from(cm), (40, 40), PostprocessParams(min_area_frac=0.01))
    np.testing.assert_array_equal(out, cm)


def test_thin_regions_ties_and_odd_votes():
    # a polyp one pixel wide is still a polyp (its bounding box is 1 pixel wide)
    cm = np.zeros((20, 20), np.uint8)
    cm[3:15, 7] = 2
    np.testing.assert_array_equal(postprocess(probs_from(cm), (20, 20)), cm)
    # one region, 2 pixels of each class: a tie goes to class 1, by vote and by probability
    cm = np.zeros((10, 10), np.uint8)
    cm[4, 3:5], cm[4, 5:7] = 1, 2
    for mode in ("majority", "prob"):
        out = postprocess(probs_from(cm), (10, 10), PostprocessParams(region_mode=mode))
        np.testing.assert_array_equal(out[4, 3:7], 1)
    # 3 pixels, 2 of class 2: a majority of one vote wins
    cm[4, 3:4], cm[4, 4:6], cm[4, 6] = 1, 2, 0
    out = postprocess(probs_from(cm), (10, 10), PostprocessParams(region_mode="majority"))
    np.testing.assert_array_equal(out[4, 3:6], 2)


def test_more_than_255_regions_keep_their_own_class():
    """Label ids above 255 do not fit the uint8 lookup table: they must not wrap around."""
    for n_rows in (16, 32):  # 256 regions (label 256 is the last), then 1024
        cm = np.zeros((64, 64), np.uint8)
        cm[: 2 * n_rows : 2, :32:2] = 1  # n_rows x 16 separate one-pixel regions
        cm[2 * n_rows - 4 : 2 * n_rows : 2, :32:2] = 2  # the last two rows of specks: class 2
        out = postprocess(probs_from(cm), (64, 64), PostprocessParams(region_mode="majority"))
        np.testing.assert_array_equal(out, cm)


def test_foreground_threshold_is_strict_on_store_codes():
    """Polyp where 1 - p_bg > t: a background code of exactly (1 - t) * 255 stays background."""
    codes = np.zeros((3, 4, 4), np.uint8)
    codes[0], codes[1], codes[2] = 153, 51, 51  # p_bg = 0.6
    assert postprocess(codes, (4, 4), PostprocessParams(fg_threshold=0.4)).sum() == 0
    codes[0] = 152
    np.testing.assert_array_equal(postprocess(codes, (4, 4), PostprocessParams(0.4)), 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fg_threshold": 0.0}, "fg_threshold must be in (0, 1)"),
        ({"fg_threshold": 1.0}, "fg_threshold must be in (0, 1)"),
        ({"min_area_frac": 1.0}, "min_area_frac must be in [0, 1), got 1.0"),
        ({"open_frac": 1.5}, "open_frac must be in [0, 1), got 1.5"),
        ({"close_frac": -0.1}, "close_frac must be in [0, 1), got -0.1"),
    ],
)
def test_out_of_range_params_are_refused(kwargs, message):
    with pytest.raises(ValueError) as info:
        PostprocessParams(**kwargs)
    assert message in str(info.value)


def test_bad_maps_and_unknown_params_are_named(tmp_path):
    for shape in ((4, 5, 5), (3, 5)):
        with pytest.raises(ValueError, match="probs must be"):
            postprocess(np.zeros(shape, np.float32), (5, 5))
    with pytest.raises(ValueError, match="unknown post-processing parameters: foo, zed"):
        PostprocessParams.from_dict({"zed": 1, "foo": 2})
    # postprocess.json of tune.py ({"params": ...}) or the bare parameters both load
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"min_area_frac": 0.01}))
    assert load_params(flat) == PostprocessParams(min_area_frac=0.01)


@pytest.fixture
def experiment(tmp_path):
    """A test folder of 3 images, a config, and a blended test store at working size."""
    sizes = {"a" * 32: (50, 64), "b" * 32: (40, 64), "c" * 32: (47, 60)}
    test = tmp_path / "data" / "test"
    test.mkdir(parents=True)
    for image_id, (h, w) in sizes.items():
        cv2.imwrite(str(test / f"{image_id}.jpeg"), np.zeros((h, w, 3), np.uint8))
    cfg = {"experiment": "exp", "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cms = []
    for k in range(3):
        cm = np.zeros((32, 32), np.uint8)
        cm[8:20, 8:20] = 1 + k % 2
        cm[25, 25] = 2 - k % 2  # a speck of the other class
        cms.append(probs_from(cm))
    store = tmp_path / "exp" / "ensemble" / "test"
    save_probs(store, list(sizes), np.stack(cms), list(sizes.values()), kind="test", model="blend")
    return tmp_path, sizes


def test_cli_writes_checked_submission_with_tuned_params(experiment, capsys):
    root, sizes = experiment
    doc = {"params": PostprocessParams(min_area_frac=0.01).to_dict()}
    (root / "exp" / "postprocess.json").write_text(json.dumps(doc))
    assert submission_stage.main(["--config", str(root / "c.yaml"), "--jobs", "2"]) == 0
    sub = root / "exp" / "submission.csv"
    assert check_submission(sub, root / "data") == []
    rows = dict(line.split(",") for line in sub.read_text().splitlines()[1:])
    a = rle_decode(rows["a" * 32 + "_0"], sizes["a" * 32])
    assert a.shape == (50, 64) and a.sum() > 0
    assert rows["a" * 32 + "_1"] == ""  # the speck was removed
    out = capsys.readouterr().out
    assert "kaggle competitions submit -c bkai-igh-neopolyp -f" in out and "min_area" in out


def test_cli_refuses_store_with_wrong_sizes_before_writing(experiment, capsys):
    root, sizes = experiment
    other = root / "other"
    probs = np.full((3, 3, 32, 32), 1 / 3, np.float32)
    wrong = [(50, 64), (41, 64), (47, 60)]
    save_probs(other, list(sizes), probs, wrong, kind="test", model="m")
    assert submission_stage.main(["--config", str(root / "c.yaml"), "--probs", str(other)]) == 2
    assert "recorded at" in capsys.readouterr().err
    assert not (root / "exp" / "submission.csv").exists()
    save_probs(other, list(sizes)[:2], probs[:2], wrong[:2], kind="test", model="m")
    assert submission_stage.main(["--config", str(root / "c.yaml"), "--probs", str(other)]) == 2
    assert "1 missing" in capsys.readouterr().err


def test_a_submission_that_fails_its_check_is_not_written(experiment, monkeypatch):
    """The last guard before upload: check_submission's verdict decides, whatever wrote it."""
    root, _ = experiment
    monkeypatch.setattr(
        submission_stage, "check_submission", lambda path, data_dir: ["line 2: broken"]
    )
    out = root / "exp" / "submission.csv"
    store = submission_stage.load_probs(root / "exp" / "ensemble" / "test")
    made = submission_stage.make_submission(store, PostprocessParams(), root / "data", out)
    assert made == ["line 2: broken"]
    assert not out.exists() and list((root / "exp").glob(".submission*")) == []


def test_working_on_the_foreground_window_equals_the_whole_image():
    from bench.postprocess_speed import synthetic_oof

    probs, _ = synthetic_oof(6, (48, 64), seed=3)
    params = PostprocessParams(0.5, 0.002, "prob", 0.03, 0.05, True)
    for p, adaptive in itertools.product(probs, (False, True)):
        params = dataclasses.replace(params, adaptive=adaptive)
        for size in ((48, 64), (95, 130)):
            p_full = cv2.resize(p.transpose(1, 2, 0), size[::-1], interpolation=cv2.INTER_LINEAR)
            fg = (p_full[..., 0] < 0.5 * 255).view(np.uint8)
            whole = pp.apply_steps(fg, p_full[..., 1], p_full[..., 2], params, size)
            np.testing.assert_array_equal(postprocess(p, size, params), whole)
    # a lone blob in a corner: the window is small, the answer the same
    cm = np.zeros((80, 80), np.uint8)
    cm[60:78, 2:20] = 2
    cm[66:70, 8:12] = 0
    probs = probs_from(cm)
    fg = (cm > 0).view(np.uint8)
    whole = pp.apply_steps(fg, probs[1], probs[2], params, (80, 80))
    np.testing.assert_array_equal(postprocess(probs, (80, 80), params), whole)
    assert (whole[60:78, 2:20] == 2).sum() > 250


@pytest.mark.parametrize("source", ["blend", "refined"])
def test_the_submission_comes_from_the_store_tune_recorded(experiment, source):
    """postprocess.json's `source` decides which test maps are submitted: the refined ones
    when refinement was kept, the blend otherwise (the two stores differ in every image)."""
    root, sizes = experiment
    refined = np.stack([probs_from(np.full((32, 32), 2, np.uint8)) for _ in sizes])
    save_probs(
        root / "exp" / "refine" / "test",
        list(sizes),
        refined,
        list(sizes.values()),
        kind="test",
        model="refine",
    )
    doc = {"params": PostprocessParams().to_dict(), "source": source, "chosen": source}
    (root / "exp" / "postprocess.json").write_text(json.dumps(doc))
    assert submission_stage.main(["--config", str(root / "c.yaml"), "--jobs", "1"]) == 0
    lines = (root / "exp" / "submission.csv").read_text().splitlines()[1:]
    rows = dict(line.split(",") for line in lines)
    for image_id, size in sizes.items():
        non = rle_decode(rows[f"{image_id}_1"], size)
        assert non.all() == (source == "refined")  # the refined maps are all non-neoplastic
        assert rle_decode(rows[f"{image_id}_0"], size).any() == (source == "blend")


def test_a_write_that_fails_half_way_exits_with_one_line_and_no_submission(tmp_path):
    """A file-size limit (as a full disk) cuts the submission after its first rows, while
    the threads are inside OpenCV's morphology on full-size frames: every run exits 1 with
    the error naming the file, and no submission. With joblib's daemon threads left running
    into interpreter exit, 7 runs in 8 aborted with exit 134 after the message."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    n, size = 120, (959, 1280)
    ids = [f"{k:032x}" for k in range(n)]
    test = tmp_path / "data" / "test"
    test.mkdir(parents=True)
    blank = cv2.imencode(".jpeg", np.zeros((*size, 3), np.uint8))[1].tobytes()
    for image_id in ids:
        (test / f"{image_id}.jpeg").write_bytes(blank)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(n, 64, 80)).transpose(0, 3, 1, 2)
    exp = tmp_path / "exp"
    save_probs(
        exp / "ensemble" / "test",
        ids,
        probs.astype(np.float32),
        [size] * n,
        kind="test",
        model="blend",
    )
    cfg = {"experiment": "exp", "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    slow = PostprocessParams(region_mode="prob", fill_holes=True, open_frac=0.02, close_frac=0.02)
    (exp / "postprocess.json").write_text(json.dumps({"params": slow.to_dict()}))

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    cmd = [sys.executable, "postprocess.py", "--config", str(tmp_path / "c.yaml"), "--jobs", "-1"]
    root = Path(submission_stage.__file__).parent
    for _ in range(3):
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, preexec_fn=small_files)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "submission.csv" in done.stderr and "File too large" in done.stderr
        assert list(exp.glob("*submission*")) == []


def test_huge_frames_are_post_processed_one_at_a_time_within_the_pixel_budget(
    tmp_path, monkeypatch
):
    """Threads took several 8000 x 6000 maps at once (3.7 GB); the budget bounds what is
    being made or waiting to be written, in pixels, whatever the number of workers."""
    import threading
    import time

    sizes = [(6000, 8000)] * 4 + [(959, 1280)] * 12 + [(6000, 8000)] * 2
    ids = [f"{k:032x}" for k in range(len(sizes))]
    save_probs(
        tmp_path, ids, np.zeros((len(ids), 3, 4, 4), np.float32), sizes, kind="test", model="blend"
    )
    lock = threading.Lock()
    alive, peak = 0, 0

    def fake(probs, size, params):
        nonlocal alive, peak
        with lock:
            alive += size[0] * size[1]
            peak = max(peak, alive)
        time.sleep(0.01)  # give the other workers the chance to start theirs
        return np.full(size[:1], size[1], np.int64)

    monkeypatch.setattr(pp, "postprocess", fake)
    seen = []
    for image_id, fake_map in pp.class_maps(load_probs(tmp_path), PostprocessParams(), 4):
        with lock:
            alive -= fake_map.shape[0] * int(fake_map[0])
        seen.append(image_id)
    assert seen == ids
    assert 6000 * 8000 <= peak <= pp.PIXEL_BUDGET
