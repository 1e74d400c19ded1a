"""The SENCA-st model (paper Figure 1, section 3, equations 2-4), nanoGPT style.

Read top to bottom: small modules that each do one thing, then :class:`SENCA`
whose ``forward`` is Figure 1::

    V (N, G) --g--> R (N, E)  ─┐
                               ├─ neighbourhood cross-attention (eqs 3, 4) -> E_i -> e -> S_i (eq 2) -> d -> D_i
    image feats --FC--> H (N, E)┘

N spots, G genes, E = ``embed_dim`` (128), K = k + 1 (the spot and its k
spatial neighbours). The model knows nothing of files or AnnData; the trainer
(``_train.py``) and the data preparation (``_preprocess.py``) live apart.

Choices the paper leaves open (all in :class:`~._config.SencaConfig`, see
``docs/senca.md``):

- g: ``Linear(G -> E)`` then the adjacency product, so the transformer block
  and its residual work in E; "256 hidden" is the width of the feed-forward.
- Self-attention over all spots is exact global attention computed with
  ``scaled_dot_product_attention`` (a flash kernel on CPU and GPU: memory
  linear in N, time N^2); above ``global_attention_max_spots`` ("auto") each
  spot attends to its ``local_attention_neighbors`` nearest spots instead,
  computed in checkpointed query chunks so memory stays linear in N.
- Cross-attention: the spot's own row of the K x K attention is kept
  ("extract ... the two vectors for the considered spot", so only that row is
  computed); the two rows are
  concatenated (text of 3.4) or summed (eq 2) per ``combine``.
- ``cross_attention=False`` (Table 4 ablation) removes the attention weights:
  A^1_i = R_i W^v1 and A^2_i = H_i W^v2 (each spot attends only to itself).
- Decoder target (``recon_target``): by default D_i reconstructs the spot's
  HVG expression V_i ("expression"); "features" reconstructs V_i and the
  spot's image features; "encoder_input" is the literal eq 1 (D_i vs E_i),
  whose target is learned with the encoder and collapses (docs/senca.md).
- No image: the shared auto-encoder encodes R alone (E_i = R_i) and, by
  default (``rna_only_target="expression"``), its decoder reconstructs the
  spot's HVG expression V_i, which makes the RNA branch the denoising graph
  auto-encoder that 3.2 describes (its dropout is the masking noise);
  ``"self"`` keeps the MSE between E_i and D_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._config import SencaConfig


def activation(name: str) -> nn.Module:
    return {"elu": nn.ELU, "relu": nn.ReLU, "gelu": nn.GELU}[name]()


class SpotSelfAttention(nn.Module):
    """Self-attention over spots: queries, keys and values from the same embeddings (3.2)."""

    def __init__(self, cfg: SencaConfig):
        super().__init__()
        self.n_head = cfg.n_heads
        self.chunk = cfg.attention_chunk
        self.c_attn = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, z: torch.Tensor, neighbors: torch.Tensor | None = None) -> torch.Tensor:
        n, e = z.shape  # (N, E)
        h, dh = self.n_head, e // self.n_head
        q, k, v = self.c_attn(z).split(e, dim=1)  # 3 x (N, E)
        if neighbors is None:
            # global: every spot attends to every spot; flash kernel, memory O(N)
            q, k, v = (t.view(n, h, dh).transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, h, N, dh)
            y = F.scaled_dot_product_attention(q, k, v)  # (1, h, N, dh)
            y = y.squeeze(0).transpose(0, 1).reshape(n, e)  # (N, E)
        else:
            # local: spot i attends to neighbors[i] (its m+1 nearest spots), chunked over queries
            parts = []
            for s in range(0, n, self.chunk):
                args = (q[s:s + self.chunk], k, v, neighbors[s:s + self.chunk], h)
                if torch.is_grad_enabled() and z.requires_grad:
                    parts.append(checkpoint(_local_attention, *args, use_reentrant=False))
                else:
                    parts.append(_local_attention(*args))
            y = torch.cat(parts, 0)  # (N, E)
        return self.c_proj(y)


def _local_attention(q, k, v, nb, h):
    """q (C, E); k, v (N, E); nb (C, M) -> (C, E): softmax over each query's M neighbours."""
    c, e = q.shape
    m, dh = nb.shape[1], e // h
    qh = q.view(c, h, 1, dh)  # (C, h, 1, dh)
    kh = k[nb].view(c, m, h, dh).transpose(1, 2)  # (C, h, M, dh)
    vh = v[nb].view(c, m, h, dh).transpose(1, 2)  # (C, h, M, dh)
    att = (qh @ kh.transpose(-2, -1)) / math.sqrt(dh)  # (C, h, 1, M)
    y = att.softmax(-1) @ vh  # (C, h, 1, dh)
    return y.reshape(c, e)


class FeedForward(nn.Module):
    """Position-wise feed-forward on every spot: E -> hidden -> E."""

    def __init__(self, cfg: SencaConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.embed_dim, cfg.hidden_dim)
        self.act = activation(cfg.activation)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.embed_dim)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class TransformerBlock(nn.Module):
    """Self-attention -> layer norm -> feed-forward (3.2); the residual is added by the caller."""

    def __init__(self, cfg: SencaConfig):
        super().__init__()
        self.attn = SpotSelfAttention(cfg)
        self.ln = nn.LayerNorm(cfg.embed_dim)
        self.ff = FeedForward(cfg)

    def forward(self, z, neighbors=None):
        return self.ff(self.ln(self.attn(z, neighbors)))  # (N, E)


class GraphTransformer(nn.Module):
    """RNA branch g (3.2): R = g(G)."""

    def __init__(self, cfg: SencaConfig, n_genes: int):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)  # also the denoising mask of the auto-encoder
        self.lin = nn.Linear(n_genes, cfg.embed_dim)
        self.block = TransformerBlock(cfg)
        self.act = activation(cfg.activation)

    def forward(self, v, adj, neighbors=None):
        z = self.lin(self.drop(v))  # (N, G) -> (N, E) learnable weights
        z = torch.sparse.mm(adj, z)  # (N, E) spatial product with the normalised adjacency
        z = z + self.block(z, neighbors)  # (N, E) transformer block with a residual around it
        return self.act(z)  # R (N, E)


class ImageBranch(nn.Module):
    """Histopathology branch (3.3): CNN patch features -> FC -> H.

    ``cnn`` is ``None`` when the (frozen, ImageNet) CNN features are cached;
    otherwise it maps preprocessed patches (N, 3, S, S) to features and is
    fine-tuned end to end.
    """

    def __init__(self, cfg: SencaConfig, feature_dim: int, cnn: nn.Module | None = None):
        super().__init__()
        self.cnn = cnn
        self.fc = nn.Linear(feature_dim, cfg.embed_dim)

    def forward(self, x):
        f = x if self.cnn is None else self.cnn(x)  # (N, F)
        if f.ndim == 4:
            f = f.mean(dim=(2, 3))
        return self.fc(f), f  # H (N, E) and the features it came from (N, F)


class CrossAttention(nn.Module):
    """softmax((Q W^q)(K W^k)^T / sqrt(E)) V W^v within each spot's neighbourhood (eqs 3, 4).

    The projections are row-wise, so they are applied to the (N, E) embeddings
    and then gathered into neighbourhoods (the same numbers as projecting the
    gathered (N, K, E) tensors, K times cheaper). Only the spot's own query row
    of the K x K attention is computed, because only that row is kept.
    """

    def __init__(self, cfg: SencaConfig):
        super().__init__()
        e = cfg.embed_dim
        self.w_q = nn.Linear(e, e, bias=False)
        self.w_k = nn.Linear(e, e, bias=False)
        self.w_v = nn.Linear(e, e, bias=False)

    def forward(self, q, k, v, neighborhood):
        # q, k, v: (N, E); neighborhood: (N, K), position 0 = the spot itself
        q_i = self.w_q(q).unsqueeze(1)  # (N, 1, E) the spot's query
        k_n = self.w_k(k)[neighborhood]  # (N, K, E) keys of the spot and its neighbours
        v_n = self.w_v(v)[neighborhood]  # (N, K, E) values
        att = q_i @ k_n.transpose(1, 2) / math.sqrt(k_n.shape[-1])  # (N, 1, K)
        return (att.softmax(-1) @ v_n).squeeze(1)  # (N, E) the spot's row A_i


class SharedEncoder(nn.Module):
    """Cross-attention shared encoder (3.4): projections, two cross-attentions, encoder e, decoder."""

    def __init__(self, cfg: SencaConfig, with_image: bool, cross_attention: bool = True, n_genes: int = 0,
                 image_dim: int = 0):
        super().__init__()
        e = cfg.embed_dim
        self.with_image = with_image
        self.cross_attention = cross_attention
        self.combine = cfg.combine
        if with_image:
            self.proj_r = nn.Linear(e, e)  # R_n -> R_{n,p}
            self.proj_h = nn.Linear(e, e)  # H_n -> H_{n,p}
            self.attn1 = CrossAttention(cfg)  # eq 3: image queries RNA
            self.attn2 = CrossAttention(cfg)  # eq 4: RNA queries image
        d_in = (2 * e if cfg.combine == "concat" else e) if with_image else e
        d_out = {"expression": n_genes, "self": d_in, "encoder_input": d_in,
                 "features": n_genes + image_dim}[target_kind(cfg, with_image)]
        act = activation(cfg.activation)
        self.encoder = nn.Sequential(  # e: dimension reducing
            nn.Linear(d_in, cfg.shared_hidden_dim), act, nn.Linear(cfg.shared_hidden_dim, cfg.shared_dim))
        self.decoder = nn.Sequential(  # dimension growing
            nn.Linear(cfg.shared_dim, cfg.shared_hidden_dim), activation(cfg.activation),
            nn.Linear(cfg.shared_hidden_dim, d_out))

    def forward(self, r, h, neighborhood):
        # r, h: (N, E); neighborhood: (N, K) with the spot itself first
        if not self.with_image:
            e_in = r  # RNA branch alone: E_i = R_i (N, E)
        else:
            if self.cross_attention:
                r_p, h_p = self.proj_r(r), self.proj_h(h)  # R_{n,p}, H_{n,p} before the gather (N, E)
                a1 = self.attn1(q=h_p, k=r_p, v=r, neighborhood=neighborhood)  # eq 3: A^1_i (N, E)
                a2 = self.attn2(q=r_p, k=h_p, v=h, neighborhood=neighborhood)  # eq 4: A^2_i (N, E)
            else:  # ablation: no attention weights, each spot keeps its own values
                a1, a2 = self.attn1.w_v(r), self.attn2.w_v(h)  # (N, E)
            e_in = torch.cat([a1, a2], dim=1) if self.combine == "concat" else a1 + a2  # E_i
        s = self.encoder(e_in)  # eq 2: S_i = e(...)  (N, shared_dim)
        d = self.decoder(s)  # D_i (N, 2E), (N, E), or (N, G) for the RNA-only expression target
        return s, e_in, d


@dataclass
class SencaOutput:
    r: torch.Tensor  #: (N, E) RNA embeddings R
    h: torch.Tensor | None  #: (N, E) image embeddings H (None without an image)
    s: torch.Tensor  #: (N, shared_dim) shared embeddings S
    e_in: torch.Tensor  #: encoder input E_i
    d: torch.Tensor  #: decoder output D_i
    target: torch.Tensor  #: what D_i is compared with: V_i, [V_i, image features] or E_i
    split: int | None = None  #: "features": columns < split are V_i, the rest image features (two MSE blocks)


def target_kind(cfg: SencaConfig, with_image: bool) -> str:
    """What the decoder reconstructs: "expression", "features", "encoder_input" or "self" (no image)."""
    return cfg.recon_target if with_image else cfg.rna_only_target


class SENCA(nn.Module):
    """SENCA-st (Figure 1)."""

    def __init__(self, cfg: SencaConfig, n_genes: int, image_dim: int | None = None, *,
                 cross_attention: bool = True, cnn: nn.Module | None = None):
        super().__init__()
        self.rna = GraphTransformer(cfg, n_genes)
        self.image = None if image_dim is None else ImageBranch(cfg, image_dim, cnn)
        self.target_kind = target_kind(cfg, image_dim is not None)
        self.shared = SharedEncoder(cfg, with_image=image_dim is not None, cross_attention=cross_attention,
                                    n_genes=n_genes, image_dim=image_dim or 0)

    def forward(self, v, adj, neighborhood, image=None, attention_neighbors=None) -> SencaOutput:
        r = self.rna(v, adj, attention_neighbors)  # R = g(G)  (N, E)
        h, f = (None, None) if self.image is None else self.image(image)  # H (N, E), image features (N, F)
        s, e_in, d = self.shared(r, h, neighborhood)  # eqs 2-4
        kind = self.target_kind
        target = {"expression": v, "features": None if f is None else torch.cat([v, f.detach()], 1)}.get(kind, e_in)
        return SencaOutput(r=r, h=h, s=s, e_in=e_in, d=d, target=target,
                           split=v.shape[1] if kind == "features" else None)
