"""SENCA-st hyper-parameters, in one dataclass.

Defaults are the paper's (section 4.1.1: 500 highly variable genes, 128-d RNA
and image embeddings, 256 hidden units in the graph transformer, 4 spatial
neighbours, lambda = 40, dropout 0.2, Adam with lr 5e-4 for 10 epochs).
Every field the paper leaves open is marked *choice* and explained in
``docs/senca.md``; each can be overridden per call
(``stmorph.tl.senca(adata, 7, epochs=20)``) or by passing a whole config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class SencaConfig:
    # ---- pre-processing (paper 3.1) -------------------------------------------------
    min_gene_counts: int = 10  #: drop genes whose total count is below this (paper: 10)
    target_sum: float | None = 1e4  #: normalize_total target (*choice*; None = median library size)
    n_top_genes: int = 500  #: highly variable genes by normalised dispersion (paper: 500)
    hvg_flavor: str = "variance"  #: rank genes by "variance" of the log data or scanpy "seurat"/"cell_ranger"
    #: normalised dispersion (*choice*; "literal": "seurat", as ConGcR. See docs/senca.md)
    n_neighbors: int = 4  #: spatial neighbours from a ball tree (paper: 4; Table 5 tries 8, 16)
    scale: bool = True  #: z-score the HVG matrix (*choice*; "literal": False. See docs/senca.md, study)

    # ---- RNA branch: graph transformer g (paper 3.2) --------------------------------
    embed_dim: int = 128  #: E, dimension of R and H (paper: 128)
    hidden_dim: int = 256  #: inner width of the transformer feed-forward (paper: 256 "hidden")
    n_heads: int = 1  #: self-attention heads (*choice*: eqs 3-4 are single-head)
    dropout: float = 0.2  #: input dropout = the denoising mask (paper: 0.2)
    activation: str = "elu"  #: final activation of g and of the MLPs (*choice*; "elu" | "relu" | "gelu")
    attention: str = "auto"  #: "global" | "local" | "auto" self-attention over spots (see docs)
    global_attention_max_spots: int = 10_000  #: "auto" uses global attention up to this many spots
    local_attention_neighbors: int = 32  #: spots each spot attends to when attention is "local"
    attention_chunk: int = 2048  #: query chunk for local attention (bounds memory)

    # ---- image branch (paper 3.3) ---------------------------------------------------
    patch_radius_spacings: float = 3.0  #: patch radius in spot spacings (paper: third-degree neighbour)
    standardize_image: bool = True  #: z-score cached CNN features before the FC layer (*choice*)

    # ---- cross-attention shared encoder (paper 3.4, eqs 2-4) ------------------------
    combine: str = "concat"  #: "concat" (text of 3.4) or "sum" (eq 2) of A^1_i and A^2_i
    shared_hidden_dim: int = 128  #: first layer of the dimension-reducing encoder e (*choice*)
    shared_dim: int = 64  #: dimension of the shared embedding S (*choice*)
    recon_target: str = "expression"  #: with an image, D_i reconstructs "expression" V_i, "features"
    #: [V_i, image features] or "encoder_input" E_i (the literal eq 1, which collapses; see docs)
    mse_stop_gradient: bool = False  #: detach E_i when recon_target="encoder_input" (*choice*)
    rna_only_target: str = "expression"  #: without an image, D_i reconstructs "expression" V_i or "self" E_i

    # ---- hierarchical learning (paper 3.5, eq 1) ------------------------------------
    lam: float = 40.0  #: lambda, weight of the mean MSE (paper: 40)
    temperature: float = 0.5  #: NT-Xent temperature (*choice*: SimCLR's usual value)
    window_size: float = 2.0  #: local windows, side in spot spacings (*choice*)
    pool_size: float = 6.0  #: global pooled regions, side in spot spacings (*choice*)
    ntxent_max_windows: int = 2048  #: at most this many windows per NT-Xent (memory O(n^2)); random subset
    contrastive_without_hierarchy: bool = False  #: hierarchical=False keeps a spot-level NT-Xent
    rna_only_contrast: bool = True  #: without an image, both NT-Xent terms contrast two dropout views of the RNA
    #: branch (R of two forward passes, SimCSE's augmentation), so hierarchical learning still acts (*choice*;
    #: False: the MSE alone, as before)

    # ---- training (paper 4.1.1) ------------------------------------------------------
    epochs: int = 10  #: paper: 10
    batch_spots: int | None = 32  #: an epoch is a pass over spatial subgraphs of about this many spots
    #: (*choice*; None = every step uses the whole section, the "literal" reading)
    full_section_max_spots: int | None = 1000  #: with cached image features, sections up to this size train on
    #: the whole section at each step (as many steps as mini-batches): NT-Xent then sees every window
    #: (*choice*; None: never)
    large_section_batch_spots: int | None = 500  #: with cached image features, larger sections train on
    #: spatial batches of about this many spots (as many steps as the ``batch_spots`` mini-batches), so a step holds
    #: many of NT-Xent_g's 6 x 6-spacing windows (500 spots: about 14, as a HER2ST section) (*choice*; None: batch_spots)
    large_section_max_spots: int | None = 10_000  #: ... up to this many spots (a Visium capture area holds 4,992):
    #: each step costs ~15x a 32-spot one, so above it (Visium HD) the 32-spot mini-batches stay (None: no limit)
    steps_per_epoch: int = 1  #: passes (batch_spots) or full-section steps (None) per epoch, with an image
    steps_per_epoch_rna_only: int = 1  #: the same without an image ("literal": 10)
    lr: float = 5e-4  #: Adam learning rate (paper: 5e-4)
    lr_schedule: str = "constant"  #: "constant" (paper, "literal") or "cosine" decay to 0 over all steps
    weight_decay: float = 0.0
    train_threads: int | None = 1  #: torch CPU threads while training (*choice*: ops on ~32-spot subgraphs
    #: are too small to split, and extra threads only spin on a busy machine); None = torch's setting

    # ---- clustering (paper 3.5: agglomerative) ---------------------------------------
    clustering: str = "agglomerative"  #: "agglomerative" (the paper: scikit-learn's, with ``linkage``) or
    #: "mixture": stmorph's tied Gaussian mixture (:func:`stmorph.tl.cluster`'s ``"gmm"``) on S, *not* the paper's
    linkage: str = "ward"
    cluster_connectivity_above: int = 20_000  #: above this many spots, ward uses a kNN connectivity

    @classmethod
    def preset(cls, name: str, **changes: Any) -> SencaConfig:
        """A named configuration: ``"default"`` (the fields' defaults), ``"literal"`` or ``"mixture"``.

        ``"literal"`` is the first reading of the paper kept for comparison: the
        MSE compares D_i with the encoder input E_i, genes are not scaled, an
        epoch is one full-section Adam step with an image (10 without), at a
        constant learning rate.

        ``"mixture"`` departs from the paper in two places, where its settings are what keeps SENCA-st below the
        expression baseline on DLPFC (``docs/senca.md``): 30 epochs instead of 10, and S clustered by a tied
        Gaussian mixture instead of agglomeratively.
        """
        if name not in PRESETS:
            from ...errors import InputError

            msg = f"unknown SencaConfig preset {name!r}; choose from {sorted(PRESETS)}."
            raise InputError(msg)
        return cls().replace(**PRESETS[name]).replace(**changes)

    def replace(self, **changes: Any) -> SencaConfig:
        """A copy with ``changes`` applied; unknown names raise ``TypeError`` naming them."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            msg = f"unknown SencaConfig field(s) {unknown}; allowed: {sorted(known)}"
            raise TypeError(msg)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        from ...errors import InputError

        checks = [
            (self.n_neighbors >= 1, "n_neighbors must be >= 1"),
            (self.n_top_genes >= 2, "n_top_genes must be >= 2"),
            (self.embed_dim % self.n_heads == 0, "embed_dim must be divisible by n_heads"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.activation in ("elu", "relu", "gelu"), "activation must be 'elu', 'relu' or 'gelu'"),
            (self.attention in ("auto", "global", "local"), "attention must be 'auto', 'global' or 'local'"),
            (self.combine in ("concat", "sum"), "combine must be 'concat' or 'sum'"),
            (self.rna_only_target in ("expression", "self"), "rna_only_target must be 'expression' or 'self'"),
            (self.hvg_flavor in ("variance", "seurat", "cell_ranger"),
             "hvg_flavor must be 'variance', 'seurat' or 'cell_ranger'"),
            (self.recon_target in ("expression", "features", "encoder_input"),
             "recon_target must be 'expression', 'features' or 'encoder_input'"),
            (self.batch_spots is None or self.batch_spots >= 4, "batch_spots must be None or >= 4"),
            (self.full_section_max_spots is None or self.full_section_max_spots >= 1,
             "full_section_max_spots must be None or >= 1"),
            (self.large_section_batch_spots is None or self.large_section_batch_spots >= 4,
             "large_section_batch_spots must be None or >= 4"),
            (self.large_section_max_spots is None or self.large_section_max_spots >= 1,
             "large_section_max_spots must be None or >= 1"),
            (self.train_threads is None or self.train_threads >= 1, "train_threads must be None or >= 1"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be 'cosine' or 'constant'"),
            (self.epochs >= 0 and min(self.steps_per_epoch, self.steps_per_epoch_rna_only) >= 1,
             "epochs >= 0, steps_per_epoch >= 1 and steps_per_epoch_rna_only >= 1"),
            (self.window_size > 0 and self.pool_size > 0, "window_size and pool_size must be > 0"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.linkage in ("ward", "average", "complete", "single"), "linkage must be a sklearn linkage"),
            (self.clustering in CLUSTERINGS, f"clustering must be one of {CLUSTERINGS}"),
        ]
        bad = [m for ok, m in checks if not ok]
        if bad:
            msg = "invalid SencaConfig: " + "; ".join(bad) + f" (got {self})"
            raise InputError(msg)


#: How S becomes domains (:attr:`SencaConfig.clustering`).
CLUSTERINGS = ("agglomerative", "mixture")

#: Named configurations for :meth:`SencaConfig.preset` (changes from the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "literal": {"rna_only_contrast": False, "recon_target": "encoder_input", "scale": False, "hvg_flavor": "seurat", "batch_spots": None, "steps_per_epoch": 1,
                "steps_per_epoch_rna_only": 10, "lr_schedule": "constant"},
    "mixture": {"epochs": 30, "clustering": "mixture"},
}
