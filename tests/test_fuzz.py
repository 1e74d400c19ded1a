"""Fuzzing the command line: files of every kind ``stmorph run`` and ``stmorph cohort`` read (counts tables, spot
files, PNG/JPEG/TIFF images, the Visium folder, cohort manifests), damaged at random, and the options of
``stmorph run`` drawn at random. Whatever is drawn, the command either succeeds (printing nothing with
``--quiet``) or exits non-zero with ONE line on stderr naming the file or the option, in the command line's
words (its flags, not Python keywords), and never a traceback; it writes nothing outside ``--out`` and leaves
every file the user had as it was (compared by content hash).

Every defect found by these tests is kept as an ``@example`` of the test that found it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

from stmorph import datasets  # noqa: E402
from stmorph.cli import main  # noqa: E402


def fuzz(n: int):
    """``n`` reproducible examples, not shrunk (each runs the command): the file stays near a minute on two cores.
    ``$STMORPH_FUZZ_EXAMPLES`` sets another number for every test (a longer search)."""
    return settings(max_examples=int(os.environ.get("STMORPH_FUZZ_EXAMPLES", n)), deadline=None, derandomize=True,
                    database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


#: Python keywords a command-line message must not tell the user to pass (``--force``, not ``force=True``).
PYTHON_HINT = re.compile(r"\b(force|in_tissue_only|pixel_scale|image|patch|device|weights|encoder_weights|n_clusters|"
                         r"sigmas_um|random_state|bin_size|labels|spots)=")


# --------------------------------------------------------------------------- the user's files and the run


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``root`` (``skip`` and what lies under it left out): file -> SHA-256, folder -> "dir"."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def printed_warnings():
    """Warnings printed on stderr, as on the command line (pytest would record them instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        yield


def cli(argv: list[str], root: Path, out: str, names: list[str]) -> tuple[int, list[str]]:
    """Run ``stmorph ARGV`` in this process, in folder ``root``, and check the promises; returns
    ``(exit code, stderr lines)``.

    ``out``: the ``--out`` given, the only place under ``root`` that may change (nothing may, when it is
    ``root`` itself or lies outside it); ``names``: what a failure's line may name (the files and options
    involved)."""
    target = (root / os.path.expanduser(out)).resolve()
    skip = target if root.resolve() in target.parents else None
    before = tree(root, skip=skip)
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), printed_warnings():
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse's errors
                rc = exc.code
    finally:
        os.chdir(cwd)
    text = err.getvalue()
    lines = text.strip().splitlines()
    assert "Traceback" not in text, text
    assert tree(root, skip=skip) == before, "something outside --out changed"
    if rc == 0:
        assert text == "", f"--quiet printed: {text!r}"
    else:
        assert len(lines) == 1, text
        # argparse reads a value such as -3.4e+38 as an unknown option, and its one line names that value
        quoted = lines[0].partition("unrecognized arguments: ")[2].split(" (see")[0].split()
        assert any(n in lines[0] for n in names) or (quoted and set(quoted) <= set(argv)), (lines[0], names)
        assert not PYTHON_HINT.search(lines[0]), lines[0]
    return rc, lines


# --------------------------------------------------------------------------- inputs: small, written once


GENES = [f"G{i}" for i in range(12)]


def write_legacy(root: Path, nx: int = 7, ny: int = 6, seed: int = 0) -> dict[str, Path]:
    """A legacy ST section: counts (spots x genes), spot selection, labels and a small PNG of the H&E."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = (a.ravel() for a in np.meshgrid(np.arange(1, 1 + nx), np.arange(1, 1 + ny)))
    ids = [f"{a}x{b}" for a, b in zip(xs, ys)]
    counts = rng.poisson(4.0, size=(len(ids), len(GENES)))
    counts[: len(ids) // 2, :4] += 12  # two halves that differ
    pd.DataFrame(counts, index=ids, columns=GENES).to_csv(root / "S1.tsv", sep="\t")
    sel = pd.DataFrame({"x": xs, "y": ys, "new_x": xs, "new_y": ys, "pixel_x": 20.0 + (xs - 1) * 40.0,
                        "pixel_y": 20.0 + (ys - 1) * 40.0, "selected": 1})
    sel.to_csv(root / "S1_selection.tsv", sep="\t", index=False)
    pd.DataFrame({"x": xs + 0.1, "y": ys - 0.1, "label": np.where(np.arange(len(ids)) < len(ids) // 2, "a", "b")}
                 ).to_csv(root / "S1_labeled_coordinates.tsv", sep="\t", index=False)
    from PIL import Image

    img = rng.integers(120, 255, size=(40 * ny, 40 * nx, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "S1.png")
    Image.fromarray(img).save(root / "S1.jpg", quality=90)
    import tifffile

    tifffile.imwrite(root / "S1.tif", img, tile=(64, 64))
    return {"counts": root / "S1.tsv", "spots": root / "S1_selection.tsv",
            "labels": root / "S1_labeled_coordinates.tsv", "png": root / "S1.png", "jpg": root / "S1.jpg",
            "tif": root / "S1.tif"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The pristine inputs, copied into each example's own folder (so no example sees another's damage)."""
    root = tmp_path_factory.mktemp("fuzz-sources")
    legacy = write_legacy(root / "legacy")
    tissue = datasets.synthetic(80, n_genes=250, random_state=3)
    visium = datasets.write_visium(tissue, root / "visium" / "outs", fullres="image.tif", positions="csv")
    return {"legacy": legacy, "visium": visium}


@contextlib.contextmanager
def workspace(tmp_path_factory, sources, *which: str):
    """A fresh folder holding copies of the inputs ``which`` (``"legacy"``, ``"visium"``)."""
    root = tmp_path_factory.mktemp("ex")
    for w in which:
        src = sources[w]
        folder = (src["counts"].parent if w == "legacy" else src.parent)
        shutil.copytree(folder, root / w)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


FAST = ["--quiet", "--no-plot"]


# --------------------------------------------------------------------------- the options of stmorph run


words = hs.one_of(
    hs.integers(-(2**70), 2**70).map(str),
    hs.floats(allow_nan=True, allow_infinity=True).map(repr),
    hs.sampled_from(["", " ", "-1", "0", "1", "2", "3", "1e12", "1e308", "1e400", "nan", "-inf", "0x10", "1_000",
                     "2**70", "4294967296", "1.5", "abc", "--quiet", "-", "٣"]),
)
seeds = hs.one_of(hs.sampled_from(["-1", str(2**70), str(2**32), str(2**32 - 1), "0", "7", "1.0", "1e3", "x"]), words)
n_clusters = hs.one_of(hs.sampled_from(["1", "2", "3", "0", "-2", "80", "79", "1000", "2.0", "2.5"]), words)
sigmas = hs.lists(hs.one_of(hs.sampled_from(["1e12", "0", "50", "200", "1e-300", "1e4", "10001"]), words),
                  min_size=1, max_size=3)
out_names = hs.one_of(
    hs.sampled_from(["res", "a b", "x" * 300, "x" * 240, ".", "..", "", "visium", "visium/outs", "visium/outs/res",
                     "legacy", "sub/res", "res\nnext", "-res", "~nobody/res", "r\u00e9s", "visium/outs/spatial",
                     ".res.tmp-mine", "res/"]),
    hs.text(hs.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=12),
)


good = {"seed": hs.integers(0, 2**32 - 1).map(str), "k": hs.none() | hs.integers(2, 12).map(str),
        "sig": hs.none() | hs.lists(hs.floats(1, 400).map(lambda v: f"{v:g}"), min_size=1, max_size=2),
        "out": hs.sampled_from(["res", "sub/res", "a b", "r\u00e9s", "x" * 200])}
bad = {"seed": seeds, "k": n_clusters, "sig": sigmas, "out": out_names}


@fuzz(14)
@given(values=hs.fixed_dictionaries(good), worse=hs.fixed_dictionaries(bad),
       which=hs.sampled_from([None, "seed", "k", "sig", "out"]),
       method=hs.sampled_from(["expression", "stmorph_expr"]), force=hs.booleans())
@example(values={"seed": "0", "k": None, "sig": None, "out": "res"}, worse={"seed": "-1"}, which="seed",
         method="expression", force=False)
@example(values={"seed": "0", "k": None, "sig": None, "out": "res"}, worse={"seed": str(2**70)}, which="seed",
         method="expression", force=False)
@example(values={"seed": "0", "k": None, "sig": None, "out": "res"}, worse={"sig": ["1e12"]}, which="sig",
         method="stmorph_expr", force=False)
@example(values={"seed": "0", "k": None, "sig": None, "out": "res"}, worse={"k": "1"}, which="k",
         method="expression", force=False)
@example(values={"seed": "0", "k": None, "sig": None, "out": "res"}, worse={"sig": ["-3.402823466e+38"]},
         which="sig", method="stmorph_expr", force=False)  # argparse takes it for an option
def test_run_options(tmp_path_factory, sources, values, worse, which, method, force):
    """Each example gives one option (``which``) a hostile value and the others ordinary ones."""
    v = {**values, **({which: worse[which]} if which else {})}
    if method == "expression" and which != "sig":
        v["sig"] = None  # the expression baseline has no --sigma-um (refused, when it is the option drawn)
    with workspace(tmp_path_factory, sources, "visium") as root:
        (root / "mine").mkdir()
        (root / "mine" / "notes.txt").write_text("the user's")
        (root / "sub").mkdir()
        argv = ["run", str(root / "visium" / "outs"), "--method", method, "--seed", v["seed"], "--out", v["out"],
                *FAST, *(["--n-clusters", v["k"]] if v["k"] is not None else []),
                *(["--sigma-um", *v["sig"]] if v["sig"] else []), *(["--force"] if force else [])]
        rc, err = cli(argv, root, v["out"], ["--seed", "--n-clusters", "--sigma-um", "--out", "--method",
                                             "output", "outs", str(root)])
        if which == "seed" and worse["seed"] in ("-1", str(2**70)):  # before: a traceback after all the work
            assert rc == 2 and "--seed" in err[0]
        if which == "k" and worse["k"] == "1":  # before: "one spot per domain is not a result"
            assert rc == 2 and "--n-clusters: must be at least 2" in err[0]
        if which == "sig" and worse["sig"] == ["1e12"]:  # before: MemoryError
            assert rc == 2 and "--sigma-um" in err[0]
        if which is None and method == "stmorph_expr" and v["out"] != "x" * 200:
            assert rc == 0


patches = hs.one_of(
    hs.sampled_from(["1000000", "99999999um", "15000", "1e308", "1e400", "0", "0.4", "-5", "spot", "0.01spot",
                     "1e9spot", "64", "2.5spacing", "100um", "nanum", "infpx", "55 um", "224px", "1e-9um"]),
    hs.integers(-10, 400).map(str),
    hs.tuples(hs.floats(0, 20, allow_nan=False), hs.sampled_from(["spot", "spacing"])).map(lambda t: f"{t[0]:g}{t[1]}"),
    hs.tuples(hs.floats(0, 1e9, allow_nan=False), hs.sampled_from(["", "px", "um", "µm"])
              ).map(lambda t: f"{t[0]:g}{t[1]}"),
)


@fuzz(10)
@given(patch=patches)
@example(patch="1000000")  # MemoryError allocating the patch
@example(patch="99999999um")  # MemoryError
@example(patch="1e308")  # OverflowError placing the patch
@example(patch="15000")  # ran for minutes
def test_run_patch(tmp_path_factory, sources, patch):
    """``--patch`` on the image method; the patch is refused before features when it cannot make sense."""
    with workspace(tmp_path_factory, sources, "legacy") as root:
        f = {k: root / "legacy" / v.name for k, v in sources["legacy"].items()}
        argv = ["run", str(f["counts"]), "--spots", str(f["spots"]), "--image", str(f["png"]), "--method", "image",
                "--n-clusters", "2", "--patch", patch, "--out", "o", *FAST]
        rc, err = cli(argv, root, "o", ["--patch"])
        if patch in ("1000000", "99999999um", "1e308", "15000"):
            assert rc == 2 and "wider than the whole" in err[0]


# --------------------------------------------------------------------------- counts tables and spot files


cells = hs.one_of(
    hs.integers(-3, 60).map(str), hs.floats(allow_nan=True, allow_infinity=True).map(str),
    hs.sampled_from(["", "NA", "nan", "x", "1x2", "1e30", "1e8", "-0", "0.5", " 3", '"4"', "\t", "1,5", "3x3",
                     "\u00e9", "\ufeff1"]),
)


def damage_table(path: Path, edits, sep: str = "\t") -> None:
    """Overwrite some cells (row, column, text) of a delimited file, drop or cut lines."""
    lines = path.read_text().split("\n")
    for row, col, text in edits:
        if text == "<drop line>":
            if len(lines) > 1:
                del lines[row % len(lines)]
            continue
        i = row % len(lines)
        fields = lines[i].split(sep)
        if text == "<cut line>":
            fields = fields[: max(1, col % max(1, len(fields)))]
        else:
            fields[col % len(fields)] = text
        lines[i] = sep.join(fields)
    path.write_text("\n".join(lines))


edits = hs.lists(hs.tuples(hs.integers(0, 60), hs.integers(0, 12),
                           hs.one_of(cells, hs.sampled_from(["<drop line>", "<cut line>"]))), min_size=1, max_size=5)


@fuzz(40)
@given(which=hs.sampled_from(["counts", "spots", "labels"]), edits=edits, gz=hs.booleans())
@example(which="spots", edits=[(1, 6, "1e30")], gz=False)  # was read as -9223372036854775808
def test_legacy_tables(tmp_path_factory, sources, which, edits, gz):
    with workspace(tmp_path_factory, sources, "legacy") as root:
        f = {k: root / "legacy" / v.name for k, v in sources["legacy"].items()}
        damage_table(f[which], edits)
        if gz and which == "counts":
            import gzip

            zipped = f["counts"].with_name("S1.tsv.gz")
            zipped.write_bytes(gzip.compress(f["counts"].read_bytes()))
            f["counts"].unlink()
            f["counts"] = zipped
        argv = ["run", str(f["counts"]), "--spots", str(f["spots"]), "--labels", str(f["labels"]),
                "--method", "expression", "--n-clusters", "2", "--out", "o", *FAST]
        rc, err = cli(argv, root, "o", [f[k].name for k in ("counts", "spots", "labels")])
        if edits == [(1, 6, "1e30")]:
            assert rc == 2 and "'selected' must hold whole numbers (of at most 2**53); found 1e+30" in err[0]


@fuzz(30)
@given(data=hs.binary(max_size=300), which=hs.sampled_from(["counts", "spots", "labels"]),
       how=hs.sampled_from(["replace", "append", "prefix", "truncate"]))
@example(data=b"neK\x04\x8cq\xc0\xe8}\x1d\xec3\x97+\x07\x8f?\xf1N", which="labels", how="truncate")  # --quiet
def test_legacy_tables_bytes(tmp_path_factory, sources, data, which, how):
    """Arbitrary bytes in or instead of a table (binary junk, other encodings, a cut file)."""
    with workspace(tmp_path_factory, sources, "legacy") as root:
        f = {k: root / "legacy" / v.name for k, v in sources["legacy"].items()}
        raw = f[which].read_bytes()
        new = {"replace": data, "append": raw + data, "prefix": data + raw,
               "truncate": raw[: len(data) % max(1, len(raw))]}[how]
        f[which].write_bytes(new)
        argv = ["run", str(f["counts"]), "--spots", str(f["spots"]), "--labels", str(f["labels"]),
                "--method", "expression", "--n-clusters", "2", "--out", "o", *FAST]
        cli(argv, root, "o", [f[k].name for k in ("counts", "spots", "labels")])


# --------------------------------------------------------------------------- images


def png_claiming(raw: bytes, width: int, height: int) -> bytes:
    """A PNG whose header (IHDR, with a valid CRC) claims ``width`` x ``height``."""
    assert raw[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + raw[24:29]
    return raw[:8] + raw[8:12] + body + struct.pack(">I", zlib.crc32(body)) + raw[33:]


def jpeg_claiming(raw: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    i = raw.index(b"\xff\xc0")
    return raw[: i + 5] + struct.pack(">HH", height, width) + raw[i + 9:]


def tiff_claiming(raw: bytes, width: int, height: int) -> bytes:
    """A TIFF whose first page's ImageWidth and ImageLength tags claim ``width`` x ``height``."""
    import tifffile

    out = bytearray(raw)
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        tags = tif.pages[0].tags
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            tag = tags[name]
            fmt = tif.byteorder + {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
            out[tag.valueoffset: tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(out)


def damage_bytes(raw: bytes, how: str, at: int, data: bytes) -> bytes:
    at = at % max(1, len(raw))
    if how == "truncate":
        return raw[:at]
    if how == "overwrite":
        return raw[:at] + data + raw[at + len(data):]
    if how == "insert":
        return raw[:at] + data + raw[at:]
    return data


@fuzz(40)
@given(fmt=hs.sampled_from(["png", "jpg", "tif"]),
       how=hs.sampled_from(["truncate", "overwrite", "insert", "replace", "claim"]),
       at=hs.integers(0, 10**6), data=hs.binary(min_size=1, max_size=40),
       claim=hs.tuples(hs.sampled_from([1, 2, 300, 40000, 65535]), hs.sampled_from([1, 240, 40000, 65535])))
@example(fmt="jpg", how="claim", at=0, data=b"x", claim=(40000, 40000))  # the 633-byte JPEG bomb
@example(fmt="png", how="claim", at=0, data=b"x", claim=(40000, 40000))
@example(fmt="tif", how="claim", at=0, data=b"x", claim=(40000, 40000))
@example(fmt="png", how="truncate", at=200, data=b"x", claim=(1, 1))
@example(fmt="tif", how="overwrite", at=193, data=b"D.", claim=(1, 1))  # IndexError: more tiles than listed
def test_images(tmp_path_factory, sources, monkeypatch, fmt, how, at, data, claim):
    """A damaged or lying PNG/JPEG/TIFF given with --image: read, or refused in one line naming it."""
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", "256M")  # bombs are refused, not decoded, on any machine
    with workspace(tmp_path_factory, sources, "legacy") as root:
        f = {k: root / "legacy" / v.name for k, v in sources["legacy"].items()}
        raw = f[fmt].read_bytes()
        if how == "claim":
            new = {"png": png_claiming, "jpg": jpeg_claiming, "tif": tiff_claiming}[fmt](raw, *claim)
        else:
            new = damage_bytes(raw, how, at, data)
        f[fmt].write_bytes(new)
        argv = ["run", str(f["counts"]), "--spots", str(f["spots"]), "--image", str(f[fmt]),
                "--method", "expression", "--n-clusters", "2", "--out", "o", *FAST]
        cli(argv, root, "o", [f[fmt].name])


# --------------------------------------------------------------------------- the Visium folder


VISIUM_FILES = ["filtered_feature_bc_matrix.h5", "spatial/tissue_positions.csv", "spatial/scalefactors_json.json",
                "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png", "labels.tsv", "image.tif"]
scale_values = hs.one_of(hs.sampled_from([0, -1, 1e9, 1e-9, 1e308, "x", None, [], {}, True]),
                         hs.floats(allow_nan=True, allow_infinity=True))


@fuzz(30)
@given(ops=hs.lists(hs.tuples(hs.sampled_from(VISIUM_FILES),
                              hs.sampled_from(["delete", "truncate", "junk", "folder", "empty", "cells"]),
                              hs.integers(0, 10**6), hs.binary(max_size=30)), min_size=1, max_size=3),
       scale=hs.none() | hs.dictionaries(hs.sampled_from(["spot_diameter_fullres", "tissue_hires_scalef",
                                                          "tissue_lowres_scalef", "microns_per_pixel"]),
                                         scale_values, min_size=1, max_size=2),
       with_image=hs.booleans())
@example(ops=[("labels.tsv", "cells", 0, b"")], scale={"spot_diameter_fullres": 1e9}, with_image=False)
@example(ops=[("labels.tsv", "truncate", 46, b"")], scale=None, with_image=False)  # --quiet printed ARI's warning
def test_visium_folder(tmp_path_factory, sources, monkeypatch, ops, scale, with_image):
    monkeypatch.setenv("STMORPH_MAX_DECODE_BYTES", "256M")
    with workspace(tmp_path_factory, sources, "visium") as root:
        outs = root / "visium" / "outs"
        for name, how, at, data in ops:
            p = outs / name
            if not p.is_file():
                continue
            raw = p.read_bytes()
            if how == "delete":
                p.unlink()
            elif how == "truncate":
                p.write_bytes(raw[: at % max(1, len(raw))])
            elif how == "junk":
                p.write_bytes(damage_bytes(raw, "overwrite", at, data or b"\xff"))
            elif how == "folder":
                p.unlink()
                p.mkdir()
            elif how == "empty":
                p.write_bytes(b"")
            elif p.suffix in (".csv", ".tsv"):
                sep = "," if p.suffix == ".csv" else "\t"
                damage_table(p, [(at, at // 7, data.decode("latin-1").replace("\n", " ")[:8])], sep)
        sf = outs / "spatial" / "scalefactors_json.json"
        if scale is not None and sf.is_file():
            import json

            try:
                values = json.loads(sf.read_text())
            except (OSError, ValueError):
                values = {}
            if isinstance(values, dict):
                values.update(scale)
                sf.write_text(json.dumps(values))
        argv = ["run", str(outs), "--method", "expression", "--n-clusters", "3", "--out", "o", *FAST,
                *(["--image", str(outs / "image.tif")] if with_image else [])]
        cli(argv, root, "o", [str(outs)])


# --------------------------------------------------------------------------- cohort manifests


class _ClusterWouldStart(Exception):
    """The manifest passed every check made before any work: the cohort would start its dask cluster here."""


columns = hs.sampled_from(["section", "input", "method", "n_clusters", "seed", "image", "spots", "labels", "patch",
                           "no_plot", "refine", "out", "force", "colour", "sigma_um", "pixel_scale", "weights",
                           " input", "Section", "n-clusters", ""])
manifest_cells = hs.one_of(
    cells, hs.sampled_from(["legacy/S1.tsv", "visium/outs", "../visium/outs", "/nonexistent", "A", "B", "../up",
                            ".hidden", "expression", "stmorph+expression", "true", "maybe", "auto", "cohort.csv",
                            "legacy/S1_selection.tsv", "legacy/S1.png", "a,b", '"q"']),
)


plausible = {"section": hs.sampled_from(["A", "B", "s.1", "../up", ".hidden", "cohort.csv", "", "A b"]),
             "input": hs.sampled_from(["visium/outs", "legacy/S1.tsv", "../visium/outs", "/nonexistent", "", "."]),
             "spots": hs.sampled_from(["legacy/S1_selection.tsv", "", "visium/outs", "nope.tsv"]),
             "method": hs.sampled_from(["expression", "stmorph+expression", "image", "x", ""]),
             "n_clusters": hs.sampled_from(["2", "3", "1", "many", "", "1e400"])}


@hs.composite
def manifests(draw):
    """A manifest's rows: usually a header with section and input and cells that mostly make sense."""
    odd = draw(hs.lists(columns, max_size=3))  # unknown, refused, repeated or misspelt columns too
    extra = draw(hs.lists(hs.sampled_from(["seed", "patch", "no_plot", "refine", "labels", "image", "pixel_scale",
                                           "sigma_um", "weights"]), unique=True, max_size=3))
    header = draw(hs.sampled_from([["section", "input", *extra], ["section", "input", "spots", "method", "n_clusters",
                                                                   *extra], ["section", "input", *odd], odd]))
    rows = []
    for _ in range(draw(hs.integers(0, 3))):
        row = [draw(plausible[h] if h in plausible and draw(hs.booleans()) else manifest_cells) for h in header]
        if draw(hs.integers(0, 5)) == 0:
            row = row[:-1] if row and draw(hs.booleans()) else [*row, "extra"]
        rows.append(row)
    return [header, *rows]


VALID = [["section", "input", "spots", "method", "n_clusters"], ["A", "visium/outs", "", "expression", "3"],
         ["B", "legacy/S1.tsv", "legacy/S1_selection.tsv", "expression", "2"]]


@fuzz(40)
@given(table=manifests(), raw=hs.sampled_from([None] * 4) | hs.binary(max_size=60))
@example(table=[["section", "input", "image"], ["A", "visium/outs", "/nonexistent"]], raw=None)
@example(table=VALID, raw=None)
def test_cohort_manifest(tmp_path_factory, sources, monkeypatch, table, raw):
    import csv

    import stmorph.cohort

    def no_cluster(*args, **kwargs):
        raise _ClusterWouldStart

    monkeypatch.setattr(stmorph.cohort, "make_client", no_cluster)
    with workspace(tmp_path_factory, sources, "legacy", "visium") as root:
        manifest = root / "manifest.csv"
        if raw is not None:
            manifest.write_bytes(raw)
        else:
            with open(manifest, "w", newline="") as fh:
                csv.writer(fh).writerows(table)
        argv = ["cohort", str(manifest), "--out", "cohort", "--quiet"]
        try:
            cli(argv, root, "cohort", ["manifest.csv", "--out", str(root)])
        except _ClusterWouldStart:
            assert not (root / "cohort").exists()  # nothing made before the cluster starts
        else:
            assert table != VALID or raw is not None, "a valid manifest was refused"


# --------------------------------------------------------------------------- cases of issue 30, one each


def test_spot_diameter_of_1e9_is_one_line(tmp_path_factory, sources):
    """A ``spot_diameter_fullres`` of 1e9 with the image methods: before, a MemoryError cutting the patches."""
    import json

    with workspace(tmp_path_factory, sources, "visium") as root:
        outs = root / "visium" / "outs"
        sf = outs / "spatial" / "scalefactors_json.json"
        sf.write_text(json.dumps({**json.loads(sf.read_text()), "spot_diameter_fullres": 1e9}))
        rc, err = cli(["run", str(outs), "--image", str(outs / "image.tif"), "--method", "stmorph", "--out", "o",
                       *FAST], root, "o", ["image.tif"])
        assert rc == 2 and "spot_diameter_fullres" in err[0] and "wider than the whole" in err[0]


@pytest.mark.parametrize("case", ["none selected", "auto without scalefactors", "spots outside", "out exists",
                                  "image method without image"])
def test_messages_name_the_flags(tmp_path_factory, sources, case):
    """Before: ``pass in_tissue_only=False``, ``pass pixel_scale=...``, ``--force (force=True)``, ``image=/--image``."""
    with workspace(tmp_path_factory, sources, "legacy") as root:
        f = {k: root / "legacy" / v.name for k, v in sources["legacy"].items()}
        extra = []
        if case == "none selected":
            sel = pd.read_csv(f["spots"], sep="\t")
            sel.assign(selected=0).to_csv(f["spots"], sep="\t", index=False)
        elif case == "auto without scalefactors":
            extra = ["--image", str(f["png"]), "--pixel-scale", "auto"]
        elif case == "spots outside":
            extra = ["--image", str(f["png"]), "--pixel-scale", "3"]
        elif case == "out exists":
            (root / "o").mkdir()
        method = "image" if case == "image method without image" else "expression"
        rc, err = cli(["run", str(f["counts"]), "--spots", str(f["spots"]), "--method", method, "--n-clusters", "2",
                       "--out", "o", *FAST, *extra], root, "o" if case != "out exists" else "nowhere", ["legacy", "o"])
        assert rc == 2
        expected = {"none selected": "the command line reads the selected spots only",
                    "auto without scalefactors": "--pixel-scale auto looks for scalefactors.json",
                    "spots outside": "--pixel-scale 3; if the image is a rescaled rendering",
                    "out exists": "pass --force to replace it", "image method without image": "give one with --image"}
        assert expected[case] in err[0], err[0]


def test_quiet_hides_reader_warnings(tmp_path_factory, sources):
    """Before: ``--quiet`` hid the methods' warnings but printed the readers' (here: a spot with no counts)."""
    with workspace(tmp_path_factory, sources, "legacy") as root:
        f = {k: root / "legacy" / v.name for k, v in sources["legacy"].items()}
        counts = pd.read_csv(f["counts"], sep="\t", index_col=0)
        counts.iloc[0] = 0
        counts.to_csv(f["counts"], sep="\t")
        argv = ["run", str(f["counts"]), "--spots", str(f["spots"]), "--method", "expression", "--n-clusters", "2",
                "--no-plot"]
        rc, _ = cli([*argv, "--out", "o", "--quiet"], root, "o", [])  # checks that nothing is printed
        assert rc == 0
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), printed_warnings():
            assert main([*argv, "--out", str(root / "loud")]) == 0
        assert "zero counts" in err.getvalue()
