"""Frozen backbones (selmix_ray.backbones), their names (backbone_spec), the top block (block) and the
device resolver (device), checked against independent computations: the module's own layers run by hand,
a torchvision model built here, a checkpoint file written here (nothing is downloaded)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from selmix_ray.backbone_spec import CNNSettings, backbone_kind
from selmix_ray.backbones import SmallCNN, prepare_backbone, train_cnn
from selmix_ray.block import TopBlock, block_payload, build_block, cnn_stage
from selmix_ray.device import resolve_device, torch_threads
from selmix_ray.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = CNNSettings(epochs=2, width=4, train_batch_size=16, augment=True)


def images_and_labels(n=24, C=1, H=8, W=8, K=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    images = (rng.normal(size=(n, C, H, W)) + labels[:, None, None, None]).astype(np.float32)
    return images, labels


# -- names and devices ----------------------------------------------------------------------------------


def test_backbone_kind_names_every_kind():
    assert [backbone_kind(s) for s in ("cnn", "identity", "pkg.mod:make", "resnet18")] == [
        "cnn", "identity", "factory", "torchvision"]


def test_cnn_settings_accept_numpy_integers_and_refuse_bools_with_every_problem():
    assert CNNSettings(epochs=np.int64(3), width=np.int32(4)).check() == []
    problems = CNNSettings(epochs=True, width=0, lr=-1.0, feature_dim=2.5, augment="yes").check()
    assert problems == [
        "epochs must be an integer >= 1, but got epochs=True.",
        "width must be an integer >= 1, but got width=0.",
        "feature_dim must be None or an integer >= 1, but got feature_dim=2.5.",
        "augment must be True or False, but got augment='yes'.",
        "lr must be a finite number >= 0, but got lr=-1.0.",
    ]


def test_one_device_resolver():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available; use device='auto' or 'cpu'"):
            resolve_device("cuda:0")


def test_torch_threads_restores_the_thread_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# -- the small CNN ----------------------------------------------------------------------------------------


def test_small_cnn_shapes_and_its_parts_compose_to_the_forward_pass():
    torch.manual_seed(0)
    model = SmallCNN(3, 5, width=4, feature_dim=6).eval()
    images = torch.randn(2, 3, 12, 16)
    trunk, maps = model.trunk(images), model.maps(images)
    assert trunk.shape == (2, 8, 3, 4) and maps.shape == (2, 6, 3, 4) and model(images).shape == (2, 5)
    with torch.no_grad():  # by hand: stage by stage, then pool and the linear head
        by_hand = model.block3(model.block2(model.block1(images)))
        torch.testing.assert_close(maps, by_hand, rtol=0, atol=0)
        logits = maps.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
        torch.testing.assert_close(model(images), logits, rtol=1e-6, atol=1e-6)


def test_train_cnn_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    images, labels = images_and_labels()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = train_cnn(images, labels, n_classes=3, settings=TINY, seed=7, device=torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    again = train_cnn(images, labels, n_classes=3, settings=TINY, seed=7, device=torch.device("cpu"))
    other = train_cnn(images, labels, n_classes=3, settings=TINY, seed=8, device=torch.device("cpu"))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert not torch.equal(first.fc.weight, other.fc.weight)
    assert not first.training and not any(p.requires_grad for p in first.parameters())


def test_cnn_block_payload_rebuilds_the_last_block_exactly():
    images, labels = images_and_labels()
    prepared = prepare_backbone("cnn", n_classes=3, in_channels=1, keep_maps=False, device=torch.device("cpu"),
                                seed=0, cut="block", cnn=TINY, train_images=lambda: (images, labels))
    with torch.no_grad():
        x, maps = prepared.extract(torch.from_numpy(images))
        rebuilt = build_block(prepared.block)
        assert isinstance(rebuilt, TopBlock) and not rebuilt.training
        assert maps.shape == (24, 8, 2, 2) and x.shape == (24, 16)
        torch.testing.assert_close(rebuilt(maps), x, rtol=1e-6, atol=1e-6)
    assert prepared.head[0].shape == (3, 16) and prepared.info["kind"] == "cnn"


def test_block_payload_is_plain_numpy_and_build_block_copies_it():
    torch.manual_seed(0)
    stage = cnn_stage(2, 3, pool=False).eval()
    payload = block_payload("cnn", stage, {"in_channels": 2, "out_channels": 3, "pool": False})
    assert all(isinstance(v, np.ndarray) for v in payload["state_dict"].values())
    for value in payload["state_dict"].values():
        value.flags.writeable = False  # as an object-store view
    block = build_block(payload)
    with torch.no_grad():
        block.block[0].weight.add_(1.0)  # training the copy never writes the payload
    np.testing.assert_array_equal(payload["state_dict"]["0.weight"], stage[0].weight.detach().numpy())
    with pytest.raises(DataError, match="Unknown block kind 'nope'"):
        build_block({**payload, "kind": "nope"})


# -- a user factory and a torchvision model ----------------------------------------------------------------

FACTORY = '''
import torch

def make(n_classes, in_channels):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU())
    block = torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.ReLU())
    return {"trunk": trunk, "block": block, "head": torch.nn.Linear(5, n_classes)}
'''


def test_a_factory_backbone_features_head_and_block(tmp_path, monkeypatch):
    (tmp_path / "bb_factory_for_tests.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bb_factory_for_tests", None)
    import bb_factory_for_tests

    parts = bb_factory_for_tests.make(3, 1)
    images = torch.from_numpy(images_and_labels(n=6)[0])
    common = {"n_classes": 3, "in_channels": 1, "device": torch.device("cpu"), "seed": 0}
    with torch.no_grad():
        expected = parts["block"](parts["trunk"](images))  # (6, 5, 8, 8)
        plain = prepare_backbone("bb_factory_for_tests:make", keep_maps=True, **common)
        x, maps = plain.extract(images)
        torch.testing.assert_close(maps, expected)
        torch.testing.assert_close(x, expected.mean(dim=(2, 3)))
        np.testing.assert_array_equal(plain.head[0], parts["head"].weight.numpy())
        cut = prepare_backbone("bb_factory_for_tests:make", keep_maps=False, cut="block", **common)
        x_cut, block_input = cut.extract(images)
        torch.testing.assert_close(block_input, parts["trunk"](images))
        torch.testing.assert_close(build_block(cut.block)(block_input), x_cut)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    """A ResNet-18 with 4 classes, random weights, saved as a local state_dict file (nothing downloaded)."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=4).eval()
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_resnet18_from_a_local_checkpoint(resnet_checkpoint):
    model, path = resnet_checkpoint
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # by hand: everything before the classifier, then the global pool
        stem = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        layer4_input = model.layer3(model.layer2(model.layer1(stem)))
        expected = model.avgpool(model.layer4(layer4_input)).flatten(1)  # (2, 512)
        common = {"n_classes": 4, "in_channels": 3, "device": torch.device("cpu"), "seed": 0, "weights": path}
        prepared = prepare_backbone("resnet18", keep_maps=False, **common)
        x, maps = prepared.extract(images)
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
        assert maps is None and prepared.info["missing_keys"] == [] and prepared.info["checkpoint_classes"] == 4
        np.testing.assert_array_equal(prepared.head[0], model.fc.weight.numpy())
        cut = prepare_backbone("resnet18", keep_maps=False, cut="block", **common)
        x_cut, block_input = cut.extract(images)
        torch.testing.assert_close(block_input, layer4_input, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(build_block(cut.block)(block_input), x_cut, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="needs weights=<local checkpoint file>"):
        prepare_backbone("resnet18", keep_maps=False, **{**common, "weights": None})
