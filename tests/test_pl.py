"""Tests of stmorph.pl: colour matching, domain panels, spatial genes, dot plot, GSEA bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_ev import REGIONS, toy_tissue

from stmorph import pl
from stmorph.errors import InputError


def _permuted(adata, key, perm):
    """obs[key] = annotation relabelled through ``perm`` (region -> cluster id)."""
    adata.obs[key] = pd.Categorical(adata.obs["annotation"].map(perm).astype(str))


def test_match_labels_hungarian():
    ref = pd.Series(list("aaabbbccc"), index=[f"s{i}" for i in range(9)])
    lab = pd.Series(list("221000111"), index=ref.index)
    # a -> 2 (2 spots), b -> 0 (3 spots), c -> 1 (3 spots); "1" also overlaps "a" once
    assert pl.match_labels(ref, lab) == {"2": "a", "0": "b", "1": "c"}
    # joined by name: shuffled order gives the same answer
    assert pl.match_labels(ref.iloc[::-1], lab.sample(frac=1, random_state=0)) == {"2": "a", "0": "b", "1": "c"}


def test_domain_colors_consistent_across_methods():
    adata = toy_tissue(n_side=12)
    _permuted(adata, "m1", {"tumour": 2, "stroma": 0, "immune": 1})
    _permuted(adata, "m2", {"tumour": 0, "stroma": 1, "immune": 2})
    # m3 splits tumour into two clusters
    m3 = adata.obs["annotation"].map({"tumour": "5", "stroma": "3", "immune": "4"}).astype(str).to_numpy()
    m3[(adata.obs["annotation"] == "tumour").to_numpy() & (adata.obs["array_row"] < 3).to_numpy()] = "9"
    adata.obs["m3"] = pd.Categorical(m3)
    cols = pl.domain_colors(adata, ["annotation", "m1", "m2", "m3"])
    for region, c1, c2, c3 in [("tumour", "2", "0", "5"), ("stroma", "0", "1", "3"), ("immune", "1", "2", "4")]:
        ref = cols["annotation"][region]
        assert cols["m1"][c1] == ref and cols["m2"][c2] == ref and cols["m3"][c3] == ref
    # the extra cluster gets a colour no reference domain uses
    assert cols["m3"]["9"] not in cols["annotation"].values()
    assert len(set(cols["m3"].values())) == 4
    unmatched = pl.domain_colors(adata, ["m1", "m2"], reference=None, match=False)
    assert unmatched["m1"]["0"] == unmatched["m2"]["0"] == pl.PALETTE[0]
    assert len(pl.palette(50)) == len(set(pl.palette(50))) == 50


def _decode(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_domains_panel_over_image(tmp_path):
    adata = toy_tissue(n_side=14)
    _permuted(adata, "stmic", {"tumour": 2, "stroma": 0, "immune": 1})
    adata.obs.loc[adata.obs_names[:5], "annotation"] = np.nan
    fig = pl.domains(adata, ["annotation", "stmic"], save=tmp_path / "d.png")
    assert len([a for a in fig.axes if a.get_title()]) == 2
    titles = [a.get_title() for a in fig.axes]
    assert titles[1] == "stmic (ARI 1.00)"
    ax = fig.axes[1]
    assert ax.images, "background image missing"
    coll = [c for c in ax.collections if len(c.get_offsets()) == adata.n_obs]
    assert coll, "spots missing"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["0", "1", "2"]
    img = _decode(tmp_path / "d.png")
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 10
    # no image available: spots alone
    del adata.uns["spatial"]["toy"]["images"]["hires"]
    fig2 = pl.domains(adata, "stmic", image=True)
    assert not fig2.axes[0].images
    with pytest.raises(InputError, match="not found"):
        pl.domains(adata, ["nope"])
    import matplotlib.pyplot as plt

    plt.close("all")


def test_spot_size_is_true_diameter():
    adata = toy_tissue(n_side=6)
    fig = pl.domains(adata, "annotation", image=False)
    coll = [c for c in fig.axes[0].collections if len(c.get_offsets()) == adata.n_obs][0]
    assert np.allclose(coll._widths * 2, 25.0) or np.allclose(coll._widths, 25.0)


def test_spatial_dotplot_gsea_bars(tmp_path):
    adata = toy_tissue(n_side=12)
    planted = adata.uns["toy"]["planted"]
    genes = [planted[r][0] for r in REGIONS]
    fig = pl.spatial(adata, genes, save=tmp_path / "g.png")
    assert [a.get_title() for a in fig.axes[:3]] == genes
    assert (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(InputError, match="not in adata.var_names"):
        pl.spatial(adata, ["NOPE"])
    fig = pl.dotplot(adata, "annotation", n_genes=2, save=tmp_path / "dot.png")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == 6 and set(labels) <= {g for r in REGIONS for g in planted[r]}
    res = pd.DataFrame({"domain": ["a", "a", "b"], "term": ["T1", "T2", "T1"], "nes": [2.0, -1.0, 1.5],
                        "fdr": [0.01, 0.5, 0.02]})
    fig = pl.gsea_bars(res, fdr=0.05, save=tmp_path / "gsea.png")
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["domain a", "domain b"]
    with pytest.raises(InputError, match="columns"):
        pl.gsea_bars(pd.DataFrame({"x": [1]}))
    import matplotlib.pyplot as plt

    plt.close("all")


def test_background_falls_back_to_fullres_thumbnail():
    from stmorph.pl import _utils

    adata = toy_tissue(n_side=8)
    lib = adata.uns["spatial"]["toy"]
    hires = lib["images"].pop("hires")
    full = np.repeat(np.repeat(hires, 2, axis=0), 2, axis=1)  # hires scale is 0.5
    lib["images"]["fullres"] = full
    img, scale = _utils.background(adata, max_side=200)
    assert img is not None and max(img.shape[:2]) <= 200
    assert scale == pytest.approx(img.shape[1] / full.shape[1], rel=0.02)
    fig = pl.domains(adata, "annotation")
    assert fig.axes[0].images
    assert _utils.background(adata, image=False) == (None, 1.0)
    import matplotlib.pyplot as plt

    plt.close("all")
