"""Joint domains across the sections of a cohort: one embedding, batch-corrected, one clustering.

Run on each section alone, a method numbers its domains in its own order: domain ``3`` of one
section has nothing to do with domain ``3`` of the next. :func:`joint_domains` embeds the
sections together so the labels are shared::

    genes          shared by every section; the union of each section's most variable ones (seurat_v3)
    per section    counts -> CPM 1e4 -> log1p (the sections' rows stacked)
    scale          each gene to unit variance over the cohort, clipped at 10 sd
    context        [own | Gaussian neighbourhood mean within the section] (method "stmorph"; a
                   block-diagonal smoother, so no neighbourhood crosses sections)
    one PCA        fitted on all spots at once (shared axes), sparse products as the stmorph method
    Harmony        (harmonypy) removes what separates the sections but not the tissue types
    one clustering tied Gaussian mixture on every spot (exactly k, or k chosen on the cohort)
    refit          each section's own embedding (exactly a separate run's: every gene of the section, its own
                   variable genes), one tied-mixture EM started from the joint domains there (their weights, means
                   and pooled covariance): the joint run says what each domain is, the section's own
                   embedding where its boundaries lie
    refinement     the majority refinement within each section

Why the refit: the joint axes are shared by every section, so each section's finer, section-specific
variation is partly lost in them; started from the joint domains, one EM in the section's own embedding keeps
the domains' identity (checked: each refitted domain must hold mostly the spots of the joint domain it
started from, else the section keeps its joint labels, with a warning) while placing its boundaries as a
separate run would. A domain absent from a section (no spot of the section in it) stays absent there.

The building blocks are the stmorph method's (:func:`~stmorph.tl._stmorph._log_hvg`,
:func:`~stmorph.tl._stmorph._context_pca`, the neighbourhood smoother) and :func:`stmorph.tl.cluster`.
Image features are not used: each section's image embedding is fitted on that section alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from ..errors import DependencyError, InputError
from ._cluster import EM_TOL, _relabel, cluster
from ._embedding import _counts, log_normalize
from ._neighbors import block_diag, coordinates_um, refine_labels, refine_radius, spot_spacing
from ._stmorph import (
    DEFAULTS,
    _check_sigmas,
    _context_pca,
    _expression_context,
    _log_hvg,
    _neighbourhood_means,
    _scale_sparse,
)

METHODS = ("stmorph", "expression")
BATCH_CORRECTIONS = ("harmony", None)
#: Harmony's diversity penalty (harmonypy's default is 2). On the two DLPFC sections 1 kept 151673's ARI
#: closer to its separate runs' (0.590 against 0.572 at 2, mean of 3 seeds; docs/design-notes.md).
HARMONY_THETA = 1.0


def _harmony(Z: np.ndarray, batch: np.ndarray, random_state: int, theta: float) -> np.ndarray:
    try:
        import harmonypy
    except ImportError:
        msg = "batch_correction='harmony' needs harmonypy: pip install 'stmorph[joint]' (or batch_correction=None)."
        raise DependencyError(msg) from None
    meta = pd.DataFrame({"section": pd.Categorical(batch)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ho = harmonypy.run_harmony(np.asarray(Z, dtype=np.float64), meta, "section", theta=float(theta),
                                   random_state=int(random_state), verbose=False, ncores=1)
    out = np.asarray(ho.Z_corr, dtype=np.float64)
    return out.T if out.shape[0] != Z.shape[0] else out  # older harmonypy returns (PCs, spots)


def _embed(counts: list, totals: list, hvgs: list, smoothers: list, n_comps: int, random_state: int):
    """One embedding of stacked sections: the union of the sections' variable genes ``hvgs`` (one index array
    per section), log-normalised (each spot to its library size ``totals``, over every gene of its section, as a
    separate run normalises) and scaled over all spots, ``[own | neighbourhood mean at each radius within the
    section]`` (``smoothers``: per section, one smoother per radius; empty lists: own only), one PCA.
    Returns ``(Z float64, number of genes used)``."""
    hvg = np.zeros(counts[0].shape[1], dtype=bool)
    for genes in hvgs:
        hvg[genes] = True
    L = sp.vstack([log_normalize(X[:, hvg], totals=t) for X, t in zip(counts, totals)]).tocsr()
    L, n_genes = _scale_sparse(L)
    # one block per section and radius: a neighbourhood never crosses sections
    blocks = [block_diag([own[i] for own in smoothers]) for i in range(len(smoothers[0]))]
    n_out = int(min(n_comps, min(L.shape) - 1))
    if n_out < 1:
        msg = f"{L.shape[0]} spot(s) x {L.shape[1]} variable gene(s) are too few for an embedding."
        raise InputError(msg)
    with threadpool_limits(1):
        Z, _ = _context_pca(L, blocks, n_out, random_state)
    return np.asarray(Z, dtype=np.float64), int(n_genes)


def _refit(Z: np.ndarray, labels: np.ndarray, random_state: int) -> tuple[np.ndarray, dict]:
    """One tied-mixture EM on a section's own embedding ``Z``, started from its joint domains ``labels`` (their
    weights, means and pooled covariance; only the domains present in the section). Returns the labels, in the
    joint numbering, and a record; the joint labels come back unchanged when a refitted domain holds mostly
    another joint domain's spots (the identity would be lost)."""
    from sklearn.mixture import GaussianMixture

    present = np.unique(labels)
    if present.size < 2:  # one domain in this section: nothing to refit
        return labels, {"agreement": 1.0, "kept": "joint (one domain)", "domains": int(present.size)}
    # the whole start (weights, means, shared covariance) from the joint domains, so no k-means run decides it
    codes = np.searchsorted(present, labels)
    means = np.stack([Z[codes == j].mean(axis=0) for j in range(present.size)])
    reg = 1e-6 * max(float(np.mean(np.var(Z, axis=0))), 1e-12)
    R = Z - means[codes]
    cov = R.T @ R / Z.shape[0] + reg * np.eye(Z.shape[1])
    gm = GaussianMixture(n_components=present.size, covariance_type="tied", weights_init=np.bincount(codes) / codes.size,
                         means_init=means, precisions_init=np.linalg.inv(cov), max_iter=300, tol=EM_TOL,
                         reg_covar=reg, random_state=int(random_state))
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        new = present[gm.fit(Z).predict(Z)]
    agreement = float(np.mean(new == labels))
    kept = _keeps_identity(new, labels)
    return (new if kept else labels), {"agreement": agreement, "kept": "refit" if kept else "joint",
                                       "domains": int(present.size)}


#: A domain with at least this share of its spots in one section is that section's own (not shared).
PRIVATE_DOMAIN = 0.95
#: A warning when a section has at least this share of its spots in its own domains (see :func:`_section_specific`).
SECTION_SPECIFIC_WARN = 0.8


def _section_specific(labels: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Per section, the share of its spots in domains that hold almost only that section's spots (at least
    :data:`PRIVATE_DOMAIN` of theirs). Near 1 for every section: the joint domains are the sections, not tissue
    types they share. Zeros for a single section."""
    if len(sizes) < 2:
        return np.zeros(len(sizes))
    section = np.repeat(np.arange(len(sizes)), sizes)
    counts = np.zeros((int(labels.max()) + 1, len(sizes)))
    np.add.at(counts, (labels, section), 1)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    owner = np.where(share.max(axis=1) >= PRIVATE_DOMAIN, share.argmax(axis=1), -1)
    return np.array([counts[owner == i, i].sum() / n for i, n in enumerate(sizes)])


def _keeps_identity(new: np.ndarray, old: np.ndarray) -> bool:
    """Whether every domain of ``new`` holds mostly spots of the domain of the same number in ``old`` (a
    domain may vanish; none may take over another's spots)."""
    return all(np.bincount(old[new == c]).argmax() == c for c in np.unique(new))


def joint_domains(
    adatas: Mapping[str, object],
    *,
    method: str = "stmorph",
    n_clusters: int | None = None,
    batch_correction: str | None = "harmony",
    theta: float = HARMONY_THETA,
    sigmas_um=DEFAULTS["sigmas_um"],
    n_top_genes: int | None = DEFAULTS["n_top_genes"],
    n_comps: int | None = None,
    n_init: int = DEFAULTS["n_init"],
    k_range: tuple[int, int] = DEFAULTS["k_range"],
    refine: bool = True,
    refit: bool = True,
    layer: str | None = None,
    key_added: str = "joint",
    random_state: int = 0,
):
    """Domains shared by several sections: a joint, batch-corrected embedding and one clustering.

    Parameters
    ----------
    adatas
        ``{section name: AnnData}`` in stmorph's data model (raw counts, ``obsm["spatial"]``, ``uns["spatial"]``);
        one section runs the same pipeline alone (no batch correction).
    method
        ``"stmorph"``: each spot's expression with its neighbourhood mean (the stmorph method's embedding);
        ``"expression"``: expression alone.
    n_clusters
        Number of domains over the cohort; ``None`` chooses it on the joint embedding (as the stmorph method).
    batch_correction
        ``"harmony"`` (harmonypy, on the joint PCA) or ``None``.
    theta
        Harmony's diversity penalty (higher: stronger mixing of the sections).
    sigmas_um, n_top_genes, n_comps
        Neighbourhood radii (micrometres), variable genes per section (their union over the sections is
        used), and components (default 20 for ``"stmorph"``, 10 for ``"expression"``).
    n_init, k_range, refine
        Mixture restarts, the counts considered without ``n_clusters``, majority refinement within each section.
    refit
        Refit each section's domains in that section's own embedding, started from the joint domains (see the
        module docstring); ``False`` keeps the joint mixture's labels as they are.
    layer
        Layer holding counts (default ``X``).
    key_added
        ``obs`` key of the domains and ``obsm["X_" + key_added]`` of the embedding.
    random_state
        Seed of the PCA, Harmony and the mixture.

    Sets the following fields (in every section):

    ``adata.obs[key_added]``
        Domain labels ``"0"``, ``"1"``, ... shared by all sections (the same categories everywhere).
    ``adata.obsm["X_" + key_added]``
        The joint embedding (after batch correction), ``float32``.
    ``adata.uns[key_added]["params"]``
        Parameters, the sections, the genes used, the cluster count, the refinement (``"n_changed"``: spots
        changed per section) and the refit, each a list in the order of ``"sections"``: ``"agreement"`` (share
        of spots whose refitted domain is their joint one), ``"kept"`` (``"refit"``, or ``"joint"`` when the
        refit changed which domain is which) and ``"domains"`` (joint domains present in the section);
        ``"section_specific"``: per section, the share of its spots in domains (almost) no other section has (a
        warning when it reaches 0.8: the domains then follow the sections, not tissue types they share).
    """
    import anndata as ad

    if method not in METHODS:
        msg = f"method={method!r} is not one of {METHODS}."
        raise InputError(msg)
    if batch_correction not in BATCH_CORRECTIONS:
        msg = f"batch_correction={batch_correction!r} is not one of {BATCH_CORRECTIONS}."
        raise InputError(msg)
    names = [str(n) for n in adatas]
    if not names:
        msg = "joint domains need at least one section; got none."
        raise InputError(msg)
    sections = list(adatas.values())
    sig = _check_sigmas(sigmas_um)
    n_comps = int(n_comps if n_comps is not None else (DEFAULTS["n_comps"] if method == "stmorph" else 10))

    common = pd.Index(sections[0].var_names)
    for a in sections[1:]:
        common = common.intersection(pd.Index(a.var_names), sort=False)
    if len(common) < 2:
        msg = f"the sections share {len(common)} gene name(s); joint domains need the same genes (var_names)."
        raise InputError(msg)
    counts, full = [], []
    for a in sections:
        X, _ = _counts(a, layer)
        full.append(sp.csr_matrix(X))
        counts.append(full[-1][:, pd.Index(a.var_names).get_indexer(common)])
    totals = [np.asarray(X.sum(axis=1)).ravel() for X in full]  # library sizes over every gene of the section
    for name, t in zip(names, totals):
        if np.any(t <= 0):
            msg = f"section {name!r}: {int(np.sum(t <= 0))} spot(s) have zero total counts; filter them out first."
            raise InputError(msg)
    sizes = [a.n_obs for a in sections]
    batch = np.repeat(np.asarray(names, dtype=object), sizes)
    xys = [coordinates_um(a) for a in sections]
    smooth = method == "stmorph"
    # each section's variable genes among the shared ones (for the joint embedding) and its neighbourhood smoothers
    # (for the joint embedding and the refit's own one)
    hvgs = [_log_hvg(X, n_top_genes, 1e4, DEFAULTS["hvg_flavor"])[1] for X in counts]
    smoothers = [_neighbourhood_means(xy, sig) if smooth else [] for xy in xys]
    Z, n_genes = _embed(counts, totals, hvgs, smoothers, n_comps, random_state)
    n_out = Z.shape[1]
    if batch_correction == "harmony" and len(names) > 1:  # one section: nothing to correct
        Z = _harmony(Z, batch, random_state, theta)
    joint = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(Z.shape[0]).astype(str)))
    joint.obsm["X"] = Z.astype(np.float32)
    cluster(joint, "X", method="gmm", n_clusters=n_clusters, n_init=n_init, k_range=k_range, refine=False,
            key_added="domains", random_state=random_state)
    labels = joint.obs["domains"].astype(int).to_numpy()
    parts = np.split(labels, np.cumsum(sizes)[:-1])
    refits = []
    if refit and len(names) > 1:  # one section: its own embedding is the joint one
        for i in range(len(names)):
            # exactly the embedding a separate run computes: every gene of the section, its own variable genes
            own = _expression_context(full[i], smoothers[i], n_top_genes=n_top_genes, hvg_flavor=DEFAULTS["hvg_flavor"],
                                      n_comps=n_comps, target_sum=1e4, random_state=random_state)[0]
            parts[i], record = _refit(np.asarray(own, dtype=np.float64), parts[i], random_state)
            refits.append(record)
        lost = [n for n, r in zip(names, refits) if r["kept"] == "joint"]
        if lost:
            warnings.warn(f"joint_domains: refitting in their own embedding changed which domain is which in "
                          f"{lost}; those sections keep their joint labels.", stacklevel=2)
    refined = []
    changed = []
    for xy, part in zip(xys, parts):
        if refine:
            radius = refine_radius(spot_spacing(xy))
            part, n = refine_labels(part, xy, radius) if np.isfinite(radius) else (part, 0)
            changed.append(int(n))
        refined.append(part)
    labels = _relabel(np.concatenate(refined))  # "0" is the largest domain over the cohort
    k = int(labels.max()) + 1
    specific = _section_specific(labels, sizes)
    follow = [f"{n!r} ({share:.0%})" for n, share in zip(names, specific) if share >= SECTION_SPECIFIC_WARN]
    if follow:
        warnings.warn(f"joint_domains: the domains follow the sections rather than tissue types shared by them: "
                      f"{', '.join(follow)} of the spots lie in domains that (almost) no other section has. The "
                      f"sections may hold different tissue (other patients or organs), or the batch effect was not "
                      f"removed; compare them with separate runs, or raise theta (`stmorph cohort --theta`).",
                      UserWarning, stacklevel=2)
    cats = [str(i) for i in range(k)]
    params = {"method": method, "batch_correction": batch_correction, "sections": names,
              "theta": float(theta) if batch_correction == "harmony" and len(names) > 1 else None,
              "n_genes_used": n_genes, "n_top_genes": n_top_genes, "hvg_flavor": DEFAULTS["hvg_flavor"],
              "sigmas_um": sig if smooth else [],
              "n_comps": n_out, "n_clusters": k, "n_clusters_requested": n_clusters, "n_init": int(n_init),
              "refine": {"method": "majority", "n_changed": changed} if refine else None,
              # per-section records as lists in the order of "sections" (names may hold "/", which h5ad nests)
              "refit": {f: [r[f] for r in refits] for f in ("kept", "agreement", "domains")} if refits else None,
              "section_specific": [float(v) for v in specific],
              "random_state": random_state}
    for a, part, emb in zip(sections, np.split(labels, np.cumsum(sizes)[:-1]),
                            np.split(Z.astype(np.float32), np.cumsum(sizes)[:-1])):
        a.obs[key_added] = pd.Categorical([str(v) for v in part], categories=cats)
        a.obsm["X_" + key_added] = emb
        a.uns[key_added] = {"params": params}
