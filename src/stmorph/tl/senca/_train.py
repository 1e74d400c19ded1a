"""SENCA-st losses and trainer (paper eq 1 and section 3.5).

    Loss = NT-Xent_g(H_p, R_p) + NT-Xent_w(H_w, R_w) + lambda * avg_i MSE(E_i, D_i)      (1)

- ``H_w, R_w``: H and R mean-pooled over small square windows of the section
  (``window_size`` spot spacings, local scale).
- ``H_p, R_p``: H and R mean-pooled over larger regions (``pool_size``
  spacings, global scale).
- NT-Xent is SimCLR's loss: the pooled H and R of the same window are a
  positive pair, every other window in the section is a negative.
- The window grids are shifted by a random offset at every step (an
  augmentation; the windows are precomputed index maps, pooling is an
  ``index_add``). NT-Xent costs O(n_windows^2) memory, so above
  ``ntxent_max_windows`` (2,048) windows a random subset is contrasted per
  step (only sections of more than ~8,000 spots reach that).
- ``hierarchical=False`` (Table 4 ablation) drops both NT-Xent terms
  (Loss = lambda * MSE), or keeps one spot-level NT-Xent(H, R) when
  ``contrastive_without_hierarchy`` is set.

An *epoch* is a pass over the section in spatial mini-batches (default): the
spots are cut into square tiles of about ``batch_spots`` (32) spots on a grid
with a new random offset every epoch, consecutive tiles are merged until a
batch holds at least half that many spots, and each batch is one Adam step on
the subgraph it induces (its block of the normalised adjacency, self-attention
among its spots, cross-attention neighbourhoods cut to it: a missing neighbour
is replaced by the spot itself). So 10 epochs on a 346-spot section are about
110 steps, on a 3,600-spot section about 1,100 cheap ones. With (cached) image
features, a section of at most ``full_section_max_spots`` (1,000) spots makes the
same number of steps, each on the whole section, so that both NT-Xent terms
contrast every window of it (a 32-spot batch holds only 1-3 of the global
regions); a larger section makes that number of steps on spatial batches of about
``large_section_batch_spots`` (500; tiles merged to at least half that) spots, a 500-spot tile holding
about 14 of those regions (up to ``large_section_max_spots``, 10,000: a Visium capture area; Visium HD
keeps the mini-batches); not when the CNN is fine-tuned. Embedding (``embed``)
always runs on the whole section. ``batch_spots=None`` is the literal reading:
every step is the whole section and an epoch is ``steps_per_epoch`` steps
(``steps_per_epoch_rna_only`` without an image). The learning rate is the
paper's constant 5e-4 (``lr_schedule="cosine"`` decays it to 0; it was
measured to under-train, see docs). Each step draws a new dropout (denoising) mask and window offsets.
Why: see the study in docs/senca.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np
import torch
import torch.nn.functional as F

from ._config import SencaConfig
from ._model import SENCA, SencaOutput
from ._preprocess import SencaInputs, window_index


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR NT-Xent between paired rows of ``a`` and ``b`` (n, d); 0 when n < 2."""
    n = a.shape[0]
    if n < 2:
        return a.sum() * 0.0
    z = F.normalize(torch.cat([a, b], 0), dim=1)  # (2n, d)
    sim = z @ z.T / temperature  # (2n, 2n)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # partner index
    return F.cross_entropy(sim, target)


def pool(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` (N, d) per window ``index`` (N,) -> (n, d)."""
    out = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index, x)
    cnt = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, index, torch.ones_like(x[:, 0]))
    return out / cnt[:, None]


@dataclass
class Tensors:
    """The model inputs on one device."""

    v: torch.Tensor
    adj: torch.Tensor
    neighborhood: torch.Tensor
    image: torch.Tensor | None
    attention_neighbors: torch.Tensor | None

    @classmethod
    def from_inputs(cls, inp: SencaInputs, image, device) -> Tensors:
        a = inp.adjacency.tocoo()
        adj = torch.sparse_coo_tensor(np.vstack([a.row, a.col]).astype(np.int64), a.data.astype(np.float32),
                                      a.shape, check_invariants=False).coalesce().to(device)
        nb = None if inp.attention_neighbors is None else torch.as_tensor(inp.attention_neighbors, device=device)
        img = None
        if image is not None:
            img = image.to(device) if isinstance(image, torch.Tensor) else torch.as_tensor(image, device=device)
        return cls(v=torch.as_tensor(inp.x, device=device), adj=adj,
                   neighborhood=torch.as_tensor(inp.neighborhood, device=device), image=img,
                   attention_neighbors=nb)

    def subgraph(self, inp: SencaInputs, idx: np.ndarray) -> Tensors:
        """The tensors of the subgraph induced by spots ``idx`` (global self-attention among them)."""
        dev = self.v.device
        a = inp.adjacency[idx][:, idx].tocoo()
        adj = torch.sparse_coo_tensor(np.vstack([a.row, a.col]).astype(np.int64), a.data.astype(np.float32),
                                      (len(idx), len(idx)), check_invariants=False).coalesce().to(dev)
        local = np.full(inp.x.shape[0], -1, dtype=np.int64)
        local[idx] = np.arange(len(idx))
        nb = local[inp.neighborhood[idx]]  # (B, K); neighbours outside the batch are -1
        nb = np.where(nb < 0, nb[:, :1], nb)  # ... and become the spot itself
        it = torch.as_tensor(idx, device=dev)
        return Tensors(v=self.v[it], adj=adj, neighborhood=torch.as_tensor(nb, device=dev),
                       image=None if self.image is None else self.image[it], attention_neighbors=None)


@dataclass
class History:
    total: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    ntxent_w: list[float] = field(default_factory=list)
    ntxent_g: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.__dict__.items()}


def forward(model: SENCA, t: Tensors) -> SencaOutput:
    return model(t.v, t.adj, t.neighborhood, t.image, t.attention_neighbors)


def spatial_batches(xy: np.ndarray, spacing: float, batch_spots: int | None,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Spot indices of the mini-batches of one epoch: merged square tiles of ~``batch_spots`` spots.

    The tile grid gets a random offset; tiles are taken in grid order and
    merged until a batch holds at least ``batch_spots // 2`` spots (a short
    last batch joins the one before); the batches come back shuffled. One
    batch (every spot) when ``batch_spots`` is None or the section is smaller
    than 1.5 batches.
    """
    n = len(xy)
    if batch_spots is None or n < 1.5 * batch_spots:
        return [np.arange(n)]
    side = spacing * math.sqrt(batch_spots)
    tile, n_tiles = window_index(xy, side, rng.uniform(0.0, side, size=2))
    order = np.argsort(tile, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(tile, minlength=n_tiles))])
    batches, start = [], 0
    for t in range(1, n_tiles + 1):
        if bounds[t] - bounds[start] >= batch_spots // 2:
            batches.append(order[bounds[start]:bounds[t]])
            start = t
    if start < n_tiles:  # leftover tiles join the last batch
        tail = order[bounds[start]:]
        batches[-1:] = [np.concatenate([batches[-1], tail])] if batches else [tail]
    return [np.sort(batches[i]) for i in rng.permutation(len(batches))]


def whole_section_steps(cfg: SencaConfig, n_spots: int, with_image: bool) -> bool:
    """Whether each step trains on the whole section instead of a mini-batch: with (cached) image features, on
    sections of at most ``cfg.full_section_max_spots`` spots. The contrastive terms need many windows per step: a
    32-spot batch holds 1-3 of the 6 x 6-spacing regions NT-Xent_g contrasts, the whole of a HER2ST section 12-18.
    Not when the CNN is fine-tuned (``finetune_image``): every step would run it on every patch."""
    return (with_image and cfg.batch_spots is not None and cfg.full_section_max_spots is not None
            and n_spots <= cfg.full_section_max_spots)


def step_schedule(cfg: SencaConfig, n_spots: int, with_image: bool) -> str:
    """What one training step holds: ``"whole section"`` (every step, the literal reading or a small section with an
    image), ``"large batches"`` (~``large_section_batch_spots`` spots, a larger section with an image up to
    ``large_section_max_spots``) or ``"mini-batches"`` (~``batch_spots`` spots). Recorded in ``params``."""
    if cfg.batch_spots is None or whole_section_steps(cfg, n_spots, with_image):
        return "whole section"
    big, most = cfg.large_section_batch_spots, cfg.large_section_max_spots
    if with_image and big is not None and big > cfg.batch_spots and (most is None or n_spots <= most):
        return "large batches"
    return "mini-batches"


def epoch_plan(cfg: SencaConfig, xy: np.ndarray, spacing: float, passes: int, with_image: bool,
               rng: np.random.Generator) -> list[np.ndarray]:
    """The spot indices of each step of one epoch.

    ``passes`` passes over ``batch_spots`` mini-batches (:func:`spatial_batches`); with (cached) image features
    (``with_image``) the same number of steps, each on the whole section (:func:`whole_section_steps`) or, on a
    larger section of at most ``large_section_max_spots``, on a spatial batch of about
    ``large_section_batch_spots`` spots: the contrastive terms need many windows per step, which a 32-spot batch
    does not hold (above that size each such step would cost too much: the mini-batches stay). See
    :func:`step_schedule`.
    """
    n = len(xy)
    plan = [b for _ in range(passes) for b in spatial_batches(xy, spacing, cfg.batch_spots, rng)]
    schedule = step_schedule(cfg, n, with_image)
    if schedule == "whole section":
        return [np.arange(n)] * len(plan)
    if schedule == "large batches":
        steps: list[np.ndarray] = []
        while len(steps) < len(plan):  # passes over large batches until the mini-batches' number of steps
            steps += spatial_batches(xy, spacing, cfg.large_section_batch_spots, rng)
        return steps[:len(plan)]
    return plan


def loss_terms(out: SencaOutput, inp: SencaInputs, cfg: SencaConfig, *, hierarchical: bool,
               rng: np.random.Generator, xy: np.ndarray | None = None,
               view: SencaOutput | None = None) -> dict[str, torch.Tensor]:
    """The terms of eq 1 for one forward pass (``xy``: the coordinates of its spots; default all).

    The contrastive pairs are (H, R); without an image, (R of ``view``, R): a second forward pass of the same
    spots, whose dropout masks differ (``rna_only_contrast``); without either, the MSE alone."""
    xy = inp.xy if xy is None else xy
    target = out.target.detach() if cfg.mse_stop_gradient else out.target
    if out.split is None:
        mse = F.mse_loss(out.d, target)  # avg_i MSE(target_i, D_i)
    else:  # "features": expression and image blocks weighted equally
        mse = F.mse_loss(out.d[:, :out.split], target[:, :out.split]) + F.mse_loss(
            out.d[:, out.split:], target[:, out.split:])
    zero = mse * 0.0
    terms = {"mse": mse, "ntxent_w": zero, "ntxent_g": zero}
    if out.h is None and view is None:
        return terms  # RNA branch alone, no second view: nothing to contrast
    first = out.h if out.h is not None else view.r
    if hierarchical:
        for name, size in (("ntxent_w", cfg.window_size), ("ntxent_g", cfg.pool_size)):
            side = size * inp.spacing
            idx, n = window_index(xy, side, rng.uniform(0.0, side, size=2))
            idx_t = torch.as_tensor(idx, device=out.r.device)
            h_w, r_w = pool(first, idx_t, n), pool(out.r, idx_t, n)  # (n, E) each
            if n > cfg.ntxent_max_windows:  # NT-Xent is O(n^2): a random subset of windows per step
                keep = torch.as_tensor(np.sort(rng.choice(n, cfg.ntxent_max_windows, replace=False)),
                                       device=out.r.device)
                h_w, r_w = h_w[keep], r_w[keep]
            terms[name] = nt_xent(h_w, r_w, cfg.temperature)
    elif cfg.contrastive_without_hierarchy:
        terms["ntxent_w"] = nt_xent(first, out.r, cfg.temperature)
    return terms


def train(model: SENCA, inp: SencaInputs, t: Tensors, cfg: SencaConfig, *, hierarchical: bool = True,
          random_state: int = 0, progress: bool = False) -> History:
    """Adam on eq 1 for ``cfg.epochs`` epochs; returns the per-epoch mean of each term."""
    threads = torch.get_num_threads()
    if cfg.train_threads and t.v.device.type == "cpu":
        torch.set_num_threads(cfg.train_threads)
    try:
        return _train(model, inp, t, cfg, hierarchical=hierarchical, random_state=random_state, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train(model, inp, t, cfg, *, hierarchical, random_state, progress) -> History:
    rng = np.random.default_rng(random_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = History()
    passes = cfg.steps_per_epoch if model.image is not None else cfg.steps_per_epoch_rna_only
    # without an image, a second pass of each step (other dropout masks) is the view R is contrasted with
    two_views = (model.image is None and cfg.rna_only_contrast
                 and (hierarchical or cfg.contrastive_without_hierarchy))
    cached_image = model.image is not None and model.image.cnn is None  # image features, not a CNN fine-tuned
    epochs = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="SENCA-st", unit="epoch")
    model.train()
    for ep in epochs:
        acc = {"total": 0.0, "mse": 0.0, "ntxent_w": 0.0, "ntxent_g": 0.0}
        plan = epoch_plan(cfg, inp.xy, inp.spacing, passes, cached_image, rng)
        for i, idx in enumerate(plan):
            if cfg.lr_schedule == "cosine":
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (ep + i / len(plan)) / cfg.epochs))
            whole = len(idx) == inp.x.shape[0]
            tb = t if whole else t.subgraph(inp, idx)
            view = forward(model, tb) if two_views else None
            terms = loss_terms(forward(model, tb), inp, cfg, hierarchical=hierarchical, rng=rng,
                               xy=None if whole else inp.xy[idx], view=view)
            loss = terms["ntxent_g"] + terms["ntxent_w"] + cfg.lam * terms["mse"]  # eq 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc["total"] += float(loss.detach())
            for k in ("mse", "ntxent_w", "ntxent_g"):
                acc[k] += float(terms[k].detach())
        for k, val in acc.items():
            getattr(hist, k).append(val / len(plan))
        if progress:
            epochs.set_postfix(loss=f"{hist.total[-1]:.4f}")
    return hist


@torch.no_grad()
def embed(model: SENCA, t: Tensors) -> np.ndarray:
    """Shared embedding S (N, shared_dim) with dropout off."""
    model.eval()
    return forward(model, t).s.float().cpu().numpy()
