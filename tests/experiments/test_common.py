"""kdfast.experiments.common: statistics, run records, data by name and the teacher cache key."""
import math

import pytest

from kdfast.experiments import common


def test_confidence_interval_uses_the_t_distribution():
    # n = 2: t_{0.975, 1} = 12.7062; mean 1, sample std sqrt(2), half-width 12.7062 * sqrt(2) / sqrt(2)
    lo, hi = common.confidence_interval([0.0, 2.0])
    assert lo == pytest.approx(1 - 12.7062047, rel=1e-6) and hi == pytest.approx(1 + 12.7062047, rel=1e-6)
    # n = 5, 90 %: t_{0.95, 4} = 2.131847
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    lo, hi = common.confidence_interval(values, level=0.90)
    half = 2.1318468 * math.sqrt(2.5) / math.sqrt(5)
    assert (lo, hi) == (pytest.approx(3 - half, rel=1e-6), pytest.approx(3 + half, rel=1e-6))
    assert all(math.isnan(v) for v in common.confidence_interval([1.0]))


def test_paired_summary_and_formatting():
    s = common.paired_summary([0.9, 0.8, 0.7], [0.8, 0.8, 0.6])
    assert s["diffs"] == pytest.approx([0.1, 0.0, 0.1]) and s["mean"] == pytest.approx(0.2 / 3)
    lo, hi = s["ci95"]
    assert lo < s["mean"] < hi
    assert common.fmt_ci((lo, hi)).startswith("[") and common.fmt_ci((math.nan, math.nan)) == "—"
    with pytest.raises(ValueError, match="same number of seeds"):
        common.paired_summary([1.0], [1.0, 2.0])


def test_run_record_is_the_equivalent_command_line():
    rec = common.run_record("bss", "out dir", dataset="fashion-mnist", data_root=None, budget="full", seeds=[0, 1],
                            device="cpu")
    assert rec["command"] == "kdfast experiment bss --dataset fashion-mnist --budget full --seeds 0,1 --out 'out dir' --device cpu"
    assert rec["dataset"] == "fashion-mnist" and rec["budget"] == "full" and rec["seeds"] == [0, 1]


def test_teacher_key_separates_datasets_architectures_seeds_and_recipes():
    train, _ = common.digits(16, 32, 8)
    recipe = {"epochs": 8, "lr": 0.05}
    keys = {common.teacher_key("digits", train, "vgg8", 0.25, 0, recipe),
            common.teacher_key("fashion-mnist", train, "vgg8", 0.25, 0, recipe),
            common.teacher_key("digits", train, "resnet8", 0.25, 0, recipe),
            common.teacher_key("digits", train, "vgg8", 0.25, 1, recipe),
            common.teacher_key("digits", train, "vgg8", 0.25, 0, {"epochs": 12, "lr": 0.05})}
    assert len(keys) == 5


def test_load_data_names_and_errors():
    train, test = common.load_data("digits", train_subset=20, test_subset=10)
    assert (len(train), len(test), train.image_size) == (20, 10, 16)
    with pytest.raises(ValueError, match="dataset must be one of"):
        common.load_data("svhn")
    with pytest.raises(ValueError, match="needs data_root"):
        common.load_data("cifar100")
    with pytest.raises(ValueError, match="cannot pad 16x16 images to 8x8"):
        common.pad(train, 8)


def test_stratified_images_keeps_classes_and_is_the_same_at_every_call():
    _, test = common.digits(16)
    part = common.stratified_images(test, 100)
    assert 95 <= len(part) <= 105 and set(part.labels.tolist()) == set(test.labels.tolist())
    again = common.stratified_images(test, 100)
    assert part.labels.tolist() == again.labels.tolist() and bool((part.images == again.images).all())
    assert common.stratified_images(test, None) is test
    assert common.stratified_images(test, len(test)) is test
