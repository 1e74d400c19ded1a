"""A weights file holding Python objects is refused in one line that never suggests weights_only=False."""

import pytest

torch = pytest.importorskip("torch")

from stmorph.cli import main  # noqa: E402
from stmorph.errors import DependencyError  # noqa: E402
from stmorph.im.encoders._registry import load_state_dict  # noqa: E402


class _Evil:
    def __reduce__(self):
        return (print, ("this must never be printed",))


@pytest.mark.parametrize("content", ["pickle", "garbage"])
def test_unsafe_or_broken_weights_refused_in_one_line(tmp_path, content, capsys):
    path = tmp_path / "weights.pth"
    if content == "pickle":
        torch.save({"conv.weight": torch.zeros(2), "x": _Evil()}, path)
    else:
        path.write_bytes(b"\x80\x02not a checkpoint at all" * 3)
    with pytest.raises(DependencyError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "weights_only" not in msg
    assert ("refused" in msg) == (content == "pickle")
    assert "never be printed" not in capsys.readouterr().out
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cli_refuses_unsafe_weights_in_one_line(tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save({"x": _Evil()}, path)
    rc = main(["demo", "--out", str(tmp_path / "o"), "--n-spots", "60", "--method", "image", "--encoder", "resnet50",
               "--weights", str(path), "--quiet", "--no-plot"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "refused" in err[0] and "weights_only" not in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("encoder", ["resnet50", "efficientnet_lite2"])
def test_weights_with_the_right_keys_but_other_shapes_refused_in_one_line(tmp_path, encoder, capsys):
    """Another variant of the network (same names, other widths): one line, not load_state_dict's RuntimeError."""
    if encoder == "resnet50":
        from stmorph.im.encoders.resnet import ResNet50

        sd = ResNet50(include_top=False).state_dict()
        key = "layer1.0.conv1.weight"
    else:
        from stmorph.im.encoders.efficientnet_lite import EfficientNetLite

        sd = EfficientNetLite().state_dict()
        key = next(k for k, v in sd.items() if v.ndim == 4)
    sd[key] = torch.zeros(*(n + 1 for n in sd[key].shape))
    path = tmp_path / f"{encoder}-variant.pth"
    torch.save(sd, path)
    rc = main(["demo", "--out", str(tmp_path / "o"), "--n-spots", "60", "--method", "image", "--encoder", encoder,
               "--weights", str(path), "--quiet", "--no-plot"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(path) in err[0] and key in err[0] and "do not fit the network" in err[0]
    assert not (tmp_path / "o").exists()
