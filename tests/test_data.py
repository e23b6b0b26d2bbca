import os

import ml_collections
import numpy as np
import pytest

from aig_jax.data import (
    SOURCES,
    eval_iterator,
    eval_transform,
    make_source,
    num_eval_batches,
    steps_per_epoch,
    train_iterator,
    train_transform,
)
from aig_jax.data.sources import ArraySource
from aig_jax.errors import DataError
from tests.conftest import SHARED_DATA

CIFAR_DIR = os.path.join(SHARED_DATA, "cifar10")
MINI_DIR = os.path.join(CIFAR_DIR, "mini")


def make_cfg(**overrides):
    """A dataset config; mean 0 / std 1 make the normalised output exactly x / 255."""
    fields = {
        "source": "synthetic",
        "name": "synthetic",
        "data_dir": None,
        "num_classes": 10,
        "image_size": 32,
        "num_examples": 64,
        "preprocess": "cifar",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
    }
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def indexed_source(n, size=8):
    """n images whose label is their index (num_classes = n), image i filled with i % 256."""
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, size, size, 3)
    ).copy()
    return ArraySource(images, np.arange(n, dtype=np.int32), n)


def to_pixels(images):
    """Invert the mean-0/std-1 normalisation back to uint8."""
    return np.round(np.asarray(images) * 255).astype(np.uint8)


def collect(iterator):
    return list(iterator)


# ---------------------------------------------------------------------------------- npz source


def test_npz_reads_the_shared_mini_cifar10():
    if not os.path.isdir(MINI_DIR):
        pytest.skip(f"shared CIFAR-10 mini set not found at {MINI_DIR}")
    cfg = make_cfg(source="npz", name="cifar10", data_dir=MINI_DIR)
    train, test = make_source(cfg, "train"), make_source(cfg, "test")
    assert (len(train), len(test)) == (2560, 1000)
    images, labels = train.read(np.arange(len(train)))
    assert images.dtype == np.uint8 and images.shape == (2560, 32, 32, 3)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [256] * 10)
    _, test_labels = test.read(np.arange(len(test)))
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [100] * 10)
    with np.load(os.path.join(MINI_DIR, "cifar10_train_00.npz")) as raw:
        picked, picked_labels = train.read(np.array([7, 0, 2559]))
        np.testing.assert_array_equal(picked, raw["image"][[7, 0, 2559]])
        np.testing.assert_array_equal(picked_labels, raw["label"][[7, 0, 2559]])


def write_shard(path, images, labels):
    np.savez(path, image=images, label=labels)


def test_npz_concatenates_matching_shards_in_name_order(tmp_path):
    # Ten train shards written in shuffled order (directory listing order is arbitrary), plus
    # files the "train" pattern must not pick up.
    names = [(f"d_train_{k:02d}", k) for k in np.random.default_rng(0).permutation(10)]
    names += [("d_test", 20), ("d_trainval", 21), ("train_d", 22), ("d_train_00.npz.bak", 23)]
    for name, value in names:
        write_shard(
            tmp_path / f"{name}.npz",
            np.full((2, 4, 4, 3), value, np.uint8),
            np.array([value, value], np.uint8),
        )
    cfg = make_cfg(source="npz", data_dir=str(tmp_path), image_size=4, num_classes=30)
    train = make_source(cfg, "train")
    assert len(train) == 20
    images, labels = train.read(np.arange(20))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.repeat(np.arange(10), 2))
    _, test_labels = make_source(cfg, "test").read(np.arange(2))
    np.testing.assert_array_equal(test_labels, [20, 20])


GOOD_IMAGES = np.zeros((4, 8, 8, 3), np.uint8)
GOOD_LABELS = np.arange(4, dtype=np.uint8)


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (GOOD_IMAGES.astype(np.float32), GOOD_LABELS, r"'image' is float32 .*expected uint8"),
        (GOOD_IMAGES[..., 0], GOOD_LABELS, r"\[4, 8, 8\], expected uint8 \[N, H, W, 3\]"),
        (GOOD_IMAGES, GOOD_LABELS[:3], r"'label' has shape \[3\], expected \[4\]"),
        (GOOD_IMAGES, np.array([0, 1, 10, 2]), r"x_train\.npz: label 10 outside \[0, 10\)"),
        (GOOD_IMAGES, np.array([0, 1.7, 2, 3]), r"x_train\.npz: labels are float64, expected int"),
    ],
    ids=["float-images", "rank-3", "label-length", "label-range", "float-labels"],
)
def test_npz_rejects_bad_shards(tmp_path, images, labels, match):
    write_shard(tmp_path / "x_train.npz", images, labels)
    cfg = make_cfg(source="npz", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=match):
        make_source(cfg, "train")


@pytest.mark.parametrize(
    "kind, match",
    [("garbage", r"is not a readable \.npz archive"), ("npy", r"is a single \.npy array")],
)
def test_npz_file_that_is_not_an_archive_is_named(tmp_path, kind, match):
    path = tmp_path / "x_train.npz"
    with open(path, "wb") as f:
        if kind == "npy":
            np.save(f, GOOD_IMAGES)
        else:
            f.write(b"not an archive")
    with pytest.raises(DataError, match=rf"{path} {match}"):
        make_source(make_cfg(source="npz", data_dir=str(tmp_path)), "train")


def test_npz_missing_or_empty_directory(tmp_path):
    missing = make_cfg(source="npz", data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"nope' is not a directory"):
        make_source(missing, "train")
    write_shard(tmp_path / "x_test.npz", GOOD_IMAGES, GOOD_LABELS)
    with pytest.raises(DataError, match=r"no file in .* matches .*split 'train'"):
        make_source(make_cfg(source="npz", data_dir=str(tmp_path)), "train")


def test_unknown_source_lists_the_known_ones():
    assert {"npz", "tfds", "synthetic", "digits"} <= set(SOURCES.names())
    with pytest.raises(ValueError, match=r"unknown dataset source 'csv'.*'npz'"):
        make_source(make_cfg(source="csv"), "train")


# ------------------------------------------------------------------- determinism and resume


def train_labels(source, cfg, **kwargs):
    return [b["label"] for b in train_iterator(source, cfg, **kwargs)]


def test_same_seed_same_batches_and_resume_is_the_tail():
    source = make_source(make_cfg(num_examples=40), "train")
    cfg = make_cfg()
    full = collect(train_iterator(source, cfg, global_batch=8, seed=3, num_steps=12))
    again = collect(train_iterator(source, cfg, global_batch=8, seed=3, num_steps=12))
    tail = collect(train_iterator(source, cfg, global_batch=8, seed=3, start_step=7, num_steps=5))
    assert len(full) == 12 and len(tail) == 5
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(full[7:], tail, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = collect(train_iterator(source, cfg, global_batch=8, seed=4, num_steps=12))
    assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(full, other, strict=True))
    assert not np.array_equal(full[0]["image"], other[0]["image"])


@pytest.mark.parametrize("preprocess", ["cifar", "imagenet"])
def test_uint8_batches_are_the_normalised_batches_before_normalisation(preprocess):
    cfg = make_cfg(preprocess=preprocess, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    stored = 32 if preprocess == "cifar" else 40  # the imagenet recipe crops and resizes
    source = make_source(make_cfg(num_examples=40, image_size=stored), "train")
    kwargs = {"global_batch": 8, "seed": 3, "num_steps": 2}
    floats = collect(train_iterator(source, cfg, **kwargs))
    pixels = collect(train_iterator(source, cfg, normalised=False, **kwargs))
    for f, p in zip(floats, pixels, strict=True):
        assert p["image"].dtype == np.uint8 and p["image"].shape == (8, 32, 32, 3)
        expected = (p["image"] / 255 - np.array(cfg.mean)) / np.array(cfg.std)
        np.testing.assert_allclose(f["image"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(f["label"], p["label"])


def test_each_epoch_visits_every_example_once():
    source = indexed_source(22)  # 5 steps of 4 per epoch; 2 examples dropped per epoch
    cfg = make_cfg(preprocess="none", image_size=8)
    assert steps_per_epoch(22, 4) == 5
    labels = train_labels(source, cfg, global_batch=4, seed=0, num_steps=10)
    epoch0, epoch1 = np.concatenate(labels[:5]), np.concatenate(labels[5:])
    for epoch in (epoch0, epoch1):
        assert len(np.unique(epoch)) == 20 and set(epoch) <= set(range(22))
    assert not np.array_equal(epoch0, epoch1)
    expected = np.random.default_rng([0, 1]).permutation(22)[:20]
    np.testing.assert_array_equal(epoch1, expected)
    images = collect(train_iterator(source, cfg, global_batch=4, seed=0, num_steps=1))[0]
    np.testing.assert_array_equal(to_pixels(images["image"])[:, 0, 0, 0], labels[0])


def test_endless_iterator_crosses_epochs():
    source = indexed_source(12)
    cfg = make_cfg(preprocess="none", image_size=8)
    it = train_iterator(source, cfg, global_batch=4, seed=1, num_threads=2, prefetch=2)
    labels = np.concatenate([next(it)["label"] for _ in range(9)])  # three epochs
    for epoch in labels.reshape(3, 12):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(12))


def test_batch_sizes_are_validated():
    source = indexed_source(3)
    cfg = make_cfg(preprocess="none", image_size=8)
    with pytest.raises(ValueError, match=r"3 examples is smaller than one global batch of 4"):
        train_iterator(source, cfg, global_batch=4, seed=0)
    with pytest.raises(ValueError, match=r"global_batch 6 must be .* process_count 4"):
        train_iterator(indexed_source(12), cfg, global_batch=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index 2 must lie in \[0, process_count=2\)"):
        eval_iterator(source, cfg, global_batch=4, process_index=2, process_count=2)


# ------------------------------------------------------------------------------ process split


def test_process_shares_concatenate_to_the_single_process_batch():
    source = make_source(make_cfg(num_examples=48), "train")
    cfg = make_cfg()
    kwargs = {"global_batch": 12, "seed": 5, "start_step": 3, "num_steps": 4}
    whole = collect(train_iterator(source, cfg, process_index=0, process_count=1, **kwargs))
    shares = [
        collect(train_iterator(source, cfg, process_index=p, process_count=2, **kwargs))
        for p in (0, 1)
    ]
    for step, batch in enumerate(whole):
        parts = [shares[p][step] for p in (0, 1)]
        assert parts[0]["image"].shape == (6, 32, 32, 3)
        np.testing.assert_array_equal(np.concatenate([q["label"] for q in parts]), batch["label"])
        np.testing.assert_array_equal(np.concatenate([q["image"] for q in parts]), batch["image"])


def test_train_transform_slice_matches_the_whole_batch():
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), np.uint8)
    cfg = make_cfg()
    whole = train_transform(images, np.random.default_rng(9), cfg)
    part = train_transform(images[6:], np.random.default_rng(9), cfg, offset=6, global_batch=10)
    np.testing.assert_array_equal(part, whole[6:])
    with pytest.raises(ValueError, match=r"slice \[6, 10\) .* global batch of 8"):
        train_transform(images[6:], np.random.default_rng(9), cfg, offset=6, global_batch=8)


# ------------------------------------------------------------------------------------ eval


def test_eval_visits_each_example_once_with_padding():
    source = indexed_source(23)
    cfg = make_cfg(preprocess="none", image_size=8)
    assert num_eval_batches(23, 8) == 3
    batches = collect(eval_iterator(source, cfg, global_batch=8))
    assert len(batches) == 3
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    label = np.concatenate([b["label"] for b in batches])
    image = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(index[mask], np.arange(23))
    np.testing.assert_array_equal(label[mask], np.arange(23))
    np.testing.assert_array_equal(to_pixels(image[mask])[:, 3, 3, 1], np.arange(23))
    assert mask.tolist() == [True] * 23 + [False]
    assert index[-1] == -1 and label[-1] == 0 and not image[-1].any()
    assert batches[0]["index"].dtype == np.int64 and batches[0]["label"].dtype == np.int32


def test_eval_limit_and_two_processes():
    source = indexed_source(23)
    cfg = make_cfg(preprocess="none", image_size=8)
    assert num_eval_batches(23, 8, limit=10) == 2
    limited = collect(eval_iterator(source, cfg, global_batch=8, limit=10))
    index = np.concatenate([b["index"] for b in limited])
    np.testing.assert_array_equal(index, [*range(10), -1, -1, -1, -1, -1, -1])
    whole = collect(eval_iterator(source, cfg, global_batch=8))
    shares = [
        collect(eval_iterator(source, cfg, global_batch=8, process_index=p, process_count=2))
        for p in (0, 1)
    ]
    assert [len(s) for s in shares] == [3, 3]
    # The last global batch holds 16..22: process 1's share is 20, 21, 22 and one pad.
    np.testing.assert_array_equal(shares[1][2]["index"], [20, 21, 22, -1])
    for k, batch in enumerate(whole):
        for key in ("image", "label", "mask", "index"):
            joined = np.concatenate([shares[0][k][key], shares[1][k][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_eval_share_that_is_all_padding():
    source = indexed_source(3)  # process 1 of 2 would hold examples 4..7: all padding
    cfg = make_cfg(preprocess="none", image_size=8)
    last = collect(eval_iterator(source, cfg, global_batch=8, process_index=1, process_count=2))
    assert len(last) == 1
    assert not last[0]["mask"].any() and (last[0]["index"] == -1).all()


# ----------------------------------------------------------------------- cifar augmentation


def find_window(padded, crop):
    """All (dy, dx, flipped) whose window of ``padded`` equals ``crop``."""
    s = crop.shape[0]
    hits = []
    for dy in range(padded.shape[0] - s + 1):
        for dx in range(padded.shape[1] - s + 1):
            window = padded[dy : dy + s, dx : dx + s]
            hits += [
                (dy, dx, f)
                for f, w in ((False, window), (True, window[:, ::-1]))
                if np.array_equal(w, crop)
            ]
    return hits


@pytest.mark.parametrize("flip", [True, False])
def test_cifar_train_is_a_window_of_the_padded_image(flip):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (24, 32, 32, 3), np.uint8)
    out = train_transform(images, np.random.default_rng(2), make_cfg(flip=flip))
    assert out.dtype == np.float32 and out.shape == (24, 32, 32, 3)
    crops = to_pixels(out)
    found = []
    for image, crop in zip(images, crops, strict=True):
        hits = find_window(np.pad(image, ((4, 4), (4, 4), (0, 0))), crop)
        assert len(hits) == 1, hits  # random pixels: exactly one matching window
        found.append(hits[0])
    flips = {f for _, _, f in found}
    assert flips == ({False, True} if flip else {False})
    assert len({(dy, dx) for dy, dx, _ in found}) > 5  # offsets vary over the batch


def test_normalisation_matches_hand_computed_values():
    image = np.zeros((1, 2, 2, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 0, 255, 128
    cfg = make_cfg(image_size=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = eval_transform(image, cfg)
    expected = [(0 - 0.5) / 0.2, (1 - 0.4) / 0.25, (128 / 255 - 0.3) / 0.5]  # -2.5, 2.4, 0.4039
    np.testing.assert_allclose(out[0, 1, 1], expected, rtol=1e-6)
    assert out.dtype == np.float32


def test_fixed_size_recipes_reject_other_sizes_and_unknown_recipes():
    images = np.zeros((2, 30, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=r"'none' needs uint8 \[n, 32, 32, 3\].*\[2, 30, 30, 3\]"):
        eval_transform(images, make_cfg(preprocess="none"))
    with pytest.raises(ValueError, match=r"unknown preprocess 'autoaugment'"):
        eval_transform(images, make_cfg(preprocess="autoaugment"))
    with pytest.raises(ValueError, match=r"mean and std must be 3 values"):
        eval_transform(images[:, :2, :2], make_cfg(image_size=2, std=(1.0, 0.0, 1.0)))


# ----------------------------------------------------------------------- imagenet transforms


def test_imagenet_transforms_shapes_and_determinism():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, np.uint8) for shape in [(50, 80, 3), (300, 200, 3)]]
    cfg = make_cfg(preprocess="imagenet", image_size=16)
    a = train_transform(images, np.random.default_rng(4), cfg)
    b = train_transform(images, np.random.default_rng(4), cfg)
    c = train_transform(images, np.random.default_rng(5), cfg)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert eval_transform(images, cfg).shape == (2, 16, 16, 3)


def test_imagenet_eval_is_the_centre_of_the_resized_image():
    # 48×64 gradients; S=16 → shorter side 18, so the image becomes 18×24 (scale 8/3) and the
    # crop starts at row 1, column 4. Bilinear resizing keeps a linear ramp linear.
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([3 * x, 4 * y, np.full_like(x, 77)], -1).astype(np.uint8)
    out = to_pixels(eval_transform([image], make_cfg(preprocess="imagenet", image_size=16)))[0]
    rows, cols = np.arange(1, 17), np.arange(4, 20)
    expected_x = 3 * ((cols + 0.5) * 8 / 3 - 0.5)
    expected_y = 4 * ((rows + 0.5) * 8 / 3 - 0.5)
    np.testing.assert_allclose(out[0, :, 0], expected_x, atol=1.01)
    np.testing.assert_allclose(out[:, 0, 1], expected_y, atol=1.01)
    assert (out[..., 2] == 77).all()


def test_imagenet_random_resized_crop_falls_back_to_the_centre():
    # A 4×200 strip: no crop of ≥ 8 % area with ratio in [3/4, 4/3] fits, so the crop is the
    # centred 4×5 box (ratio 4/3), columns 97..101.
    x = np.broadcast_to(np.arange(200)[None, :, None], (4, 200, 3)).astype(np.uint8)
    cfg = make_cfg(preprocess="imagenet", image_size=8, flip=False)
    out = to_pixels(train_transform([x], np.random.default_rng(0), cfg))[0]
    assert out.min() >= 97 and out.max() <= 101
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()  # not flipped: left to right


# -------------------------------------------------------------------------------------- tfds


def test_tfds_cifar10_end_to_end_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = make_cfg(source="tfds", name="cifar10", data_dir=str(tmp_path))
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=20):
        train, test = make_source(cfg, "train"), make_source(cfg, "test")
        images, labels = train.read(np.array([3, 1]))
        assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
        assert labels.dtype == np.int32 and ((0 <= labels) & (labels < 10)).all()
        batches = collect(train_iterator(train, cfg, global_batch=8, seed=0, num_steps=3))
        assert [b["image"].shape for b in batches] == [(8, 32, 32, 3)] * 3
        evals = collect(eval_iterator(test, cfg, global_batch=8))
        assert len(evals) == 3
        np.testing.assert_array_equal(
            np.concatenate([b["index"] for b in evals]), [*range(20), -1, -1, -1, -1]
        )
        inet = make_cfg(
            source="tfds",
            name="imagenet2012",
            data_dir=str(tmp_path),
            num_classes=1000,
            preprocess="imagenet",
            image_size=16,
        )
        variable = make_source(inet, "validation")
        pictures, _ = variable.read(np.arange(3))
        assert isinstance(pictures, list) and len({p.shape for p in pictures}) > 1
        batch = next(train_iterator(variable, inet, global_batch=4, seed=0))
        assert batch["image"].shape == (4, 16, 16, 3)
        with pytest.raises(ValueError, match=r"'cifar10' has 10 classes, config num_classes is 7"):
            make_source(make_cfg(source="tfds", name="cifar10", num_classes=7), "train")


def test_tfds_unprepared_dataset_says_how_to_build_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    cfg = make_cfg(source="tfds", name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"tfds build cifar10 --file_format=array_record"):
        make_source(cfg, "train")


# --------------------------------------------------------------------- synthetic and digits


def test_synthetic_source_is_a_function_of_the_index():
    cfg = make_cfg(num_examples=100, image_size=16, num_classes=7)
    source = make_source(cfg, "train")
    assert len(source) == 100 and source.num_classes == 7
    images, labels = source.read(np.arange(100))
    assert images.dtype == np.uint8 and images.shape == (100, 16, 16, 3)
    np.testing.assert_array_equal(labels, np.arange(100) % 7)
    subset, _ = make_source(cfg, "train").read(np.array([42, 5]))
    np.testing.assert_array_equal(subset, images[[42, 5]])
    assert len({im.tobytes() for im in images}) == 100
    assert 100 < images.mean() < 155 and images.min() == 0 and images.max() == 255
    other, _ = make_source(cfg, "test").read(np.array([42, 5]))
    assert not np.array_equal(other, subset)
    with pytest.raises(ValueError, match=r"num_examples must be positive, got 0"):
        make_source(make_cfg(num_examples=0), "train")


def test_digits_source_is_a_stratified_split_of_all_1797_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    cfg = make_cfg(source="digits", name="digits", image_size=8)
    train, test = make_source(cfg, "train"), make_source(cfg, "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.num_classes == 10
    (x_train, y_train), (x_test, y_test) = (s.read(np.arange(len(s))) for s in (train, test))
    assert x_train.shape == (1437, 8, 8, 3) and x_train.dtype == np.uint8
    np.testing.assert_array_equal(x_train[..., 0], x_train[..., 2])
    # At 8×8 the images are exactly the scaled digits: together, the same multiset.
    digits = datasets.load_digits()
    scaled = np.round(digits.images * (255 / 16)).astype(np.uint8)
    ours = sorted(im.tobytes() for im in np.concatenate([x_train, x_test])[..., 0])
    assert ours == sorted(im.tobytes() for im in scaled)
    assert x_train.max() == 255 and x_train.min() == 0
    total = np.bincount(digits.target, minlength=10)
    assert (np.abs(np.bincount(y_test, minlength=10) - 0.2 * total) <= 1).all()
    np.testing.assert_array_equal(np.bincount(y_train) + np.bincount(y_test), total)
    big = make_source(make_cfg(source="digits", name="digits"), "test")
    again, labels = big.read(np.arange(360))
    assert again.shape == (360, 32, 32, 3)
    np.testing.assert_array_equal(labels, y_test)
    with pytest.raises(ValueError, match=r"digits split must be one of .* got 'validation'"):
        make_source(cfg, "validation")


# ------------------------------------------------------------------ CIFAR-10 python archive


def test_cifar_python_archive_becomes_npz_shards_the_source_reads(tmp_path):
    import io
    import pickle
    import tarfile

    from aig_jax.data.cifar_archive import convert

    rng = np.random.default_rng(0)
    batches = {}
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)  # rows: R plane, G, B
            labels = rng.integers(0, 10, 4).tolist()
            batches[name] = (data, labels)
            blob = pickle.dumps({b"data": data, b"labels": labels})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    convert(str(path), str(tmp_path / "out"))
    cfg = make_cfg(source="npz", data_dir=str(tmp_path / "out"))
    train = make_source(cfg, "train")
    assert len(train) == 20
    images, labels = train.read(np.arange(20))
    data, expected = batches["data_batch_2"]
    # image 1 of batch 2 is example 5; pixel (row 0, col 1) channel c is data[1, c * 1024 + 1]
    np.testing.assert_array_equal(images[5, 0, 1], data[1, [1, 1025, 2049]])
    np.testing.assert_array_equal(labels[4:8], expected)
    test_images, _ = make_source(cfg, "test").read(np.arange(4))
    np.testing.assert_array_equal(
        test_images[3].transpose(2, 0, 1).reshape(-1), batches["test_batch"][0][3]
    )
    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*not a CIFAR-10 python archive"):
        convert(str(tmp_path / "empty.tar.gz"), str(tmp_path / "none"))
