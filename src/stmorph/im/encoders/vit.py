"""Vision transformers in plain PyTorch, loading the pathology foundation models' published weights.

The module layout and therefore the state-dict keys are those of timm's
``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``reg_token``,
``pos_embed``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``, ``fc_norm``), so a checkpoint written
by ``timm.create_model(...).state_dict()`` loads here unchanged, without timm.
The options the models need are covered: layer scale (``init_values``),
register tokens, position embeddings with or without the prefix tokens
(``no_embed_class``), the SwiGLU MLP packed into one ``fc1`` (timm's
``SwiGLUPacked``: ``fc1`` outputs both halves, ``silu(first) * second``), and
the embedding each model defines (class token; class token concatenated with the
mean patch token; CONCH's attentional pooler).

Presets (:data:`PRESETS`), each with its published configuration
(``timm.create_model`` arguments from the model cards / ``config.json``):

========================  =========  =====  =====  =====  ==========================  =====
name                      arch       input  depth  width  embedding                   dim
========================  =========  =====  =====  =====  ==========================  =====
``uni``                   ViT-L/16   224    24     1024   class token                 1024
``uni2_h``                ViT-H/14*  224    24     1536   class token (8 registers)   1536
``virchow2``              ViT-H/14   224    32     1280   class + mean patch tokens   2560
``h_optimus_0``           ViT-g/14   224    40     1536   class token (4 registers)   1536
``phikon_v2``             ViT-L/16   224    24     1024   class token (HF Dinov2)     1024
``gigapath``              ViT-g/16   224    40     1536   class token                 1536
``conch_vision``          ViT-B/16   448    12     768    attentional pooler          512
========================  =========  =====  =====  =====  ==========================  =====

(* UNI2-h: 24 blocks of width 1536 with a SwiGLU MLP.) Weights are never
downloaded: get each file from its model page under its licence and either pass
``weights=FILE``, set ``STMORPH_<NAME>_WEIGHTS`` (e.g. ``STMORPH_UNI_WEIGHTS``),
or put it in ``$STMORPH_WEIGHTS_DIR/<name>/`` (default
``~/.cache/stmorph/weights/<name>/``) as ``model.safetensors`` or
``pytorch_model.bin``. safetensors files are read without executing anything;
``.bin``/``.pth`` only with ``torch.load(weights_only=True)``. The file's
SHA-256 is recorded with the features. Phikon-v2 is published in Hugging Face
``Dinov2Model`` layout and CONCH as the whole CoCa model: both are converted to
this layout on load (CONCH: the ``visual.`` part only).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DependencyError, InputError
from ._layers import prepare_for_inference
from ._registry import IMAGENET_MEAN, IMAGENET_STD, Encoder, file_sha256, load_state_dict

__all__ = ["ViTConfig", "VisionTransformer", "PRESETS", "vit_encoder", "load_vit", "read_safetensors",
           "convert_state_dict", "find_weights"]

POOLS = ("token", "avg", "token+mean", "conch")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT (the arguments of timm's ``VisionTransformer`` that matter here)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    swiglu: bool = False  #: timm SwiGLUPacked MLP (``fc1`` holds both halves) with SiLU
    qkv_bias: bool = True
    init_values: float | None = None  #: layer scale (``ls1.gamma``/``ls2.gamma``) when set
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  #: position embeddings cover the patch tokens only
    norm_eps: float = 1e-6
    pool: str = "token"  #: "token", "avg" (fc_norm of the mean patch token), "token+mean", "conch"
    # CONCH's attentional pooler (pool="conch")
    pool_dim: int = 512
    pool_heads: int = 8

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # as timm: int(dim * mlp_ratio)

    @property
    def out_dim(self) -> int:
        if self.pool == "conch":
            return self.pool_dim
        return 2 * self.embed_dim if self.pool == "token+mean" else self.embed_dim


# -- building blocks (one job each) ---------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens, as a strided convolution (key ``patch_embed.proj``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), rows first


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (timm's ``Attention``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d_head)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, or timm's SwiGLUPacked: fc1 -> (silu(a) * b) -> fc2 with [a, b] = fc1 output."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = cfg.mlp_hidden
        self.swiglu = cfg.swiglu
        if self.swiglu and hidden % 2:
            msg = f"a SwiGLU MLP needs an even hidden width; embed_dim * mlp_ratio = {hidden}."
            raise InputError(msg)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if self.swiglu else hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, hidden)
        if self.swiglu:
            a, b = h.chunk(2, dim=-1)  # gate first (timm gate_last=False)
            h = F.silu(a) * b  # (B, N, hidden / 2)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (key ``gamma``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        ls = (lambda: LayerScale(cfg.embed_dim, cfg.init_values)) if cfg.init_values else nn.Identity
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = ls()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = ls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionalPooler(nn.Module):
    """CONCH's pooler: learned queries cross-attend to the layer-normed tokens (keys as in CONCH)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)  # CONCH uses torch's default eps here
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.ln_k(x)  # (B, N, C)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, d)
        return self.attn(q, k, k, need_weights=False)[0]  # (B, Q, d)


def resample_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
    """Bicubic resampling of the patch part of ``pos_embed`` (1, n_prefix + g*g, D) to ``new_grid``."""
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    g = int(round(math.sqrt(grid.shape[1])))
    if g * g != grid.shape[1]:
        msg = f"pos_embed has {grid.shape[1]} patch positions, not a square grid."
        raise InputError(msg)
    if (g, g) == tuple(new_grid):
        return pos
    grid = grid.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    """ViT with timm's module names; ``forward`` returns the model's embedding ``(B, out_dim)`` in float32.

    Inputs whose side differs from ``cfg.img_size`` (a multiple of the patch
    size) get bicubically resampled position embeddings, as timm's
    ``dynamic_img_size=True``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pool not in POOLS:
            raise InputError(f"pool must be one of {POOLS}; got {cfg.pool!r}.")
        if cfg.embed_dim % cfg.num_heads:
            raise InputError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}.")
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        n_pos = cfg.grid**2 + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        avg = cfg.pool == "avg"  # timm: final norm moves after pooling (fc_norm) for average pooling
        self.norm = nn.Identity() if avg else nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if avg else nn.Identity()
        if cfg.pool == "conch":
            self.attn_pool_contrast = AttentionalPooler(cfg.pool_dim, d, cfg.pool_heads)
            self.ln_contrast = nn.LayerNorm(cfg.pool_dim)
        self._init_random()

    @torch.no_grad()
    def _init_random(self) -> None:
        """Small random tokens and positions (real weights come from a file; this keeps a fresh model generic)."""
        for p in (self.cls_token, self.reg_token, self.pos_embed, getattr(self, "attn_pool_contrast", None)):
            if isinstance(p, AttentionalPooler):
                p = p.query
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, S, S)`` -> normalised tokens ``(B, prefix + N, D)`` (timm's ``forward_features``)."""
        cfg = self.cfg
        b, _, h, w = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            msg = f"input side {h} x {w} is not a multiple of the patch size {p}."
            raise InputError(msg)
        x = self.patch_embed(x)  # (B, N, D)
        pos = self.pos_embed
        if (h // p, w // p) != (cfg.grid, cfg.grid):
            pos = resample_pos_embed(pos, (h // p, w // p), 0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if cfg.no_embed_class:  # positions for patches only: add, then prepend class/register tokens
            x = torch.cat(prefix + [x + pos], dim=1)
        else:  # positions for every token: prepend, then add
            x = torch.cat(prefix + [x], dim=1) + pos
        x = self.blocks(x)  # (B, prefix + N, D)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> the embedding the model defines."""
        cfg = self.cfg
        if cfg.pool == "token":
            return x[:, 0]  # (B, D)
        if cfg.pool == "avg":
            return self.fc_norm(x[:, cfg.num_prefix_tokens:].mean(dim=1))
        if cfg.pool == "token+mean":  # Virchow2: class token, mean of the patch tokens (registers skipped)
            return torch.cat([x[:, 0], x[:, cfg.num_prefix_tokens:].mean(dim=1)], dim=-1)  # (B, 2D)
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])  # CONCH, before proj_contrast: (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x)).float()


# -- presets -------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A published model: architecture, input normalisation, checkpoint layout and where to get it."""

    cfg: ViTConfig
    mean: tuple[float, float, float]  # 0..1 units, RGB
    std: tuple[float, float, float]
    source: str  # model page
    layout: str = "timm"  # "timm", "hf_dinov2" (Phikon-v2), "conch" (CoCa checkpoint, visual.* used)
    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


_IMNET = tuple(m / 255 for m in IMAGENET_MEAN), tuple(s / 255 for s in IMAGENET_STD)
_OPENAI_CLIP = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

#: Published configurations. Sources: each model card's ``timm.create_model`` call /
#: ``config.json`` (UNI: vit_large_patch16_224 init_values=1e-5; UNI2-h: patch 14, depth 24,
#: 24 heads, width 1536, mlp_ratio 2.66667*2 SwiGLUPacked, 8 registers, no_embed_class;
#: Virchow2: vit_huge_patch14_224, mlp_ratio 5.3375 SwiGLUPacked, 4 registers, embedding =
#: [class token, mean of patch tokens]; H-optimus-0: vit_giant_patch14_reg4_dinov2 at 224 with
#: its own mean/std; Prov-GigaPath: vit_giant_patch14_dinov2 with patch 16, mlp_ratio 5.33334;
#: Phikon-v2: Dinov2Model ViT-L/16 at 224; CONCH: conch_ViT-B-16.json, 448 px, attentional
#: pooler of width 512 with 8 heads, encode_image(proj_contrast=False, normalize=False)).
PRESETS: dict[str, Preset] = {
    "uni": Preset(ViTConfig(224, 16, 1024, 24, 16, 4.0, init_values=1e-5), *_IMNET,
                  "https://huggingface.co/MahmoodLab/UNI"),
    "uni2_h": Preset(ViTConfig(224, 14, 1536, 24, 24, 2.66667 * 2, swiglu=True, init_values=1e-5, reg_tokens=8,
                               no_embed_class=True), *_IMNET, "https://huggingface.co/MahmoodLab/UNI2-h"),
    "virchow2": Preset(ViTConfig(224, 14, 1280, 32, 16, 5.3375, swiglu=True, init_values=1e-5, reg_tokens=4,
                                 pool="token+mean"), *_IMNET, "https://huggingface.co/paige-ai/Virchow2"),
    "h_optimus_0": Preset(ViTConfig(224, 14, 1536, 40, 24, 2.66667 * 2, swiglu=True, init_values=1e-5, reg_tokens=4,
                                    no_embed_class=True),
                          (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517),
                          "https://huggingface.co/bioptimus/H-optimus-0"),
    "phikon_v2": Preset(ViTConfig(224, 16, 1024, 24, 16, 4.0, init_values=1.0), *_IMNET,
                        "https://huggingface.co/owkin/phikon-v2", layout="hf_dinov2"),
    "gigapath": Preset(ViTConfig(224, 16, 1536, 40, 24, 5.33334, swiglu=True, init_values=1e-5), *_IMNET,
                       "https://huggingface.co/prov-gigapath/prov-gigapath"),
    "conch_vision": Preset(ViTConfig(448, 16, 768, 12, 12, 4.0, pool="conch"), *_OPENAI_CLIP,
                           "https://huggingface.co/MahmoodLab/CONCH", layout="conch",
                           files=("pytorch_model.bin", "model.safetensors")),
}


# -- weights files ---------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (a JSON header, then raw little-endian data; nothing is executed)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8: 8 + n])
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            buf = bytearray(raw[base + start: base + end])  # writable copy: the tensor owns its memory
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        msg = f"{path}: not a readable safetensors file ({type(e).__name__}: {e})."
        raise DependencyError(msg) from e
    return out


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict from ``.safetensors`` (preferred) or ``.bin``/``.pth``/``.pt`` (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DependencyError(f"{path}: weights file not found.")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return load_state_dict(path)


def weights_dir() -> str:
    """``$STMORPH_WEIGHTS_DIR`` or ``~/.cache/stmorph/weights``."""
    return os.environ.get("STMORPH_WEIGHTS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "stmorph",
                                                                 "weights")


def find_weights(name: str, weights: str | os.PathLike | None = None) -> str:
    """The weights file of preset ``name``: ``weights``, ``$STMORPH_<NAME>_WEIGHTS``, or the weights folder."""
    preset = PRESETS[name]
    env = f"STMORPH_{name.upper()}_WEIGHTS"
    path = weights if weights is not None else os.environ.get(env)
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DependencyError(f"{path}: {name} weights file not found.")
        return path
    folder = os.path.join(weights_dir(), name)
    for f in preset.files:
        if os.path.isfile(os.path.join(folder, f)):
            return os.path.join(folder, f)
    msg = (f"{name} weights not found (stmorph never downloads): get {preset.files[-1]} from {preset.source} "
           f"under its licence and put it in {folder}/, or set {env}=FILE, or pass weights=FILE.")
    raise DependencyError(msg)


def _hf_dinov2_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` keys -> timm keys (q, k, v concatenated into ``qkv``)."""
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            layers.setdefault(int(i), {})[rest] = v
        elif k in ("embeddings.mask_token",):  # masked-image training only
            continue
        else:
            out[k] = v  # left for the strict check to report
    ren = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
           "norm2.bias": "norm2.bias", "attention.output.dense.weight": "attn.proj.weight",
           "attention.output.dense.bias": "attn.proj.bias", "layer_scale1.lambda1": "ls1.gamma",
           "layer_scale2.lambda1": "ls2.gamma", "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
           "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}
    for i, d in sorted(layers.items()):
        p = f"blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [d.pop(f"attention.attention.{n}.{part}", None) for n in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                out[p + f"attn.qkv.{part}"] = torch.cat(qkv, dim=0)
        for k, v in d.items():
            out[p + ren.get(k, k)] = v
    return out


def convert_state_dict(sd: Mapping[str, torch.Tensor], layout: str = "timm") -> dict[str, torch.Tensor]:
    """A published checkpoint's state dict in this module's (timm's) key layout."""
    sd = dict(sd)
    for wrap in ("state_dict", "model"):  # training checkpoints nest the weights
        if wrap in sd and isinstance(sd[wrap], Mapping):
            sd = dict(sd[wrap])
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if layout == "hf_dinov2":
        if any(k.startswith("dinov2.") for k in sd):
            sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
        return _hf_dinov2_to_timm(sd)
    if layout == "conch":  # CoCa: keep the image tower's trunk and contrastive pooler
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")} or sd
        out = {k[len("trunk."):]: v for k, v in vis.items() if k.startswith("trunk.")}
        out.update({k: v for k, v in vis.items() if k.startswith(("attn_pool_contrast.", "ln_contrast."))})
        return out
    return sd


def load_vit(name: str, weights: str | os.PathLike | None = None, *, depth: int | None = None,
             prepare: bool = True) -> tuple[VisionTransformer, str, str]:
    """Preset ``name`` with its weights: ``(model, path, sha256)``.

    ``depth`` overrides the number of blocks (tests use a shallow copy of a
    preset's layout). Every key of the file must match the model: a missing or
    unexpected key, or a shape mismatch, is an error naming the first ones.
    A ``pos_embed`` for another grid is resampled (as timm does on load).
    """
    if name not in PRESETS:
        raise InputError(f"unknown ViT preset {name!r}; available: {sorted(PRESETS)}.")
    preset = PRESETS[name]
    cfg = preset.cfg if depth is None else replace(preset.cfg, depth=int(depth))
    path = find_weights(name, weights)
    sha = file_sha256(path)
    sd = convert_state_dict(read_weights(path), preset.layout)
    model = VisionTransformer(cfg)
    pos = sd.get("pos_embed")
    if (isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape != model.pos_embed.shape
            and pos.shape[-1] == cfg.embed_dim):  # trained on another grid: resample (else the check below reports it)
        with contextlib.suppress(InputError):
            sd["pos_embed"] = resample_pos_embed(pos, (cfg.grid, cfg.grid),
                                                 0 if cfg.no_embed_class else cfg.num_prefix_tokens)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        msg = (f"not a {name} checkpoint ({preset.source}): {len(missing)} missing keys {missing[:3]}, "
               f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} shape mismatches {wrong[:2]}.")
        raise DependencyError(f"{path}: {msg}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    if prepare:
        prepare_for_inference(model, fuse=False, channels_last=False)
    return model, path, sha


def vit_encoder(name: str, weights: str | os.PathLike | None = None, *, depth: int | None = None) -> Encoder:
    """Registry factory of a ViT preset (see the module docstring)."""
    preset = PRESETS[name]
    model, _, sha = load_vit(name, weights, depth=depth)
    cfg = model.cfg
    return Encoder(
        name=name,
        model=model,
        input_size=cfg.img_size,
        mean=tuple(255.0 * m for m in preset.mean),
        std=tuple(255.0 * s for s in preset.std),
        dim=cfg.out_dim,
        bgr=False,
        weights_sha256=sha,
        preprocessing=f"mean={list(preset.mean)} std={list(preset.std)} RGB, {cfg.img_size} px",
    )
