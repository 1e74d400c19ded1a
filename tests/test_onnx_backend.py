"""ONNX Runtime backend: the same float32 features as PyTorch; the int8 path's agreement; option checks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import stmorph  # noqa: E402
from stmorph.errors import InputError  # noqa: E402
from stmorph.im import _features, _onnx, encoders  # noqa: E402
from stmorph.im.encoders import efficientnet_lite  # noqa: E402
from stmorph.im.encoders._layers import freeze_same_padding  # noqa: E402
from test_features import _adata  # noqa: E402

needs_ort = pytest.mark.skipif(not _onnx.available(), reason="onnxruntime/onnx not installed")


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def lite2():
    return encoders.get_encoder("efficientnet_lite2")


def _tissue_adata(n_side=8):
    """Spots on scikit-image's immunohistochemistry photograph (a real stained tissue section)."""
    data = pytest.importorskip("skimage.data")
    img = np.ascontiguousarray(data.immunohistochemistry())  # (512, 512, 3) uint8
    gx, gy = np.meshgrid(np.linspace(40, 472, n_side), np.linspace(40, 472, n_side))
    xy = np.c_[gx.ravel(), gy.ravel()]
    a = ad.AnnData(sp.csr_matrix((len(xy), 2), dtype=np.float32))
    a.obs_names = [f"t{i}" for i in range(len(xy))]
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"ihc": {"images": {"fullres": img},
                                "scalefactors": {"spot_diameter_fullres": 64.0, "tissue_hires_scalef": 1.0,
                                                 "tissue_lowres_scalef": 1.0},
                                "metadata": {"technology": "synthetic", "spot_diameter_um": 55.0}}}
    return a


def test_frozen_same_padding_is_exact(lite2):
    import copy

    m = copy.deepcopy(lite2.model)
    x = torch.rand(2, 3, 260, 260) * 2 - 1
    with torch.inference_mode():
        a = m(x)
        freeze_same_padding(m, 260)
        b = m(x)
    assert torch.equal(a, b)
    assert all(c.static_pad is not None for c in m.modules() if hasattr(c, "static_pad"))


@needs_ort
def test_onnxruntime_float32_equals_torch(lite2, tmp_path):
    a = _adata()
    kw = dict(cache=False, progress=False, precision="float32")
    stmorph.im.features(a, lite2, backend="torch", key_added="X_t", **kw)
    stmorph.im.features(a, lite2, backend="onnxruntime", key_added="X_o", **kw)
    np.testing.assert_allclose(a.obsm["X_o"], a.obsm["X_t"], atol=2e-4, rtol=1e-4)
    assert _cos(a.obsm["X_o"], a.obsm["X_t"]).min() > 0.99999
    assert a.uns["X_o"]["params"]["backend"] == "onnxruntime" and a.uns["X_t"]["params"]["backend"] == "torch"
    # auto picks ONNX Runtime on a CPU running float32
    assert _features.resolve_backend(torch.device("cpu"), "auto", "float32") == "onnxruntime"


@needs_ort
def test_asymmetric_same_padding_folds_into_conv():
    """TF "SAME" stride-2 paddings (asymmetric) end up in the Conv's own pads: no Pad node, same numbers."""
    import onnx
    import onnxruntime as ort

    from stmorph.im.encoders._layers import Conv2dSame

    torch.manual_seed(0)
    m = torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2), torch.nn.ReLU6(), Conv2dSame(8, 8, 5, stride=2, groups=8),
                            Conv2dSame(8, 4, 3, stride=1)).eval()
    data = _onnx.export_onnx(m, 32)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert "Pad" not in ops and ops.count("Conv") == 3
    conv = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "Conv"]
    pads = [next(a.ints for a in n.attribute if a.name == "pads") for n in conv]
    assert list(pads[0]) == [0, 0, 1, 1] and list(pads[1]) == [1, 1, 2, 2]  # TF pads the bottom/right more
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, m(x).numpy(), atol=1e-5, rtol=1e-4)


@needs_ort
@pytest.mark.parametrize("bgr", [False, True])
def test_runner_preprocess_equals_encoder_preprocess(bgr):
    """The ONNX runner's one-pass NCHW preprocessing gives the encoder's values bit for bit."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    enc = encoders.get_encoder(m, input_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    enc.bgr = bgr
    patches = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    got = _onnx.OrtRunner(enc).preprocess(patches)
    assert got.is_contiguous() and torch.equal(got, enc.preprocess(patches).contiguous())


@needs_ort
def test_int8_keeps_high_resolution_convs_float(lite2):
    """int8 leaves float the convolutions reading at least a quarter of the input side (Lite2: up to block 4's stride 2)."""
    names = _onnx.high_resolution_convs(_onnx.export_onnx(lite2.model, lite2.input_size), lite2.input_size)
    blocks = {n.split("/")[1] for n in names}
    assert names[0] == "/_conv_stem/Conv" and blocks == {"_conv_stem", "_blocks.0", "_blocks.1", "_blocks.2",
                                                         "_blocks.3", "_blocks.4"}, names
    assert "/_blocks.4/_depthwise_conv/Conv" in names  # reads the 65 px map (a quarter of 260)
    assert "/_blocks.4/_project_conv/Conv" not in names  # reads the 33 px map after block 4's stride 2


@needs_ort
@pytest.mark.slow
def test_int8_agrees_with_float32_on_tissue(lite2):
    """The quantised path: close to float32 features on a stained tissue image, and different (really int8)."""
    a = _tissue_adata(n_side=6)
    kw = dict(cache=False, progress=False)
    stmorph.im.features(a, lite2, backend="torch", precision="float32", key_added="X_fp32", **kw)
    stmorph.im.features(a, lite2, precision="int8", key_added="X_int8", **kw)
    c = _cos(a.obsm["X_int8"], a.obsm["X_fp32"])
    # all-int8 gave min 0.966 / mean 0.986 here; high-resolution layers kept float: 0.992 / 0.995
    assert c.mean() > 0.99 and c.min() > 0.985, (c.mean(), c.min())
    assert not np.allclose(a.obsm["X_int8"], a.obsm["X_fp32"], atol=1e-3)  # quantised, not a float32 run
    assert a.uns["X_int8"]["params"]["dtype"] == "int8"
    # the features still tell spots apart as float32 does: nearest neighbours mostly agree
    def nn(f):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        s = f @ f.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    assert (nn(a.obsm["X_int8"]) == nn(a.obsm["X_fp32"])).mean() > 0.6


def test_backend_options_checked():
    cpu = torch.device("cpu")
    with pytest.raises(InputError, match="backend must be one of"):
        _features.resolve_backend(cpu, "tensorrt", "float32")
    with pytest.raises(InputError, match="int8.*ONNX Runtime"):
        _features.resolve_backend(cpu, "torch", "int8")
    if _onnx.available():
        with pytest.raises(InputError, match="float32 or int8"):
            _features.resolve_backend(cpu, "onnxruntime", "bfloat16")
    assert _features.resolve_backend(cpu, "torch", "float32") == "torch"


class _LeavesTorch(torch.nn.Module):
    """A forward that goes through numpy: an ONNX trace would bake its first output in as a constant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).mean(dim=(2, 3))
        return torch.from_numpy(np.tanh(y.detach().numpy()))


@needs_ort
def test_unfaithful_export_falls_back_to_torch():
    torch.manual_seed(0)
    enc = encoders.get_encoder(_LeavesTorch(), input_size=16, name="numpy_inside")
    a = _adata()
    stmorph.im.features(a, enc, cache=False, progress=False, precision="float32", key_added="X_auto")
    assert a.uns["X_auto"]["params"]["backend"] == "torch"  # auto: checked, refused, PyTorch ran it
    stmorph.im.features(a, enc, cache=False, progress=False, precision="float32", backend="torch", key_added="X_t")
    np.testing.assert_allclose(a.obsm["X_auto"], a.obsm["X_t"], rtol=1e-6)
    with pytest.raises(InputError, match="could not run encoder .numpy_inside."):
        stmorph.im.features(a, enc, cache=False, progress=False, precision="float32", backend="onnxruntime")
