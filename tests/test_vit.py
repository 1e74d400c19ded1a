"""ViT presets: published key layouts and shapes, strict loading, and the forward against an independent reference."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import stmorph  # noqa: E402
from stmorph.errors import DependencyError  # noqa: E402
from stmorph.im import encoders  # noqa: E402
from stmorph.im.encoders import vit  # noqa: E402

# Published architecture of each model, written out independently of vit.PRESETS:
# (patch, width, depth, heads, fc1 rows, fc2 cols, registers, pos_embed length, layer scale, embedding dim)
PUBLISHED = {
    "uni": (16, 1024, 24, 16, 4096, 4096, 0, 197, True, 1024),  # vit_large_patch16_224, init_values=1e-5
    "uni2_h": (14, 1536, 24, 24, 8192, 4096, 8, 256, True, 1536),  # SwiGLUPacked, reg 8, no_embed_class
    "virchow2": (14, 1280, 32, 16, 6832, 3416, 4, 261, True, 2560),  # vit_huge_patch14_224, mlp_ratio 5.3375
    "h_optimus_0": (14, 1536, 40, 24, 8192, 4096, 4, 256, True, 1536),  # vit_giant_patch14_reg4_dinov2
    "phikon_v2": (16, 1024, 24, 16, 4096, 4096, 0, 197, True, 1024),  # Dinov2Model ViT-L/16 at 224
    "gigapath": (16, 1536, 40, 24, 8192, 4096, 0, 197, True, 1536),  # vit_giant_patch14_dinov2, patch 16
    "conch_vision": (16, 768, 12, 12, 3072, 3072, 0, 785, False, 512),  # ViT-B/16 at 448 + attentional pooler
}


def timm_layout(name: str, depth: int | None = None) -> dict[str, tuple]:
    """Key -> shape of a timm ``VisionTransformer(num_classes=0)`` checkpoint with the published numbers."""
    p, d, depth_pub, _, fc1, fc2, reg, n_pos, ls, _ = PUBLISHED[name]
    depth = depth_pub if depth is None else depth
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, n_pos, d), "patch_embed.proj.weight": (d, 3, p, p),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    if reg:
        keys["reg_token"] = (1, reg, d)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (fc1, d),
                     b + "mlp.fc1.bias": (fc1,), b + "mlp.fc2.weight": (d, fc2), b + "mlp.fc2.bias": (d,)})
        if ls:
            keys.update({b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)})
    if name == "conch_vision":
        keys.update({"attn_pool_contrast.query": (1, 512), "attn_pool_contrast.attn.q_proj_weight": (512, 512),
                     "attn_pool_contrast.attn.k_proj_weight": (512, d),
                     "attn_pool_contrast.attn.v_proj_weight": (512, d),
                     "attn_pool_contrast.attn.in_proj_bias": (3 * 512,),
                     "attn_pool_contrast.attn.out_proj.weight": (512, 512),
                     "attn_pool_contrast.attn.out_proj.bias": (512,),
                     "attn_pool_contrast.ln_q.weight": (512,), "attn_pool_contrast.ln_q.bias": (512,),
                     "attn_pool_contrast.ln_k.weight": (d,), "attn_pool_contrast.ln_k.bias": (d,),
                     "ln_contrast.weight": (512,), "ln_contrast.bias": (512,)})
    return keys


def published_file(name: str, depth: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights in the layout the model's own file uses (timm; HF Dinov2 for Phikon-v2; CoCa for CONCH)."""
    sd = {k: torch.randn(s, generator=gen) * 0.05 for k, s in timm_layout(name, depth).items()}
    if name == "phikon_v2":  # transformers Dinov2Model names, q/k/v separate
        d = PUBLISHED[name][1]
        hf = {"embeddings.cls_token": sd.pop("cls_token"), "embeddings.mask_token": torch.zeros(1, d),
              "embeddings.position_embeddings": sd.pop("pos_embed"),
              "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
              "embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
              "layernorm.weight": sd.pop("norm.weight"), "layernorm.bias": sd.pop("norm.bias")}
        for i in range(depth):
            b, h = f"blocks.{i}.", f"encoder.layer.{i}."
            for part in ("weight", "bias"):
                q, k, v = sd.pop(b + f"attn.qkv.{part}").chunk(3, dim=0)
                hf.update({h + f"attention.attention.query.{part}": q, h + f"attention.attention.key.{part}": k,
                           h + f"attention.attention.value.{part}": v,
                           h + f"attention.output.dense.{part}": sd.pop(b + f"attn.proj.{part}")})
                for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                    hf[h + f"{n}.{part}"] = sd.pop(b + f"{n}.{part}")
            hf[h + "layer_scale1.lambda1"] = sd.pop(b + "ls1.gamma")
            hf[h + "layer_scale2.lambda1"] = sd.pop(b + "ls2.gamma")
        assert not sd
        return hf
    if name == "conch_vision":  # the whole CoCa model: image trunk under visual.trunk, plus text tower etc.
        out = {("visual." if k.startswith(("attn_pool", "ln_contrast")) else "visual.trunk.") + k: v
               for k, v in sd.items()}
        out.update({"visual.proj_contrast": torch.randn(512, 512, generator=gen),
                    "visual.attn_pool_caption.query": torch.randn(256, 768, generator=gen),
                    "text.token_embedding.weight": torch.randn(10, 768, generator=gen),
                    "logit_scale": torch.ones(())})
        return out
    return sd


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_depth_layout_matches_published(name):
    """Every key and shape of the full-size model (built on the meta device: no memory) as published."""
    with torch.device("meta"):
        model = vit.VisionTransformer(vit.PRESETS[name].cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = timm_layout(name)
    assert got == want
    assert vit.PRESETS[name].cfg.out_dim == PUBLISHED[name][-1]


def _save(sd: dict, path, fmt: str) -> None:
    if fmt == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        st.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_file_loads_strictly(name, tmp_path):
    """Random weights in the model's own file layout load with no missing/unexpected key, values intact."""
    gen = torch.Generator().manual_seed(0)
    depth = 1 if PUBLISHED[name][1] >= 1280 else 2
    sd = published_file(name, depth, gen)
    fmt = "bin" if name in ("conch_vision", "uni") else "safetensors"
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'bin'}"
    _save(sd, path, fmt)
    enc = encoders.get_encoder(name, weights=path, depth=depth)
    assert enc.name == name and enc.dim == PUBLISHED[name][-1]
    assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    msd = enc.model.state_dict()
    assert set(msd) == set(timm_layout(name, depth))
    if name == "phikon_v2":  # q, k, v stacked in that order into qkv
        qkv = torch.cat([sd[f"encoder.layer.0.attention.attention.{n}.weight"] for n in ("query", "key", "value")])
        assert torch.equal(msd["blocks.0.attn.qkv.weight"], qkv)
        assert torch.equal(msd["blocks.0.ls2.gamma"], sd["encoder.layer.0.layer_scale2.lambda1"])
    elif name == "conch_vision":
        assert torch.equal(msd["blocks.0.mlp.fc1.weight"], sd["visual.trunk.blocks.0.mlp.fc1.weight"])
    else:
        assert all(torch.equal(msd[k], sd[k]) for k in sd)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (2, enc.input_size, enc.input_size, 3), dtype=np.uint8)
    with torch.inference_mode():
        y = enc(enc.preprocess(patches))
    assert y.shape == (2, PUBLISHED[name][-1]) and torch.isfinite(y).all() and y.dtype == torch.float32


def test_wrong_checkpoint_is_one_line_error(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = published_file("uni", 2, gen)
    del sd["blocks.1.ls2.gamma"]
    sd["head.weight"] = torch.zeros(3, 1024)
    path = tmp_path / "uni.safetensors"
    _save(sd, path, "safetensors")
    with pytest.raises(DependencyError, match=r"not a uni checkpoint.*1 missing keys \['blocks.1.ls2.gamma'\].*"
                                              r"1 unexpected keys \['head.weight'\]") as e:
        encoders.get_encoder("uni", weights=path, depth=2)
    assert "\n" not in str(e.value)
    sd = published_file("virchow2", 1, gen)  # a Virchow2 file given as UNI2-h: shapes differ
    _save(sd, path, "safetensors")
    with pytest.raises(DependencyError, match="not a uni2_h checkpoint"):
        encoders.get_encoder("uni2_h", weights=path, depth=1)


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("STMORPH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("STMORPH_H_OPTIMUS_0_WEIGHTS", raising=False)
    with pytest.raises(DependencyError) as e:
        encoders.get_encoder("h_optimus_0")
    msg = str(e.value)
    assert "never downloads" in msg and str(tmp_path / "h_optimus_0") in msg and "STMORPH_H_OPTIMUS_0_WEIGHTS" in msg
    assert "huggingface.co/bioptimus/H-optimus-0" in msg and "\n" not in msg
    # a file in the folder (or the environment variable) is picked up
    gen = torch.Generator().manual_seed(1)
    (tmp_path / "uni").mkdir()
    _save(published_file("uni", 1, gen), tmp_path / "uni" / "model.safetensors", "safetensors")
    assert vit.find_weights("uni") == str(tmp_path / "uni" / "model.safetensors")
    monkeypatch.setenv("STMORPH_UNI_WEIGHTS", str(tmp_path / "nope.bin"))
    with pytest.raises(DependencyError, match="nope.bin: uni weights file not found"):
        vit.find_weights("uni")


def test_safetensors_reader_matches_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
          "c": torch.randn(2, 2, generator=gen).half(), "d": torch.arange(6).reshape(2, 3), "e": torch.zeros(0)}
    st.save_file(sd, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    got = vit.read_safetensors(tmp_path / "x.safetensors")
    ref = st.load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(ref) == set(sd)
    for k in sd:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k])
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(DependencyError, match="not a readable safetensors file"):
        vit.read_safetensors(tmp_path / "bad.safetensors")


# -- the forward against an independent reference ------------------------------
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def reference_forward(sd: dict, cfg: vit.ViTConfig, x: torch.Tensor) -> torch.Tensor:
    """The same ViT from the state dict alone: unfold patches, nn.MultiheadAttention, explicit LayerNorm/MLP."""
    p, d = cfg.patch_size, cfg.embed_dim
    b = x.shape[0]
    cols = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, 3*p*p), rows first
    tok = cols @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    prefix = [sd["cls_token"].expand(b, 1, d)] + ([sd["reg_token"].expand(b, -1, d)] if cfg.reg_tokens else [])
    if cfg.no_embed_class:
        tok = torch.cat(prefix + [tok + sd["pos_embed"]], 1)
    else:
        tok = torch.cat(prefix + [tok], 1) + sd["pos_embed"]
    for i in range(cfg.depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        mha = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(g("attn.qkv.weight"))
            mha.in_proj_bias.copy_(g("attn.qkv.bias"))
            mha.out_proj.weight.copy_(g("attn.proj.weight"))
            mha.out_proj.bias.copy_(g("attn.proj.bias"))
        h = _ln(tok, g("norm1.weight"), g("norm1.bias"), cfg.norm_eps)
        a = mha(h, h, h, need_weights=False)[0]
        tok = tok + (a * g("ls1.gamma") if cfg.init_values else a)
        h = _ln(tok, g("norm2.weight"), g("norm2.bias"), cfg.norm_eps) @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        if cfg.swiglu:
            half = h.shape[-1] // 2
            h = h[..., :half] * torch.sigmoid(h[..., :half]) * h[..., half:]
        else:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        m = h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        tok = tok + (m * g("ls2.gamma") if cfg.init_values else m)
    n_pre = cfg.num_prefix_tokens
    if cfg.pool == "avg":
        return _ln(tok[:, n_pre:].mean(1), sd["fc_norm.weight"], sd["fc_norm.bias"], cfg.norm_eps)
    tok = _ln(tok, sd["norm.weight"], sd["norm.bias"], cfg.norm_eps)
    if cfg.pool == "token":
        return tok[:, 0]
    if cfg.pool == "token+mean":
        return torch.cat([tok[:, 0], tok[:, n_pre:].mean(1)], -1)
    # CONCH attentional pooler, by hand
    k_in = _ln(tok, sd["attn_pool_contrast.ln_k.weight"], sd["attn_pool_contrast.ln_k.bias"], 1e-5)
    q_in = _ln(sd["attn_pool_contrast.query"], sd["attn_pool_contrast.ln_q.weight"],
               sd["attn_pool_contrast.ln_q.bias"], 1e-5)
    bq, bk, bv = sd["attn_pool_contrast.attn.in_proj_bias"].chunk(3)
    q = q_in @ sd["attn_pool_contrast.attn.q_proj_weight"].T + bq  # (1, P)
    k = k_in @ sd["attn_pool_contrast.attn.k_proj_weight"].T + bk  # (B, N, P)
    v = k_in @ sd["attn_pool_contrast.attn.v_proj_weight"].T + bv
    hds, dh = cfg.pool_heads, cfg.pool_dim // cfg.pool_heads
    qh = q.reshape(1, hds, dh).transpose(0, 1)  # (H, 1, dh)
    kh = k.reshape(b, -1, hds, dh).permute(0, 2, 1, 3)  # (B, H, N, dh)
    vh = v.reshape(b, -1, hds, dh).permute(0, 2, 1, 3)
    att = torch.softmax(qh.unsqueeze(0) @ kh.transpose(-1, -2) / math.sqrt(dh), -1)  # (B, H, 1, N)
    o = (att @ vh).permute(0, 2, 1, 3).reshape(b, cfg.pool_dim)
    o = o @ sd["attn_pool_contrast.attn.out_proj.weight"].T + sd["attn_pool_contrast.attn.out_proj.bias"]
    return _ln(o, sd["ln_contrast.weight"], sd["ln_contrast.bias"], 1e-5)


TINY = {
    "gelu_layerscale_cls": vit.ViTConfig(32, 8, 48, 2, 4, 4.0, init_values=0.5),
    "swiglu_registers_no_embed_class": vit.ViTConfig(32, 8, 48, 2, 4, 2.66667 * 2, swiglu=True, init_values=0.3,
                                                     reg_tokens=3, no_embed_class=True),
    "virchow_token_mean": vit.ViTConfig(28, 7, 32, 3, 4, 5.3375, swiglu=True, init_values=0.7, reg_tokens=4,
                                        pool="token+mean"),
    "avg_fc_norm": vit.ViTConfig(32, 8, 48, 2, 6, 4.0, pool="avg"),
    "conch_pooler": vit.ViTConfig(32, 8, 48, 2, 4, 4.0, pool="conch", pool_dim=16, pool_heads=4),
}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_forward_matches_independent_reference(kind):
    cfg = TINY[kind]
    torch.manual_seed(0)
    model = vit.VisionTransformer(cfg).eval()
    with torch.no_grad():  # every parameter random (layer norms and layer scales too)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    with torch.inference_mode():
        got = model(x)
    with torch.no_grad():
        ref = reference_forward(sd, cfg, x)
    assert got.shape == (3, cfg.out_dim)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_hf_dinov2_conversion_matches_reference():
    """Phikon-v2's layout: separate q/k/v and layer_scale*.lambda1, converted, same forward as timm layout."""
    cfg = TINY["gelu_layerscale_cls"]
    torch.manual_seed(1)
    model = vit.VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = model.state_dict()
    hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
          "embeddings.mask_token": torch.zeros(1, 48),
          "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            for n, t in zip(("query", "key", "value"), sd[b + f"attn.qkv.{part}"].chunk(3)):
                hf[h + f"attention.attention.{n}.{part}"] = t
            hf[h + f"attention.output.dense.{part}"] = sd[b + f"attn.proj.{part}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[h + f"{n}.{part}"] = sd[b + f"{n}.{part}"]
        hf[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        hf[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    conv = vit.convert_state_dict({"dinov2." + k: v for k, v in hf.items()}, "hf_dinov2")
    assert set(conv) == set(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)


def test_other_input_size_resamples_positions():
    cfg = TINY["gelu_layerscale_cls"]
    torch.manual_seed(0)
    model = vit.VisionTransformer(cfg).eval()
    with torch.inference_mode():
        y = model(torch.randn(2, 3, 48, 48))  # 6 x 6 grid instead of 4 x 4
        same = model(torch.randn(2, 3, 32, 32))
    assert y.shape == same.shape == (2, cfg.out_dim)
    pos = vit.resample_pos_embed(model.pos_embed.detach(), (4, 4), 1)
    assert torch.equal(pos, model.pos_embed.detach())  # the trained grid is kept as is


def test_vit_features_record_weights_sha256(tmp_path):
    """features() with a ViT preset (shallow copy of UNI's layout) stores the file's SHA-256 with the features."""
    from test_features import _adata

    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "uni.safetensors"
    _save(published_file("uni", 1, gen), path, "safetensors")
    enc = encoders.get_encoder("uni", weights=path, depth=1)
    a = _adata()
    stmorph.im.features(a, enc, cache=False, progress=False, precision="float32")
    assert a.obsm["X_image"].shape == (a.n_obs, 1024) and np.isfinite(a.obsm["X_image"]).all()
    assert a.uns["X_image"]["params"]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert a.uns["X_image"]["params"]["encoder"] == "uni" and a.uns["X_image"]["params"]["input_size"] == 224
