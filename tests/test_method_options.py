"""Every declared option against every method: taken (and applied) by the methods that declare it, refused with
one line by the others; never recorded and ignored."""

from __future__ import annotations

import json

import pytest

from stmorph import datasets
from stmorph.cli import main
from stmorph.errors import InputError
from stmorph.tl import _methods

#: A value, other than the defaults, for every declared option.
SAMPLES = {"n_clusters": 3, "cluster_method": "leiden", "resolution": 1.2, "n_neighbors": 12, "refine": True,
           "encoder": "efficientnet_lite2", "encoder_weights": "weights.pth", "patch": "1.5spot", "device": "cpu",
           "sigmas_um": (80.0,), "n_top_genes": 150, "hvg_flavor": "seurat", "image_weight": 0.5,
           "context_patch": "senca", "senca_epochs": 1, "senca_preset": "mixture"}
#: Where a method records an option it used: ``uns[method]["params"][key]``.
RECORDED = {"cluster_method": "method", "senca_epochs": "epochs", "senca_preset": "preset",
            "resolution": "resolution_requested"}


def test_every_option_has_a_sample():
    assert set(SAMPLES) == set(_methods.OPTIONS)  # a new option gets a value here, and so a check below


@pytest.mark.parametrize("option", sorted(SAMPLES))
def test_each_option_is_taken_by_its_methods_and_refused_by_the_others(option):
    for m in _methods.available_methods():
        given = {option: SAMPLES[option]}
        method = _methods.get_method(m)
        if option in _methods.OPTIONS and _methods.OPTIONS[option].applies is not None:
            given["cluster_method"] = "leiden"  # the graph's options apply to a graph clustering
            if "cluster_method" not in method.options:
                given.pop("cluster_method")
        if option in method.options:
            assert _methods.check_options([m], given)[m][option] == _methods.OPTIONS[option].value(SAMPLES[option])
        else:
            with pytest.raises(InputError, match=_methods.OPTIONS[option].cli_flag):
                _methods.check_options([m], given)


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    return datasets.write_visium(datasets.synthetic(150, n_genes=300, random_state=2), root / "outs")


def _flags(method: str) -> list[str]:
    out = []
    for name in _methods.get_method(method).options:
        if name in ("encoder_weights", "encoder"):  # a weights file of the embedded encoder is not at hand
            continue
        opt, v = _methods.OPTIONS[name], SAMPLES[name]
        if opt.negatable:
            out.append(opt.cli_flag if v else "--no-" + opt.cli_flag[2:])
        else:
            out += [opt.cli_flag, *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stmorph", "stmorph_expr", "expression", "image", "stmic", "senca"])
def test_each_method_applies_every_option_it_declares(method, section, tmp_path):
    out = tmp_path / "o"
    argv = ["run", str(section), "--image", str(section / "image.tif"), "--method", method, *_flags(method),
            "--out", str(out), "--quiet", "--no-plot"]
    if method == "stmic":  # the group: the method and its two baselines
        argv[argv.index("--method") + 1] = "stmic"
    assert main(argv) == 0
    info = json.loads((out / "run.json").read_text())
    used = info["method_params"][method]
    for name in _methods.get_method(method).options:
        if name in ("encoder", "encoder_weights", "patch", "device"):
            continue
        got = used.get(RECORDED.get(name, name))
        want = _methods.OPTIONS[name].value(SAMPLES[name])
        if name == "refine":
            assert got not in (None, "None"), used
        elif isinstance(want, tuple):
            assert [float(x) for x in got] == list(want), (name, got)
        else:
            assert got == want, (name, got, want)
    if "patch" in _methods.get_method(method).options:
        assert info["encoder"]["patch"] == "1.5spot" and info["encoder"]["device"] == "cpu"
