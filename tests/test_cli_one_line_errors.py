"""Bad options and unwritable outputs give one line on stderr and exit 2, never a traceback."""

import os

import pytest

from stmorph._outputs import atomic_dir
from stmorph.cli import main
from stmorph.errors import OutputError


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc"])
def test_resolution_must_be_positive(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--resolution", value])
    assert info.value.code == 2
    err = _err(capsys)
    assert len(err) == 1 and "--resolution: " in err[0]
    assert ("expected a number" if value == "abc" else "must be a positive number") in err[0]


def test_out_below_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main(["demo", "--out", str(tmp_path / "afile" / "o"), "--quiet"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1 and "is a file" in err[0]


def test_out_that_cannot_be_created(tmp_path, capsys):
    rc = main(["demo", "--out", "/proc/stmorph-no-such/o", "--quiet"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1 and "/proc/stmorph-no-such/o" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rc = main(["demo", "--out", str(ro / "o"), "--quiet"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1 and "permission" in err[0]


def test_disk_full_while_writing_is_one_line(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(OutputError, match="(?i)no space left"):
        with atomic_dir(out) as tmp:
            raise OSError(28, "No space left on device", str(tmp / "result.h5ad"))
    assert not out.exists() and list(tmp_path.iterdir()) == []
