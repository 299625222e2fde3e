"""FeatureSet container: consistency checks and the dict round trip without copies."""

import numpy as np
import pytest

from selmix_ray.errors import DataError
from selmix_ray.featureset import FeatureSet, Split


def _features(K=3, d=4, n=6, seed=0):
    rng = np.random.default_rng(seed)

    def split(n_per_class):
        y = np.repeat(np.arange(K), n_per_class)
        return Split(x=rng.normal(size=(len(y), d)).astype(np.float32), y=y.astype(np.int64))

    return FeatureSet(
        train=split(n), val=split(2), test=split(2), n_classes=K,
        weight=np.zeros((K, d), np.float32), bias=np.zeros(K, np.float32),
    )


def test_dict_round_trip_shares_memory_and_is_read_only():
    fs = _features()
    back = FeatureSet.from_dict(fs.to_dict())
    assert np.shares_memory(back.train.x, fs.train.x)
    assert not back.train.x.flags.writeable
    assert fs.train.x.flags.writeable  # the original is left alone
    np.testing.assert_array_equal(back.train_counts, [6, 6, 6])
    assert back.class_names == ("0", "1", "2")


def test_inconsistent_feature_set_lists_every_problem():
    fs = _features()
    with pytest.raises(DataError) as info:
        FeatureSet(
            train=fs.train, val=Split(x=fs.val.x, y=np.zeros(len(fs.val), np.int64)), test=fs.test,
            n_classes=3, weight=np.zeros((2, 4), np.float32), bias=np.zeros(3, np.float32),
        )
    message = str(info.value)
    assert "weight must have shape (3, 4)" in message and "no sample of class 1, 2" in message


def test_unlabeled_split_must_hide_its_labels():
    fs = _features()
    with pytest.raises(DataError, match="unlabeled_true_y"):
        FeatureSet(
            train=fs.train, val=fs.val, test=fs.test, n_classes=3, weight=fs.weight, bias=fs.bias,
            unlabeled=Split(x=fs.train.x, y=fs.train.y),
        )


def test_from_object_store_takes_the_fetched_dict_and_refuses_anything_else():
    fs = _features()
    assert FeatureSet.from_object_store(fs) is fs
    back = FeatureSet.from_object_store(fs.to_dict())
    assert np.shares_memory(back.val.x, fs.val.x) and not back.val.x.flags.writeable
    with pytest.raises(DataError, match=r"pass ray.get\(ref\)"):
        FeatureSet.from_object_store(["not", "a", "dict"])


def test_featureset_module_never_imports_ray():
    import json
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from selmix_ray.featureset import FeatureSet\n"
            "print(json.dumps('ray' in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) is False
