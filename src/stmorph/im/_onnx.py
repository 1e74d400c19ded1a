"""ONNX Runtime backend for CPU inference (optional: ``pip install onnxruntime onnx``).

The encoder's module is exported once per process for its fixed input size
(TensorFlow "SAME" paddings and the like become constants) and run by ONNX
Runtime's CPU provider, whose fused convolution kernels ran EfficientNet-Lite2's
forward 2.1x faster than PyTorch eager float32 on the same cores with the same
float32 features (whole ``features()`` call 2.2x; BENCHMARKS.md section 3b). ``int8``: static
post-training quantisation (per-channel int8 weights, uint8 activations,
min-max calibrated on patches of the slide itself; the high-resolution layers
stay float32), faster again but only approximately equal (see ``precision`` in
:func:`stmorph.im.features`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import threading
import warnings
from typing import Any

import numpy as np

from ..errors import DependencyError

__all__ = ["available", "OrtRunner", "export_onnx"]

_LOCK = threading.Lock()
_MEMO: dict[Any, dict[Any, Any]] = {}


def available() -> bool:
    """True when onnxruntime and onnx (for the export) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model, input_size: int, *, dynamic_size: bool = False) -> bytes:
    """ONNX bytes of ``model`` for inputs ``(B, 3, input_size, input_size)`` (batch dynamic; with ``dynamic_size``
    height and width too, valid for sizes whose TF "SAME" paddings equal ``input_size``'s, e.g. any multiple of
    the network's stride when ``input_size`` is one: the dense path exports a small size and runs large tiles)."""
    import torch

    from .encoders._layers import freeze_same_padding

    model = copy.deepcopy(model).eval().cpu().to(memory_format=torch.contiguous_format)
    freeze_same_padding(model, input_size)  # TF "SAME" paddings as constants: no shape arithmetic in the graph
    x = torch.zeros(2, 3, input_size, input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python-side shape arithmetic (constant here)
        torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes=({"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "hy", 3: "wy"}} if dynamic_size
                                        else {"x": {0: "b"}, "y": {0: "b"}}), opset_version=17, dynamo=False)
    return fuse_pad_conv(buf.getvalue())


def _constant_values(graph, names: list[str]) -> dict[str, np.ndarray]:
    """Values of the tensors ``names`` that depend on constants only (others are left out)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = {}
    for name in names:
        if name in inits:
            out[name] = numpy_helper.to_array(inits[name])
            continue
        nodes, used, todo, seen = [], set(), [name], set()
        while todo:  # the nodes computing ``name``, back to constants; a graph input rules it out
            t = todo.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in inits:
                used.add(t)
            elif t in producer:
                nodes.append(producer[t])
                todo.extend(producer[t].input)
            else:
                break
        else:
            order = {id(n): i for i, n in enumerate(graph.node)}
            nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])
            sub = helper.make_graph(nodes, "pads", [], [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)],
                                    initializer=[inits[u] for u in sorted(used)])
            model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 17)])
            out[name] = np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    return out


def fuse_pad_conv(onnx_bytes: bytes) -> bytes:
    """Fold each constant zero ``Pad`` of the spatial axes that only feeds a ``Conv`` into the Conv's ``pads``.

    TensorFlow "SAME" padding of a stride-2 convolution on an even size is
    asymmetric, which PyTorch (and so the export) writes as a separate ``Pad``;
    ONNX ``Conv`` takes asymmetric pads itself. In ONNX Runtime the separate
    ``Pad`` also forces its blocked-layout (NCHWc) graph back to NCHW and
    back around it: 18% of EfficientNet-Lite2's forward, removed here (the same
    numbers: the padded zeros are the ones the Conv would add).
    """
    import onnx
    from onnx import helper

    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    pads_nodes = [n for n in g.node if n.op_type == "Pad" and len(n.input) in (2, 3)
                  and all(helper.get_attribute_value(a) == b"constant" for a in n.attribute if a.name == "mode")
                  and n.output[0] not in outputs and len(consumers.get(n.output[0], [])) == 1
                  and consumers[n.output[0]][0].op_type == "Conv"]
    values = _constant_values(g, [i for n in pads_nodes for i in n.input[1:] if i])
    removed = []
    for n in pads_nodes:
        pads = values.get(n.input[1])
        value = values.get(n.input[2], np.zeros(1)) if len(n.input) == 3 and n.input[2] else np.zeros(1)
        conv = consumers[n.output[0]][0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if (pads is None or pads.shape != (8,) or pads[[0, 1, 4, 5]].any() or (pads < 0).any() or np.any(value != 0)
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"") or conv.input[0] != n.output[0]):
            continue
        old = list(attrs.get("pads", [0, 0, 0, 0]))
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = n.input[0]
        removed.append(n)
    if not removed:
        return onnx_bytes
    for n in removed:
        g.node.remove(n)
    while True:  # drop what computed the pads (nothing reads it any more)
        read = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet():
    """Silence onnxruntime.quantization's advice printed through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def high_resolution_convs(onnx_bytes: bytes, input_size: int, fraction: float = 0.25) -> list[str]:
    """Names of the ``Conv`` nodes whose input is at least ``fraction`` of the model input's side.

    These early, high-resolution layers are where int8 loses the most: in
    EfficientNet-Lite2 the stem's per-tensor activation range spans channels of
    very different scales, and the error they pass on grows through the
    network (keeping these 14 of its 64 convolutions float raised the minimum
    cosine to float32 features from 0.96 to 0.99 on HER2ST patches; docs/design-notes.md).
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(onnx_bytes))
    side = {}
    for v in list(model.graph.value_info) + list(model.graph.input):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value"):
            side[v.name] = dims[2].dim_value
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and side.get(n.input[0], 0) >= fraction * input_size]


def _quantize(onnx_bytes: bytes, calib: np.ndarray, keep_float: tuple[str, ...] | list[str] = ()) -> bytes:
    """Static int8 quantisation (QOperator, per-channel weights, min-max calibration on ``calib``).

    ``keep_float``: node names left in float32 (their inputs dequantised).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i: i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(onnx_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(keep_float))
        with open(dst, "rb") as f:
            return f.read()


class OrtRunner:
    """Callable like an :class:`~stmorph.im.encoders.Encoder` on a preprocessed batch, run by ONNX Runtime.

    One session shared by the inference streams (ONNX Runtime's ``run`` is
    thread-safe and releases the GIL), ``threads`` intra-op threads each.
    The exported model is memoised per process (by the encoder's weights hash, input size and precision).
    """

    def __init__(self, enc, *, threads: int = 1, precision: str = "float32", calib: np.ndarray | None = None):
        if not available():
            msg = "backend='onnxruntime' needs onnxruntime and onnx: pip install onnxruntime onnx"
            raise DependencyError(msg)
        import onnxruntime as ort

        self.enc = enc
        # exports are memoised per process by what identifies the weights (a file's or a state dict's hash)
        ident = (type(enc.model).__name__, enc.name, enc.weights_sha256) if enc.weights_sha256 else id(enc.model)
        memo: dict[Any, Any] = _MEMO.setdefault(ident, {})
        while len(_MEMO) > 4:
            _MEMO.pop(next(iter(_MEMO)))
        with _LOCK:
            key = (enc.input_size, "float32")
            if key not in memo:
                memo[key] = export_onnx(enc.model, enc.input_size)
            data = memo[key]
            if precision == "int8":
                if calib is None:
                    raise ValueError("int8 needs calibration inputs")
                qkey = (enc.input_size, "int8", hash(calib.tobytes()))
                if qkey not in memo:
                    memo[qkey] = _quantize(data, calib, keep_float=high_resolution_convs(data, enc.input_size))
                data = memo[qkey]
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        if precision == "float32" and not memo.get(("checked", key)):
            self._check()
            memo[("checked", key)] = True

    def _check(self) -> None:
        """The export must compute what the module computes (a forward that leaves torch would be baked in)."""
        import torch

        rng = np.random.default_rng(0)
        s = self.enc.input_size
        x = self.enc.preprocess(rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8)).cpu()
        with torch.inference_mode():
            want = self.enc(x.to(self.enc.device)).float().cpu().numpy()
        got = self(x).numpy()
        scale = float(np.abs(want).max()) or 1.0
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
            err = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
            msg = f"the ONNX export of encoder {self.enc.name!r} differs from the module (max abs error {err:.3g})"
            raise RuntimeError(msg)

    def preprocess(self, patches: np.ndarray):
        """What ``enc.preprocess`` gives (the same float32 values), as a contiguous NCHW tensor made in one pass.

        ONNX Runtime needs NCHW contiguous input; the encoder's own
        channels_last tensor would be copied again.
        """
        import torch

        patches = np.asarray(patches)
        if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
            return self.enc.preprocess(patches)  # its own error message
        scale, shift = (t.cpu().numpy().reshape(3) for t in self.enc._scale_shift())
        b, h, w, _ = patches.shape
        out = np.empty((b, 3, h, w), np.float32)
        for c in range(3):
            src = patches[..., 2 - c if self.enc.bgr else c]
            np.multiply(src, scale[c], out=out[:, c], casting="unsafe")
            out[:, c] += shift[c]
        return torch.from_numpy(out)

    def __call__(self, x):
        import torch

        y = self.session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy())})[0]
        if y.ndim == 4:
            y = y.mean(axis=(2, 3), dtype=np.float32)
        return torch.from_numpy(np.asarray(y, np.float32).reshape(y.shape[0], -1))
