"""Long-tailed splits (selmix_ray.data) against the formula of docs/method.md, Data, worked by hand."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import selmix_ray.npz as npz
from selmix_ray.data import (
    DATASET_DEFAULTS,
    load_dataset,
    long_tail_counts,
    make_splits,
    plan_splits,
)
from selmix_ray.errors import DataError


def reference_counts(n_max, rho, K):
    """The profile written out with a plain loop (and the reversal for rho < 1)."""
    if rho < 1:
        return reference_counts(n_max, 1 / rho, K)[::-1]
    return [max(int(n_max * rho ** (-k / (K - 1))), int(n_max / rho)) for k in range(K)]


def balanced_labels(K=5, per_class=60):
    return np.repeat(np.arange(K), per_class)


# -- the profile ---------------------------------------------------------------------------------


def test_profile_mnist_rho_100_by_hand():
    # 300 * 100^(-k/9): 300, 179.7, 107.7, 64.6, 38.7, 23.2, 13.9, 8.3, 5.0, 3.0
    assert long_tail_counts(300, 100, 10).tolist() == [300, 179, 107, 64, 38, 23, 13, 8, 5, 3]


@pytest.mark.parametrize("n_max, rho, K", [(300, 100, 10), (104, 10, 10), (500, 50, 7), (50, 3.5, 100), (9, 2, 2)])
def test_profile_matches_formula(n_max, rho, K):
    assert long_tail_counts(n_max, rho, K).tolist() == reference_counts(n_max, rho, K)


def test_profile_uniform_and_reversed():
    assert long_tail_counts(40, 1, 6).tolist() == [40] * 6
    forward = long_tail_counts(200, 20, 5)
    assert long_tail_counts(200, 1 / 20, 5).tolist() == forward[::-1].tolist()
    assert long_tail_counts(200, 0.05, 5)[-1] == 200


@pytest.mark.parametrize("args", [(0, 10, 10), (100, 0, 10), (100, -1, 10), (100, float("inf"), 10), (100, 10, 1)])
def test_profile_bad_inputs(args):
    with pytest.raises(DataError, match="must be"):
        long_tail_counts(*args)


# -- make_splits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [1, 4.0, 30])
def test_split_sizes_balanced_disjoint(rho):
    K, n_val, n_test = 5, 7, 9
    labels = balanced_labels(K, 60)
    parts = make_splits(labels, n_classes=K, rho=rho, n_val=n_val, n_test=n_test, n_max=40, seed=3)
    assert np.bincount(labels[parts.train], minlength=K).tolist() == reference_counts(40, rho, K)
    assert np.bincount(labels[parts.val], minlength=K).tolist() == [n_val] * K
    assert np.bincount(labels[parts.test], minlength=K).tolist() == [n_test] * K
    all_idx = np.concatenate([parts.train, parts.val, parts.test])
    assert len(np.unique(all_idx)) == len(all_idx)
    assert parts.unlabeled.size == 0


@pytest.mark.parametrize("rho_u", [0.1, 1.0, 5.0])
def test_unlabeled_pool_profile_and_disjoint(rho_u):
    K = 4
    labels = balanced_labels(K, 100)
    parts = make_splits(labels, n_classes=K, rho=10, n_val=10, n_test=10, n_max=30,
                        rho_unlabeled=rho_u, n_max_unlabeled=40, seed=0)
    assert np.bincount(labels[parts.unlabeled], minlength=K).tolist() == reference_counts(40, rho_u, K)
    groups = [parts.train, parts.val, parts.test, parts.unlabeled]
    joined = np.concatenate(groups)
    assert len(np.unique(joined)) == len(joined)


def test_default_unlabeled_n_max_is_largest_that_fits():
    K = 4
    labels = balanced_labels(K, 100)
    parts = make_splits(labels, n_classes=K, rho=10, n_val=10, n_test=10, n_max=30, rho_unlabeled=0.2, seed=0)
    left = 80 - long_tail_counts(30, 10, K)
    n = parts.n_max_unlabeled
    assert np.all(long_tail_counts(n, 0.2, K) <= left)
    assert not np.all(long_tail_counts(n + 1, 0.2, K) <= left)
    assert len(parts.unlabeled) == long_tail_counts(n, 0.2, K).sum()


def test_splits_deterministic_per_seed():
    labels = np.random.default_rng(0).integers(0, 6, 600)
    kwargs = dict(n_classes=6, rho=8, n_val=5, n_test=5, n_max=40, rho_unlabeled=2.0)
    a, b = make_splits(labels, seed=11, **kwargs), make_splits(labels, seed=11, **kwargs)
    c = make_splits(labels, seed=12, **kwargs)
    for name in ("train", "val", "test", "unlabeled"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.train, c.train)


def test_make_splits_errors():
    labels = balanced_labels(4, 50)
    common = dict(n_classes=4, n_val=10, n_test=10)
    with pytest.raises(DataError, match="rho >= 1"):
        make_splits(labels, rho=0.5, **common)
    with pytest.raises(DataError, match="n_max=31 .* class 0.*only 30"):
        make_splits(labels, rho=10, n_max=31, **common)
    with pytest.raises(DataError, match="Class 3 has no sample"):
        make_splits(labels[labels != 3], rho=10, **common)
    with pytest.raises(DataError, match="lower n_val or n_test"):
        make_splits(labels, rho=10, n_classes=4, n_val=30, n_test=20)
    with pytest.raises(DataError, match="unlabeled pool .* class 0, but only 0 are left"):
        make_splits(labels, rho=10, n_max=30, rho_unlabeled=2.0, n_max_unlabeled=5, **common)
    with pytest.raises(DataError, match="leaves class 0 0 samples; lower n_max"):
        make_splits(labels, rho=10, n_max=30, rho_unlabeled=2.0, **common)


# -- sources -------------------------------------------------------------------------------------


def test_unknown_dataset():
    with pytest.raises(DataError, match="Unknown dataset 'svhn'. Available: digits, mnist"):
        load_dataset("svhn")


def test_mnist_subset_and_default_plan():
    raw = load_dataset("mnist")
    labels = raw.pools["train"].labels
    assert raw.n_classes == 10 and np.bincount(labels).tolist() == [500] * 10
    images = raw.pools["train"].load(np.arange(3))
    assert images.shape == (3, 1, 28, 28) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() > 0.9
    plan = plan_splits(raw, rho=100, seed=0)
    assert np.bincount(plan.splits["train"].labels).tolist() == [300, 179, 107, 64, 38, 23, 13, 8, 5, 3]
    assert np.bincount(plan.splits["val"].labels).tolist() == [50] * 10
    assert np.bincount(plan.splits["test"].labels).tolist() == [150] * 10


def test_digits_defaults_use_every_sample_of_smallest_class():
    raw = load_dataset("digits")
    plan = plan_splits(raw, rho=1, seed=0)
    d = DATASET_DEFAULTS["digits"]
    assert np.bincount(plan.splits["train"].labels).tolist() == [d["n_max"]] * 10
    assert np.bincount(raw.pools["train"].labels).min() == d["n_max"] + d["n_val"] + d["n_test"]


def write_tiny_cifar(root, *, per_class_train=12, per_class_test=4, n_classes=10, hundred=False):
    """A CIFAR python-format folder (pickled dict batches, uint8 rows of 3*32*32) with known pixels."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(per_class, offset):
        labels = np.repeat(np.arange(n_classes), per_class)
        data = np.zeros((len(labels), 3 * 32 * 32), np.uint8)
        data[:, 0] = labels * 10 + offset  # first red pixel encodes the class
        data[:, 1] = np.arange(len(labels)) % 256  # and the second the sample
        return {"data": data, label_key: labels.tolist()}

    def dump(name, obj):
        with open(folder / name, "wb") as handle:
            pickle.dump(obj, handle)

    names = [f"class{k}" for k in range(n_classes)]
    if hundred:
        dump("train", batch(per_class_train, 0))
        dump("test", batch(per_class_test, 1))
        dump("meta", {"fine_label_names": names})
    else:
        full = batch(per_class_train, 0)
        for i in range(5):  # five batches, like the real archive
            dump(f"data_batch_{i + 1}", {"data": full["data"][i::5], "labels": full["labels"][i::5]})
        dump("test_batch", batch(per_class_test, 1))
        dump("batches.meta", {"label_names": names})
    return folder


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_tiny_folder(tmp_path, hundred):
    name = "cifar100" if hundred else "cifar10"
    K = 20 if hundred else 10
    write_tiny_cifar(tmp_path, n_classes=K, hundred=hundred)
    raw = load_dataset(name, root=tmp_path)
    assert raw.n_classes == K and raw.class_names[3] == "class3"
    train, test = raw.pools["train"], raw.pools["test"]
    assert np.bincount(train.labels).tolist() == [12] * K and np.bincount(test.labels).tolist() == [4] * K
    images = train.load(np.arange(len(train.labels)))
    assert images.shape == (12 * K, 3, 32, 32)
    np.testing.assert_allclose(images[:, 0, 0, 0] * 255, train.labels * 10, atol=1e-4)  # pixels follow labels
    plan = plan_splits(raw, rho=4, n_val=2, n_max=8, seed=0)
    assert np.bincount(plan.splits["train"].labels).tolist() == reference_counts(8, 4, K)
    assert plan.splits["test"].pool == "test" and len(plan.splits["test"].indices) == 4 * K
    assert plan.splits["val"].pool == "train" and np.bincount(plan.splits["val"].labels).tolist() == [2] * K
    assert not set(plan.splits["val"].indices) & set(plan.splits["train"].indices)


def test_cifar_missing_folder_names_path(tmp_path):
    with pytest.raises(DataError, match=r"expected the folder .*cifar-10-batches-py.*cs\.toronto\.edu"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="needs root="):
        load_dataset("cifar100")


def test_imagefolder(tmp_path):
    from PIL import Image

    for k, name in enumerate(["cat", "dog", "eel"]):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.new("RGB", (10 + i, 10), color=(40 * k, i, 0)).save(tmp_path / name / f"{i}.png")
    raw = load_dataset("imagefolder", root=tmp_path, image_size=4)
    assert raw.class_names == ("cat", "dog", "eel")
    images = raw.pools["train"].load(np.array([0, 6, 17]))
    assert images.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(images[:, 0, 0, 0] * 255, [0, 40, 80], atol=1e-3)
    with pytest.raises(DataError, match="pass image_size"):
        load_dataset("imagefolder", root=tmp_path).pools["train"].load(np.array([0, 1]))


def test_npz_used_as_given(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.normal(size=(n, 5)) for s, n in [("train", 30), ("val", 9), ("test", 12), ("unlabeled", 4)]}
    arrays |= {f"y_{s}": np.arange(n) % 3 for s, n in [("train", 30), ("val", 9), ("test", 12)]}
    np.savez(tmp_path / "f.npz", **arrays)
    raw = load_dataset("npz", root=tmp_path / "f.npz")
    assert raw.kind == "features" and raw.n_classes == 3
    plan = plan_splits(raw, rho=None)
    assert len(plan.splits["train"].indices) == 30 and len(plan.splits["unlabeled"].indices) == 4
    np.testing.assert_array_equal(raw.pools["val"].load(plan.splits["val"].indices), arrays["x_val"].astype(np.float32))
    plan = plan_splits(raw, rho=2.0, n_max=10)
    assert np.bincount(plan.splits["train"].labels).tolist() == reference_counts(10, 2.0, 3)
    np.savez(tmp_path / "bad.npz", x_train=arrays["x_train"], y_train=arrays["y_train"])
    with pytest.raises(DataError, match="lacks x_val, y_val, x_test, y_test"):
        load_dataset("npz", root=tmp_path / "bad.npz")


# -- npz validation (issue 11 item 6): every rule at read time, every problem in one DataError ---------


def npz_arrays(**changes):
    """A valid 3-class npz (30 / 9 / 12 rows, d = 5) with ``changes`` applied (None removes a key)."""
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.normal(size=(n, 5)).astype(np.float32) for s, n in [("train", 30), ("val", 9), ("test", 12)]}
    arrays |= {f"y_{s}": np.arange(n) % 3 for s, n in [("train", 30), ("val", 9), ("test", 12)]}
    arrays |= changes
    return {k: v for k, v in arrays.items() if v is not None}


def with_value(array, index, value):
    array = np.array(array)
    array[index] = value
    return array


BASE = npz_arrays()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x_val": with_value(BASE["x_val"], (4, 2), np.nan)},
         r"x_val has 1 non-finite value\(s\) \(NaN or inf\), the first \(nan\) at row 4, column 2"),
        ({"x_test": with_value(with_value(BASE["x_test"], (7, 0), np.inf), (9, 4), -np.inf)},
         r"x_test has 2 non-finite value\(s\) .*the first \(inf\) at row 7, column 0"),
        ({"x_train": with_value(BASE["x_train"], (29, 1), np.nan)}, r"x_train .* at row 29, column 1"),
        ({"y_train": (np.arange(30) % 3).astype(float) + 0.4},
         r"y_train must hold integer class indices, but holds floats \(dtype float64\); labels are refused, not truncated"),
        ({"y_val": (np.arange(9) % 3).astype(float)}, r"y_val must hold integer class indices, but holds floats"),
        ({"y_test": np.arange(12) % 2 == 0}, r"y_test must hold integer class indices, but holds booleans"),
        ({"y_test": with_value(BASE["y_test"], 5, 7)},
         r"y_test has 1 label\(s\) outside the classes 0..2 of y_train, the first 7 at row 5"),
        ({"y_val": with_value(BASE["y_val"], 3, -2)}, r"y_val has 1 label\(s\) outside .* the first -2 at row 3"),
        ({"x_test": np.zeros((0, 5), np.float32), "y_test": np.zeros(0, np.int64)}, r"x_test has no rows"),
        ({"x_val": np.zeros((0, 5), np.float32), "y_val": np.zeros(0, np.int64)}, r"x_val has no rows"),
        ({"x_unlabeled": np.zeros((0, 5), np.float32)}, r"x_unlabeled has no rows; remove x_unlabeled"),
        ({"y_train": np.array([str(k) for k in np.arange(30) % 3])},
         r"y_train must hold integer class indices, but holds strings .*class_names"),
        ({"x_train": np.array([[None] * 5] * 30, dtype=object)}, r"x_train holds Python objects .* never unpickled"),
        ({"x_test": np.array([["a"] * 5] * 12)}, r"x_test must hold real numbers .* but holds strings"),
        ({"x_val": BASE["x_val"][:, :4]}, r"x_val has rows of shape \(4,\), but x_train has \(5,\)"),
        ({"y_val": BASE["y_val"][:8]}, r"y_val must have shape \(9,\), one label per row of x_val"),
        ({"y_val": np.arange(9) % 2}, r"y_val has no sample of class 2 \(of 3\)"),
        ({"class_names": np.array(["a", "b"])},
         r"y_train has 10 label\(s\) outside the 2 class_names, the first 2 at row 2"),
        ({"weight": np.ones((3, 4))}, r"the npz's stored head: weight must have shape \(K, d\) = \(3, 5\)"),
        ({"weight": with_value(np.ones((3, 5)), (1, 1), np.nan)}, r"stored head: weight has 1 non-finite value"),
        ({"bias": np.ones(3)}, r"a bias array but no weight"),
    ],
)
def test_npz_rule(tmp_path, change, message):
    np.savez(tmp_path / "f.npz", **npz_arrays(**change))
    with pytest.raises(DataError, match=message):
        load_dataset("npz", root=tmp_path / "f.npz")


def test_npz_every_problem_in_one_error(tmp_path):
    arrays = npz_arrays(
        x_train=with_value(BASE["x_train"], (2, 3), np.nan),
        y_val=(np.arange(9) % 3).astype(np.float32),
        y_test=with_value(BASE["y_test"], 0, 3),
    )
    np.savez(tmp_path / "f.npz", **arrays)
    with pytest.raises(DataError) as info:
        load_dataset("npz", root=tmp_path / "f.npz")
    text = str(info.value)
    assert "is not valid (3 problems)" in text
    for part in ("x_train has 1 non-finite", "y_val must hold integer", "y_test has 1 label(s) outside"):
        assert part in text


def test_npz_valid_file_keeps_labels_head_and_class_names(tmp_path):
    weight, bias = np.ones((3, 5), np.float32), np.arange(3, dtype=np.float32)
    arrays = npz_arrays(y_train=(np.arange(30) % 3).astype(np.uint8), class_names=np.array(["a", "b", "c"]),
                        y_unlabeled=np.array([-1, 2]), x_unlabeled=np.ones((2, 5)), weight=weight, bias=bias)
    np.savez(tmp_path / "f.npz", **arrays)
    raw = load_dataset("npz", root=tmp_path / "f.npz")
    assert raw.class_names == ("a", "b", "c") and raw.pools["train"].labels.dtype == np.int64
    np.testing.assert_array_equal(raw.head[0], weight)
    np.testing.assert_array_equal(raw.head[1], bias)
    assert set(raw.timings) == {"read_s", "validate_s"}
    x = raw.pools["train"].load(np.arange(30))
    np.testing.assert_array_equal(x, arrays["x_train"])


def test_first_nonfinite_scans_in_chunks(monkeypatch):
    monkeypatch.setattr(npz, "FINITE_CHUNK_ROWS", 4)
    x = np.zeros((10, 3), np.float32)
    assert npz.first_nonfinite(x) is None and npz.first_nonfinite(np.zeros((3, 2), np.int64)) is None
    x[9, 2], x[6, 1] = np.inf, np.nan
    assert npz.first_nonfinite(x) == (2, (6, 1))  # the second chunk holds the first bad row
    images = np.zeros((5, 1, 2, 2), np.float16)
    images[3, 0, 1, 0] = np.inf
    assert npz.first_nonfinite(images) == (1, (3, 0, 1, 0))


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"text.npz is not an .npz archive \(it does not start like a zip file"):
        load_dataset("npz", root=tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(DataError, match="single .npy array, not an .npz archive"):
        load_dataset("npz", root=tmp_path / "one.npy")
