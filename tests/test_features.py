"""Feature building and the on-disk cache (selmix_ray.features, selmix_ray.backbones)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

import selmix_ray.backbones as backbones
import selmix_ray.data as data
from selmix_ray.errors import ConfigError, DataError
from selmix_ray.features import (
    FeatureSet,
    build_features,
    cache_key,
    cache_key_fields,
    load_cached,
    rebuild_features,
)

QUIET = {"progress": False}


def entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))


def forbid_cold_path(monkeypatch):
    """A cache hit must neither read images nor run a backbone: make both raise."""
    def boom(*args, **kwargs):
        raise AssertionError("cold path ran on what should be a cache hit")

    monkeypatch.setattr(data, "load_dataset", boom)
    monkeypatch.setattr(backbones, "prepare_backbone", boom)


@pytest.fixture
def digits_identity(tmp_path):
    return build_features("digits", rho=10, backbone="identity", cache_dir=tmp_path, **QUIET)


def test_identity_features_are_pixels_and_head_is_fitted(digits_identity, tmp_path):
    fs = digits_identity
    assert isinstance(fs, FeatureSet) and fs.n_classes == 10 and fs.dim == 64
    assert fs.train_counts.tolist() == data.long_tail_counts(104, 10, 10).tolist()
    assert np.bincount(fs.val.y).tolist() == [20] * 10 and np.bincount(fs.test.y).tolist() == [50] * 10
    raw = data.load_dataset("digits")
    plan = data.plan_splits(raw, rho=10, seed=0)
    np.testing.assert_array_equal(fs.test.x, raw.pools["train"].load(plan.splits["test"].indices).reshape(-1, 64))
    assert fs.metadata["head_source"] == "erm"
    accuracy = ((fs.test.x @ fs.weight.T + fs.bias).argmax(1) == fs.test.y).mean()
    assert accuracy > 0.8  # logistic regression on 8x8 digits
    meta = fs.metadata
    assert meta["build_args"] == {"dataset": "digits", "rho": 10, "backbone": "identity", "seed": 0, "opts": {},
                                  "cache_dir": str(tmp_path.resolve())}
    assert (meta["dataset"], meta["rho"], meta["backbone"], meta["dtype"]) == ("digits", 10, "identity", "float32")
    json.dumps(meta)


def test_cache_hit_is_identical_zero_copy_and_runs_nothing(digits_identity, tmp_path, monkeypatch):
    first = digits_identity
    assert first.metadata["cache_hit"] is False
    forbid_cold_path(monkeypatch)
    second = build_features("digits", rho=10, backbone="identity", cache_dir=tmp_path, **QUIET)
    assert second.metadata["cache_hit"] is True and second.key == first.key
    for name in ("train", "val", "test"):
        a, b = getattr(first, name), getattr(second, name)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        assert not b.x.flags.writeable and not b.x.flags.owndata  # a view over the memory map
    np.testing.assert_array_equal(first.weight, second.weight)
    assert entries(tmp_path) == [first.key]


def test_rebuild_from_build_args_hits_cache(digits_identity, tmp_path, monkeypatch):
    forbid_cold_path(monkeypatch)
    args = json.loads(json.dumps(digits_identity.metadata["build_args"]))  # as a run manifest stores it
    again = rebuild_features(args, progress=False)  # the cache_dir it was built in
    assert again.key == digits_identity.key and again.metadata["cache_hit"]


BASE = dict(dataset="digits", rho=10, backbone="identity", seed=0)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"rho": 5},
        {"n_val": 19},
        {"n_test": 49},
        {"n_max": 100},
        {"rho_unlabeled": 0.5},
        {"n_max_unlabeled": 8, "rho_unlabeled": 0.5},
        {"dtype": "float16"},
        {"image_size": 6},
        {"head_steps": 50},
    ],
)
def test_changing_one_key_field_misses(digits_identity, tmp_path, change):
    args = {**BASE, **change}
    dataset = args.pop("dataset")
    fs = build_features(dataset, cache_dir=tmp_path, **args, **QUIET)
    assert fs.metadata["cache_hit"] is False and fs.key != digits_identity.key
    assert len(entries(tmp_path)) == 2


def key_for(backbone="cnn", **options):
    from selmix_ray.features import _resolve_options

    full = _resolve_options("digits", 10, backbone, 0, options)
    return cache_key(cache_key_fields("digits", rho=10, backbone=backbone, seed=0, options=full))


def test_key_covers_backbone_fields_and_ignores_execution(tmp_path):
    base = key_for()
    for change in ({"epochs": 3}, {"lr": 1e-3}, {"augment": False}, {"width": 8}, {"feature_dim": 32},
                   {"train_batch_size": 32}, {"weight_decay": 0.0}, {"keep_maps": True}, {"normalize": "imagenet"},
                   {"cut": "block"}, {"maps_dtype": "float16"}):
        assert key_for(**change) != base, change
    assert key_for("identity") != base
    from selmix_ray.features import _resolve_options

    as_float = cache_key(cache_key_fields("digits", rho=10.0, backbone="cnn", seed=0,
                                          options=_resolve_options("digits", 10.0, "cnn", 0, {})))
    assert as_float == base
    for same in ({"device": "cpu"}, {"batch_size": 7}, {"progress": False}, {"num_threads": 2}, {"verify": True}):
        assert key_for(**same) == base, same
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"one")
    first = key_for("resnet18", weights=str(ckpt))
    ckpt.write_bytes(b"two")  # same path, other bytes
    assert key_for("resnet18", weights=str(ckpt)) != first


def test_truncated_or_incomplete_entry_is_rebuilt(digits_identity, tmp_path):
    entry = tmp_path / digits_identity.key
    original = np.array(digits_identity.train.x)
    train_file = entry / "train.arrow"
    data_bytes = train_file.read_bytes()
    train_file.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(DataError, match="train.arrow has .* bytes, the manifest says"):
        load_cached(entry)
    with pytest.warns(UserWarning, match="Rebuilding"):
        again = build_features("digits", rho=10, backbone="identity", cache_dir=tmp_path, **QUIET)
    assert again.metadata["cache_hit"] is False
    np.testing.assert_array_equal(again.train.x, original)

    stale = tmp_path / f".tmp-{digits_identity.key}-dead"  # a crashed writer's leftovers
    stale.mkdir()
    os.utime(stale, (0, 0))
    (entry / "manifest.json").unlink()  # as after a crash before the manifest was written
    with pytest.raises(DataError, match="no manifest"):
        load_cached(entry)
    with pytest.warns(UserWarning, match="Rebuilding"):
        build_features("digits", rho=10, backbone="identity", cache_dir=tmp_path, **QUIET)
    assert load_cached(entry).key == digits_identity.key
    assert not stale.exists()


def test_flipped_byte_caught_by_verify(digits_identity, tmp_path):
    path = tmp_path / digits_identity.key / "val.arrow"
    raw = bytearray(path.read_bytes())
    raw[-200] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"val.arrow fails its xxh3_128 check"):
        load_cached(path.parent, verify=True)


def test_manifest_of_the_former_format_is_verified_with_sha256(digits_identity, tmp_path):
    """An entry written before xxh3-128 (manifest checksums named sha256) still loads and verifies."""
    from selmix_ray.cache import file_sha256

    entry = tmp_path / digits_identity.key
    manifest = json.loads((entry / "manifest.json").read_text())
    assert all(set(facts) == {"bytes", "xxh3_128"} for facts in manifest["files"].values())
    manifest["files"] = {name: {"bytes": facts["bytes"], "sha256": file_sha256(entry / name)}
                         for name, facts in manifest["files"].items()}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(load_cached(entry, verify=True).val.x, digits_identity.val.x)
    raw = bytearray((entry / "val.arrow").read_bytes())
    raw[-200] ^= 0xFF
    (entry / "val.arrow").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="val.arrow fails its sha256 check"):
        load_cached(entry, verify=True)


def test_unlabeled_pool_and_float16(tmp_path):
    fs = build_features("digits", rho=10, backbone="identity", cache_dir=tmp_path, rho_unlabeled=0.5,
                        n_max=50, dtype="float16", **QUIET)
    assert fs.train.x.dtype == np.float16 and fs.weight.dtype == np.float32
    assert np.all(fs.unlabeled.y == -1)
    n_u = fs.metadata["sizes"]["n_max_unlabeled"]
    assert np.bincount(fs.unlabeled_true_y, minlength=10).tolist() == data.long_tail_counts(n_u, 0.5, 10).tolist()
    rows = {r.tobytes() for r in fs.unlabeled.x}
    assert not rows & {r.tobytes() for r in fs.val.x} and not rows & {r.tobytes() for r in fs.test.x}


def test_cnn_backbone_head_maps_and_determinism(tmp_path):
    opts = dict(rho=10, backbone="cnn", epochs=1, keep_maps=True, **QUIET)
    fs = build_features("digits", cache_dir=tmp_path / "a", **opts)
    assert fs.metadata["head_source"] == "backbone" and fs.dim == 64
    assert fs.train.maps.shape == (len(fs.train), 64, 2, 2)
    np.testing.assert_allclose(fs.train.x, fs.train.maps.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    twin = build_features("digits", cache_dir=tmp_path / "b", **opts)  # cold again, same seed
    np.testing.assert_array_equal(fs.test.x, twin.test.x)
    np.testing.assert_array_equal(fs.weight, twin.weight)


@pytest.mark.slow  # resnet18 built five times: 5-50 s here, depending on load
def test_torchvision_checkpoint(tmp_path):
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r18.pt")
    with pytest.warns(UserWarning, match="1 unexpected keys"):
        fs = build_features("digits", rho=10, backbone="resnet18", weights=tmp_path / "r18.pt",
                            cache_dir=tmp_path, n_max=30, keep_maps=True, **QUIET)
    assert fs.test.maps.shape == (len(fs.test), 512, 1, 1)  # layer4's output on 8x8 digits
    np.testing.assert_allclose(fs.test.x, fs.test.maps.mean(axis=(2, 3)), rtol=1e-6)
    assert fs.metadata["head_source"] == "backbone" and fs.dim == 512
    np.testing.assert_array_equal(fs.weight, model.fc.weight.detach().numpy())
    assert fs.metadata["backbone_info"]["unexpected_keys"] == ["extra.weight"]
    # independent reference: the same network with fc = Identity on ImageNet-normalised 3-channel pixels
    model.fc = torch.nn.Identity()
    model.eval()
    raw = data.load_dataset("digits")
    indices = data.plan_splits(raw, rho=10, n_max=30, seed=0).splits["test"].indices[:40]
    images = torch.from_numpy(raw.pools["train"].load(indices)).expand(-1, 3, -1, -1)
    mean = torch.tensor(backbones.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(backbones.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        expected = model((images - mean) / std).numpy()
    np.testing.assert_allclose(fs.test.x[:40], expected, rtol=1e-4, atol=1e-4)
    json.dumps(fs.metadata)
    # cut="block": layer4's input is cached, x is unchanged, and the rebuilt layer4 maps one to the other
    with pytest.warns(UserWarning, match="1 unexpected keys"):
        block_fs = build_features("digits", rho=10, backbone="resnet18", weights=tmp_path / "r18.pt",
                                  cache_dir=tmp_path, n_max=30, cut="block", **QUIET)
    assert block_fs.test.maps.shape == (len(fs.test), 256, 1, 1) and block_fs.block["config"]["attribute"] == "layer4"
    np.testing.assert_allclose(block_fs.test.x, fs.test.x, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        rebuilt = backbones.build_block(block_fs.block)(torch.from_numpy(np.array(block_fs.test.maps))).numpy()
    np.testing.assert_allclose(rebuilt, fs.test.x, rtol=1e-5, atol=1e-5)

    torch.save(resnet18(num_classes=7).state_dict(), tmp_path / "r18_7.pt")  # other classes: ERM head
    fs7 = build_features("digits", rho=10, backbone="resnet18", weights=tmp_path / "r18_7.pt",
                         cache_dir=tmp_path, n_max=30, head_steps=20, **QUIET)
    assert fs7.metadata["head_source"] == "erm" and fs7.weight.shape == (10, 512)
    with pytest.raises(DataError, match="needs weights="):
        build_features("digits", rho=10, backbone="resnet18", cache_dir=tmp_path, **QUIET)


FACTORY = textwrap.dedent(
    """
    import torch
    calls = []

    def split(*, n_classes, in_channels):
        trunk = torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        block = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
        return {"trunk": trunk, "block": block, "head": torch.nn.Linear(6, n_classes)}

    def make(*, n_classes, in_channels):
        calls.append(n_classes)
        trunk = torch.nn.Sequential(torch.nn.Conv2d(in_channels, 5, 3, padding=1), torch.nn.ReLU())
        return trunk, torch.nn.Linear(5, n_classes)

    def broken(*, n_classes, in_channels):
        raise RuntimeError("the backbone ran")
    """
)


def test_user_factory_and_cache_hit_without_calling_it(tmp_path, monkeypatch):
    (tmp_path / "my_backbones.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_backbones

    cache = tmp_path / "cache"
    fs = build_features("digits", rho=5, backbone="my_backbones:make", cache_dir=cache, keep_maps=True, **QUIET)
    assert my_backbones.calls == [10] and fs.dim == 5 and fs.train.maps.shape[1:] == (5, 8, 8)
    assert fs.metadata["head_source"] == "backbone"
    hit = build_features("digits", rho=5, backbone="my_backbones:make", cache_dir=cache, keep_maps=True, **QUIET)
    assert my_backbones.calls == [10] and hit.metadata["cache_hit"]
    with pytest.raises(RuntimeError, match="the backbone ran"):
        build_features("digits", rho=5, backbone="my_backbones:broken", cache_dir=cache, **QUIET)


def test_npz_key_follows_every_byte_not_size_or_mtime(tmp_path):
    """One flipped byte of one array, same size, same mtime: another key (a miss), and the cached arrays
    of each file are that file's. Neither a stat-based key nor a sampled hash would see it."""
    rng = np.random.default_rng(2)
    arrays = {f"x_{s}": rng.normal(size=(n, 3)).astype(np.float32) for s, n in [("train", 12), ("val", 4), ("test", 4)]}
    arrays |= {f"y_{s}": np.arange(n) % 2 for s, n in [("train", 12), ("val", 4), ("test", 4)]}
    path = tmp_path / "f.npz"
    np.savez(path, **arrays)
    first = build_features("npz", rho=None, root=path, cache_dir=tmp_path / "c", head_steps=5, **QUIET)
    stat = path.stat()
    changed = dict(arrays, x_test=arrays["x_test"].copy())
    changed["x_test"].reshape(-1).view(np.uint8)[5] ^= 0x01  # one bit of one byte of one value
    np.savez(path, **changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = build_features("npz", rho=None, root=path, cache_dir=tmp_path / "c", head_steps=5, **QUIET)
    assert second.key != first.key and second.metadata["cache_hit"] is False
    np.testing.assert_array_equal(second.test.x, changed["x_test"])
    assert not np.array_equal(second.test.x, first.test.x)
    assert data.root_identity("npz", path)["xxh3_128"] == second.metadata["key_fields"]["root"]["xxh3_128"]


def test_npz_precomputed(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"x_{s}": rng.normal(size=(n, 4)).astype(np.float32) for s, n in [("train", 20), ("val", 6), ("test", 6)]}
    arrays |= {f"y_{s}": np.arange(n) % 2 for s, n in [("train", 20), ("val", 6), ("test", 6)]}
    arrays["x_unlabeled"] = rng.normal(size=(5, 4)).astype(np.float32)  # no y_unlabeled: truth unknown
    np.savez(tmp_path / "f.npz", **arrays)
    fs = build_features("npz", rho=None, root=tmp_path / "f.npz", cache_dir=tmp_path / "c", **QUIET)
    np.testing.assert_array_equal(fs.train.x, arrays["x_train"])
    np.testing.assert_array_equal(fs.unlabeled.x, arrays["x_unlabeled"])
    assert np.all(fs.unlabeled.y == -1) and fs.unlabeled_true_y is None
    assert fs.metadata["backbone_info"] == {"kind": "precomputed"} and fs.metadata["head_source"] == "erm"
    assert fs.metadata["build_args"]["opts"]["root"] == str((tmp_path / "f.npz").resolve())  # cwd-proof


def test_bad_arguments_listed_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_features("svhn", rho=0.5, cache_dir=tmp_path, dtype="int8", colour=True)
    text = str(info.value)
    assert len(info.value.problems) == 4
    for part in ("Unknown dataset 'svhn'", "rho >= 1", "dtype must be one of", "unknown option(s) colour"):
        assert part in text
    with pytest.raises(DataError, match="n_max=500"):
        build_features("digits", rho=10, backbone="identity", n_max=500, cache_dir=tmp_path, **QUIET)
    with pytest.raises(DataError, match="keep_maps=True needs"):
        build_features("digits", rho=10, backbone="identity", keep_maps=True, cache_dir=tmp_path, **QUIET)
    with pytest.raises(DataError, match="Unknown backbone 'resnet_9000'"):
        build_features("digits", rho=10, backbone="resnet_9000", weights="x.pt", cache_dir=tmp_path, **QUIET)
    assert entries(tmp_path) == []  # nothing half-written


def test_object_store_round_trip_is_zero_copy(ray_cluster, digits_identity):
    import ray

    ref = ray.put(digits_identity.to_dict())

    @ray.remote(num_cpus=0)
    def inspect(payload):
        fs = FeatureSet.from_object_store(payload)
        x = payload["train"]["x"]
        return {
            "writeable": bool(x.flags.writeable),
            "owndata": bool(x.flags.owndata),
            "has_base": x.base is not None,
            "fs_writeable": bool(fs.train.x.flags.writeable),
            "checksum": float(np.asarray(fs.train.x, np.float64).sum()),
        }

    facts = ray.get(inspect.remote(ref))  # a top-level ObjectRef argument arrives as the fetched dict
    assert facts == {"writeable": False, "owndata": False, "has_base": True, "fs_writeable": False,
                     "checksum": float(np.asarray(digits_identity.train.x, np.float64).sum())}
    local = FeatureSet.from_object_store(ray.get(ref))
    np.testing.assert_array_equal(local.val.x, digits_identity.val.x)


# -- top-block mode (cut="block") ------------------------------------------------------------------

BLOCK_OPTS = dict(rho=10, backbone="cnn", epochs=1, **QUIET)


@pytest.fixture(scope="module")
def digits_cnn_block(tmp_path_factory):
    return build_features("digits", cut="block", cache_dir=tmp_path_factory.mktemp("block"), **BLOCK_OPTS)


def test_block_mode_caches_block_input_and_weights(digits_cnn_block, tmp_path, monkeypatch):
    import torch

    fs = digits_cnn_block
    assert fs.metadata["cut"] == "block" and fs.dim == 64
    assert fs.train.maps.shape == (len(fs.train), 32, 2, 2)  # block2's output: the map entering block3
    assert fs.block["kind"] == "cnn" and fs.block["config"] == {"in_channels": 32, "out_channels": 64, "pool": False}
    assert fs.block["state_dict"]["0.weight"].shape == (64, 32, 3, 3)
    assert all(isinstance(v, np.ndarray) for v in fs.block["state_dict"].values())
    json.dumps(fs.metadata)
    # x is the penultimate feature of the same trained CNN: equal to the default cut's x
    penultimate = build_features("digits", cache_dir=tmp_path, **BLOCK_OPTS)
    assert penultimate.key != fs.key and penultimate.block is None
    np.testing.assert_array_equal(fs.test.x, penultimate.test.x)
    np.testing.assert_array_equal(fs.weight, penultimate.weight)
    # the rebuilt block maps the stored maps to the stored x
    block = backbones.build_block(fs.block)
    assert isinstance(block, backbones.TopBlock) and not block.training
    with torch.no_grad():
        for split in (fs.train, fs.val, fs.test):
            x = block(torch.from_numpy(np.array(split.maps))).numpy()
            np.testing.assert_allclose(x, split.x, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in block.parameters())
    # a cache hit brings the block back, read-only, without running anything
    forbid_cold_path(monkeypatch)
    hit = build_features("digits", cut="block", cache_dir=fs.metadata["build_args"]["cache_dir"], **BLOCK_OPTS)
    assert hit.metadata["cache_hit"] and hit.block["config"] == fs.block["config"]
    for name, value in fs.block["state_dict"].items():
        np.testing.assert_array_equal(hit.block["state_dict"][name], value)
        assert not hit.block["state_dict"][name].flags.writeable


def test_block_mode_factory_split_and_float16_maps(tmp_path, monkeypatch):
    import torch

    import selmix_ray.features as features

    (tmp_path / "split_backbones.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(features, "MAPS_FLOAT16_ABOVE_BYTES", 0)  # every map counts as large
    fs = build_features("digits", rho=5, backbone="split_backbones:split", cut="block", cache_dir=tmp_path / "c", **QUIET)
    assert fs.train.maps.shape[1:] == (4, 4, 4) and fs.train.maps.dtype == np.float16 and fs.train.x.dtype == np.float32
    assert fs.block["kind"] == "factory" and fs.metadata["head_source"] == "backbone" and fs.dim == 6
    with torch.no_grad():
        x = backbones.build_block(fs.block)(torch.from_numpy(fs.test.maps.astype(np.float32))).numpy()
    np.testing.assert_allclose(x, fs.test.x, rtol=1e-2, atol=1e-2)  # float16 maps
    with pytest.raises(DataError, match="needs factory 'split_backbones:make' to name its split"):
        build_features("digits", rho=5, backbone="split_backbones:make", cut="block", cache_dir=tmp_path / "c", **QUIET)
    with pytest.raises(ConfigError) as info:
        build_features("digits", rho=5, backbone="identity", cut="top", cache_dir=tmp_path / "c", **QUIET)
    assert "cut must be one of penultimate, block" in str(info.value)
    with pytest.raises(ConfigError, match="cut='block' needs a backbone with a last block"):
        build_features("digits", rho=5, backbone="identity", cut="block", cache_dir=tmp_path / "c", **QUIET)
    with pytest.raises(DataError, match="FeatureSet.block payload"):
        backbones.build_block(None)


def test_block_mode_object_store_is_zero_copy(ray_cluster, digits_cnn_block):
    import ray

    ref = ray.put(digits_cnn_block.to_dict())

    @ray.remote(num_cpus=0)
    def inspect(payload):
        fs = FeatureSet.from_object_store(payload)
        maps, weight = fs.train.maps, fs.block["state_dict"]["0.weight"]
        return {
            "maps": (maps.flags.writeable, maps.flags.owndata, maps.base is not None),
            "weight": (weight.flags.writeable, weight.flags.owndata),
            "checksum": float(np.asarray(maps, np.float64).sum()),
            "block_sum": float(np.asarray(weight, np.float64).sum()),
            "config": fs.block["config"],
        }

    facts = ray.get(inspect.remote(ref))
    assert facts["maps"] == (False, False, True) and facts["weight"] == (False, False)
    assert facts["checksum"] == float(np.asarray(digits_cnn_block.train.maps, np.float64).sum())
    assert facts["block_sum"] == float(digits_cnn_block.block["state_dict"]["0.weight"].astype(np.float64).sum())
    assert facts["config"] == digits_cnn_block.block["config"]


# -- nothing invalid is cached; the starting head (issue 11 item 6, issue 12 items 1-2) ---------------


def small_npz(path, **changes):
    rng = np.random.default_rng(2)
    arrays = {f"x_{s}": rng.normal(size=(n, 4)).astype(np.float32) for s, n in [("train", 20), ("val", 6), ("test", 6)]}
    arrays |= {f"y_{s}": np.arange(n) % 2 for s, n in [("train", 20), ("val", 6), ("test", 6)]}
    arrays |= changes
    np.savez(path, **arrays)
    return path


def test_invalid_npz_leaves_no_cache_entry(tmp_path):
    x_test = np.ones((6, 4), np.float32)
    x_test[3, 1] = np.nan
    bad = small_npz(tmp_path / "bad.npz", x_test=x_test, y_val=np.arange(6.0) % 2)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        build_features("npz", rho=None, root=bad, cache_dir=cache, **QUIET)
    assert "x_test has 1 non-finite value(s)" in str(info.value) and "y_val must hold integer" in str(info.value)
    assert not cache.exists() or list(cache.iterdir()) == []  # no entry, no temporary folder


def test_float16_overflow_is_refused_not_cached(tmp_path):
    x_train = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    x_train[5, 2] = 1e6  # finite in float32, inf in float16
    path = small_npz(tmp_path / "big.npz", x_train=x_train)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"train split's features has 1 non-finite .* row 5, column 2; the values "
                                        r"overflow \(float16 storage ends at \+-65504: use dtype='float32'\)"):
        build_features("npz", rho=None, root=path, cache_dir=cache, dtype="float16", **QUIET)
    assert not cache.exists() or list(cache.iterdir()) == []
    fs = build_features("npz", rho=None, root=path, cache_dir=cache, **QUIET)  # float32 holds it
    assert fs.train.x[5, 2] == 1e6


NAN_FACTORY = textwrap.dedent(
    """
    import torch

    class Broken(torch.nn.Module):
        def forward(self, images):
            out = images.flatten(1)[:, :3].clone()
            out[0, 1] = float("nan")
            return out

    def make(*, n_classes, in_channels):
        return Broken()
    """
)


def test_backbone_producing_nan_is_refused_not_cached(tmp_path, monkeypatch):
    (tmp_path / "nan_backbones.py").write_text(NAN_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"the train split's features has \d+ non-finite .* the backbone "
                                        r"'nan_backbones:make' produced them\..*Nothing was cached"):
        build_features("digits", rho=10, backbone="nan_backbones:make", cache_dir=cache, batch_size=8, **QUIET)
    assert not cache.exists() or list(cache.iterdir()) == []


def by_hand_val_metrics(weight, bias, x, y, K):
    """Recall per class, mean/min recall and accuracy of argmax(x W^T + b), computed with plain numpy."""
    pred = (np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T + bias).argmax(axis=1)
    recall = np.array([np.mean(pred[y == k] == k) for k in range(K)])
    return {"mean_recall": recall.mean(), "min_recall": recall.min(), "accuracy": np.mean(pred == y)}


def test_user_head_file_is_the_starting_head_end_to_end(tmp_path):
    from selmix_ray import FinetuneConfig, finetune

    rng = np.random.default_rng(5)
    weight, bias = rng.normal(size=(10, 64)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    np.savez(tmp_path / "head.npz", weight=weight, bias=bias)
    cache = tmp_path / "cache"
    fs = build_features("digits", rho=10, backbone="identity", cache_dir=cache, head=tmp_path / "head.npz", **QUIET)
    assert fs.metadata["head_source"] == "user" and fs.metadata["head_file"] == str((tmp_path / "head.npz").resolve())
    np.testing.assert_array_equal(fs.weight, weight)
    np.testing.assert_array_equal(fs.bias, bias)
    assert fs.metadata["build_args"]["opts"]["head"] == str((tmp_path / "head.npz").resolve())  # cwd-proof
    assert "head_s" not in fs.metadata["timings"]  # nothing was fitted

    reports = []
    finetune(fs, FinetuneConfig(steps=10, eval_every=10, refresh_every=5, batch_size=16, device="cpu"),
             report=reports.append)
    step0 = reports[0]
    assert step0["step"] == 0
    expected = by_hand_val_metrics(weight, bias, fs.val.x, fs.val.y, 10)
    for name, value in expected.items():
        assert step0[f"val/{name}"] == pytest.approx(value, abs=1e-12), name
    assert expected["accuracy"] < 0.5  # a random head: clearly not the fitted one (> 0.8 on digits)

    # the file's bytes are part of the key; the ERM head is a different entry
    np.savez(tmp_path / "head.npz", weight=weight * 2, bias=bias)
    again = build_features("digits", rho=10, backbone="identity", cache_dir=cache, head=tmp_path / "head.npz", **QUIET)
    assert again.key != fs.key and not again.metadata["cache_hit"]
    np.testing.assert_array_equal(again.weight, weight * 2)
    erm = build_features("digits", rho=10, backbone="identity", cache_dir=cache, **QUIET)
    assert erm.key not in (fs.key, again.key) and erm.metadata["head_source"] == "erm"


def test_user_head_for_a_backbone_with_its_own_classifier(tmp_path):
    """head= overrides the CNN's fc; head='erm' refits; a head of the wrong shape is refused, nothing cached."""
    opts = dict(rho=10, backbone="cnn", epochs=1, **QUIET)
    own = build_features("digits", cache_dir=tmp_path / "a", **opts)
    assert own.metadata["head_source"] == "backbone"
    np.savez(tmp_path / "h.npz", weight=np.ones((10, 64)))  # no bias: zeros
    user = build_features("digits", cache_dir=tmp_path / "a", head=tmp_path / "h.npz", **opts)
    assert user.metadata["head_source"] == "user" and np.all(user.weight == 1) and np.all(user.bias == 0)
    np.testing.assert_array_equal(user.test.x, own.test.x)
    erm = build_features("digits", cache_dir=tmp_path / "a", head="erm", **opts)
    assert erm.metadata["head_source"] == "erm" and erm.metadata["timings"]["head_s"] > 0
    np.savez(tmp_path / "wrong.npz", weight=np.ones((10, 63)), bias=np.zeros(10))
    with pytest.raises(DataError, match=r"head file .*wrong.npz: weight must have shape \(K, d\) = \(10, 64\) .*"
                                        r"got \(10, 63\).*Nothing was cached"):
        build_features("digits", cache_dir=tmp_path / "b", head=tmp_path / "wrong.npz", **opts)
    assert not (tmp_path / "b").exists() or entries(tmp_path / "b") == []


def test_head_stored_in_the_npz_is_used(tmp_path):
    weight, bias = np.full((2, 4), 0.5, np.float32), np.array([1.0, -1.0], np.float32)
    path = small_npz(tmp_path / "f.npz", weight=weight, bias=bias)
    fs = build_features("npz", rho=None, root=path, cache_dir=tmp_path / "c", **QUIET)
    assert fs.metadata["head_source"] == "npz"
    np.testing.assert_array_equal(fs.weight, weight)
    np.testing.assert_array_equal(fs.bias, bias)
    refit = build_features("npz", rho=None, root=path, cache_dir=tmp_path / "c", head="erm", **QUIET)
    assert refit.metadata["head_source"] == "erm" and not np.array_equal(refit.weight, weight)


def test_head_options_checked_and_in_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_features("digits", rho=10, backbone="identity", cache_dir=tmp_path, head="nothere.npz",
                       head_steps=-1, head_batch_size=0, head_epochs="two", head_lr=float("nan"))
    assert len(info.value.problems) == 5
    for part in ("head file nothere.npz does not exist", "head_steps must be an integer >= 0",
                 "head_batch_size must be an integer >= 1", "head_epochs must be a finite number",
                 "head_lr must be a finite number"):
        assert part in str(info.value)
    base = key_for("identity")
    for change in ({"head": "erm"}, {"head_epochs": 3}, {"head_batch_size": 512}, {"head_lr": 0.02}):
        assert key_for("identity", **change) != base, change
