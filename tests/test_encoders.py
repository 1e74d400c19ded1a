"""Encoders: shipped EfficientNet-Lite2 weights, torchvision-layout ResNet-50, custom modules."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stmorph.errors import DependencyError, InputError  # noqa: E402
from stmorph.im import encoders  # noqa: E402
from stmorph.im.encoders import efficientnet_lite, resnet  # noqa: E402
from stmorph.im.encoders._registry import file_sha256  # noqa: E402


def _square(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def lite2():
    return encoders.get_encoder("efficientnet_lite2")


def test_registry_lists_builtins():
    assert {"efficientnet_lite2", "resnet50"} <= set(encoders.list_encoders())
    with pytest.raises(InputError, match="unknown encoder"):
        encoders.get_encoder("no_such_net")
    with pytest.raises(InputError, match="already registered"):
        encoders.register_encoder("resnet50", lambda weights=None: None)


def test_lite2_classifies_cat_and_espresso(lite2):
    data = pytest.importorskip("skimage.data")
    model = lite2.model
    batch = np.stack([_square(data.chelsea(), 260), _square(data.coffee(), 260)])
    with torch.inference_mode():
        x = lite2.preprocess(batch)
        probs = model._fc(lite2(x)).softmax(1)
    top = probs.argmax(1).tolist()
    assert 281 <= top[0] <= 285, top  # tabby/tiger/Persian/Siamese/Egyptian cat
    assert top[1] == 967, top  # espresso
    assert probs[0, 281:286].sum() > 0.8 and probs[1, 967] > 0.5
    assert lite2.dim == 1280 and lite2(x).shape == (2, 1280) and lite2(x).dtype == torch.float32
    # features() uses bf16 autocast on CPUs with bf16 instructions: same classes there
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lite2(x)
        assert feats.dtype == torch.float32  # pooled in float32
        assert model._fc(feats).float().argmax(1).tolist() == top


def test_lite2_weights_pinned(monkeypatch):
    path = efficientnet_lite.shipped_weights_path()
    assert file_sha256(path) == efficientnet_lite.WEIGHTS_SHA256
    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(DependencyError, match="SHA-256 mismatch"):
        efficientnet_lite.load_efficientnet_lite2()


def test_lite2_batchnorm_folding_is_exact(lite2):
    plain = efficientnet_lite.load_efficientnet_lite2(fuse=False)
    x = torch.rand(2, 3, 260, 260) * 2 - 1
    with torch.inference_mode():
        a = plain(x)
        b = lite2.model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_preprocess_matches_formula(lite2):
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = lite2.preprocess(patches)
    assert x.shape == (3, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    expect = (patches.transpose(0, 3, 1, 2).astype(np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(x.numpy(), expect, atol=1e-6)
    with pytest.raises(InputError, match="uint8"):
        lite2.preprocess(patches.astype(np.float32))


def _torchvision_resnet50_keys() -> list[str]:
    """The state-dict keys of torchvision.models.resnet50() (written out, torchvision not needed)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in bn]
    for layer, n in zip(range(1, 5), (3, 4, 6, 3)):
        for b in range(n):
            pre = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys += [f"{pre}.conv{i}.weight"] + [f"{pre}.bn{i}.{p}" for p in bn]
            if b == 0:
                keys += [f"{pre}.downsample.0.weight"] + [f"{pre}.downsample.1.{p}" for p in bn]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    model = resnet.ResNet50(include_top=True)
    path = tmp_path_factory.mktemp("r50") / "my_resnet50.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_resnet50_torchvision_layout(r50_file):
    path, sd = r50_file
    expected = _torchvision_resnet50_keys()
    assert len(expected) == 320
    assert sorted(sd) == sorted(expected)
    for k in expected:  # shapes of a few keys as torchvision has them
        if k in ("conv1.weight", "fc.weight", "layer4.0.downsample.0.weight", "layer1.0.conv2.weight"):
            assert tuple(sd[k].shape) == {
                "conv1.weight": (64, 3, 7, 7),
                "fc.weight": (1000, 2048),
                "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
                "layer1.0.conv2.weight": (64, 64, 3, 3),
            }[k]
    # the loader is strict: every key except fc.* must be used, nothing may be missing
    headless = resnet.ResNet50(include_top=False)
    missing, unexpected = headless.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=False)
    assert missing == [] and unexpected == []


def test_resnet50_features_2048(r50_file):
    path, _ = r50_file
    enc = encoders.get_encoder("resnet50", weights=path)
    assert enc.dim == 2048 and enc.input_size == 224 and enc.weights_sha256 == file_sha256(path)
    with torch.inference_mode():
        y = enc(enc.preprocess(np.full((2, 224, 224, 3), 128, np.uint8)))
    assert y.shape == (2, 2048) and torch.isfinite(y).all()


def test_resnet50_rejects_wrong_state_dict(tmp_path, r50_file):
    _, sd = r50_file
    bad = dict(sd)
    bad.pop("layer3.2.conv2.weight")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(DependencyError, match="missing keys.*unexpected keys"):
        encoders.get_encoder("resnet50", weights=tmp_path / "bad.pth")


def test_resnet50_weight_lookup(tmp_path, monkeypatch, r50_file):
    path, _ = r50_file
    monkeypatch.delenv(resnet.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    with pytest.raises(DependencyError, match="STMORPH_RESNET50_WEIGHTS") as err:
        encoders.get_encoder("resnet50")
    assert str(tmp_path / "torchhome" / "hub" / "checkpoints") in str(err.value)
    # environment variable
    monkeypatch.setenv(resnet.ENV_VAR, str(path))
    assert resnet.find_weights() == str(path)
    monkeypatch.delenv(resnet.ENV_VAR)
    # torch hub cache, torchvision naming: the 8 hex digits must prefix the SHA-256
    ckpt = tmp_path / "torchhome" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    good = ckpt / f"resnet50-{file_sha256(path)[:8]}.pth"
    good.write_bytes(path.read_bytes())
    assert encoders.get_encoder("resnet50").weights_sha256 == file_sha256(path)
    os.remove(good)
    (ckpt / "resnet50-0676ba61.pth").write_bytes(path.read_bytes())
    with pytest.raises(DependencyError, match="corrupt"):
        encoders.get_encoder("resnet50")


def test_resnet50_caffe_preprocessing(r50_file):
    path, _ = r50_file
    enc = encoders.get_encoder("resnet50", weights=path, preprocessing="caffe")
    px = np.zeros((1, 2, 2, 3), np.uint8)
    px[..., 0], px[..., 1], px[..., 2] = 200, 100, 50  # R, G, B
    x = enc.preprocess(px)[0, :, 0, 0].numpy()
    np.testing.assert_allclose(x, [50 - 103.939, 100 - 116.779, 200 - 123.68], atol=1e-4)  # B, G, R
    with pytest.raises(InputError, match="preprocessing"):
        encoders.get_encoder("resnet50", weights=path, preprocessing="keras")


def test_custom_module():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU())  # (B, 5, H, W) -> pooled
    enc = encoders.get_encoder(net, input_size=16, name="tiny")
    assert enc.dim == 5 and enc.name == "tiny" and enc.weights_sha256 is None
    with torch.inference_mode():
        assert enc(enc.preprocess(np.zeros((4, 16, 16, 3), np.uint8))).shape == (4, 5)
    with pytest.raises(InputError, match="input_size"):
        encoders.get_encoder(net)
    with pytest.raises(InputError, match="torch.nn.Module"):
        encoders.get_encoder(42)
    encoders.register_encoder("tiny_test", lambda weights=None: enc, overwrite=True)
    try:
        assert encoders.get_encoder("tiny_test") is enc
    finally:
        encoders._registry._REGISTRY.pop("tiny_test")
