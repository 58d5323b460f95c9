"""The one shared module: a plain Vision Transformer (Dosovitskiy et al. 2021) and its checkpoint loader.

Every method script (mae.py, moco.py, graft.py, mimco.py, micl.py) builds its encoder from here and nothing else.
Parameter names follow timm and the official MAE / MoCo v3 code (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2`, `norm`, `head`), so official weights load without
renaming and our encoder weights load into timm's VisionTransformer (num_classes=0) with strict=True.

    model = vit_base()                              # ViT-B/16, 224 px
    tokens = model.forward_features(x)              # (B, 1+196, 768), after the final LayerNorm
    tokens = model.forward_features(x, ids_keep)    # (B, 1+K, 768): only the K patches in ids_keep (MAE, MiCL)
    load_pretrained(model, "mae_pretrain_vit_base.pth")
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_pos_embed(embed_dim, grid_size, layout="mae"):
    """Fixed 2-D sin-cos position embedding, (1 + grid_size**2, embed_dim), with an all-zero CLS row first.

    Each axis gets D/2 channels [sin(pos * w_d), cos(pos * w_d)], w_d = 1 / 10000^(d / (D/4)), d = 0..D/4-1.
    The two official codes order the axes differently (the weights in a loaded checkpoint win either way):
      layout="mae":  [sin(col), cos(col), sin(row), cos(row)]   (MAE util/pos_embed.py, meshgrid(w, h))
      layout="moco": [sin(row), cos(row), sin(col), cos(col)]   (MoCo v3 vits.py)
    """
    assert embed_dim % 4 == 0, "sin-cos position embedding needs embed_dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))  # (D/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")  # token t = row * grid_size + col
    def axis(p):  # (L,) -> (L, D/2)
        out = p.flatten()[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)
    first, second = (col, row) if layout == "mae" else (row, col)
    emb = torch.cat([axis(first), axis(second)], dim=1)  # (L, D)
    return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb]).float()  # CLS position is zeros


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, L, D) with one strided convolution."""
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        assert img_size % patch_size == 0, f"img_size {img_size} is not a multiple of patch_size {patch_size}"
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, L, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"embed_dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attn=False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3x (B, H, N, d)
        if return_attn:  # the slow path, for the analysis tools: materialize softmax(q k^T / sqrt(d))
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attn = attn.float().softmax(dim=-1).to(q.dtype)  # (B, H, N, N)
            x = attn @ v
        else:  # fused flash / memory-efficient kernel
            attn = None
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D)), attn


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, return_attn=False):
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + drop_path(y, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return (x, attn) if return_attn else x


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, num_classes=0, pos_embed_layout="mae"):
        super().__init__()
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not trained, but a parameter so that it is in the state dict and a checkpoint's values win.
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.patch_embed.grid_size, pos_embed_layout)[None],
                                      requires_grad=False)  # (1, 1+L, D)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth schedule
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        """MAE's init: xavier-uniform Linear layers (the patch conv viewed as one), zero Linear biases, CLS std 0.02."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # its bias keeps PyTorch's default init, as in MAE
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_features(self, x, ids_keep=None, return_intermediates=False):
        """(B, C, H, W) -> tokens after the final norm, (B, 1+K, D), CLS first.

        ids_keep: optional (B, K) indices of the patch tokens to keep (after their position embedding is added).
        return_intermediates: also return the per-block attention maps [(B, H, 1+K, 1+K)] and the per-block outputs
        [(B, 1+K, D)], before the final norm (for analyze.py). Uses the slow, materialized attention.
        """
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, L, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1+K, D)
        attns, outs = [], []
        for blk in self.blocks:
            if return_intermediates:
                x, attn = blk(x, return_attn=True)
                attns.append(attn)
                outs.append(x)
            else:
                x = blk(x)
        x = self.norm(x)
        return (x, attns, outs) if return_intermediates else x

    def forward(self, x):
        """CLS token after the final norm, through the head (Identity unless num_classes > 0 or replaced)."""
        return self.head(self.forward_features(x)[:, 0])


# Factories: the standard sizes; any keyword (img_size, patch_size, num_heads, drop_path_rate, ...) overrides.
# cls: a subclass that *is* a ViT with more parts, e.g. mae.py's MaskedAutoencoder (its own keywords pass through).
# vit_small has DeiT's 6 heads; MoCo v3's ViT-S has 12 (num_heads=12).
# vit_cpu: a 128-d x 6-block encoder for the CPU table (experiments/table.py --preset cpu: 32 px, patch 8).
def vit_cpu(cls=VisionTransformer, **kw): return cls(**{"embed_dim": 128, "depth": 6, "num_heads": 4, **kw})
def vit_tiny(cls=VisionTransformer, **kw): return cls(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kw})
def vit_small(cls=VisionTransformer, **kw): return cls(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw})
def vit_base(cls=VisionTransformer, **kw): return cls(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kw})
def vit_large(cls=VisionTransformer, **kw): return cls(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **kw})
def vit_huge(cls=VisionTransformer, **kw): return cls(**{"embed_dim": 1280, "depth": 32, "num_heads": 16,
                                                         "patch_size": 14, **kw})

MODELS = {f.__name__: f for f in (vit_cpu, vit_tiny, vit_small, vit_base, vit_large, vit_huge)}


def layer_id(name, depth):
    """BEiT rule for layer-wise learning rates: embeddings -> 0, blocks.k -> k+1, everything else -> depth+1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def load_pretrained(model, path_or_state_dict, verbose=True):
    """Load encoder weights into `model` (a VisionTransformer) from any checkpoint this project meets.

    Reads: our own checkpoint.pt / encoder.pt from every script, official MAE ({'model': ...}, with or without the
    decoder), official MoCo v3 ({'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', ...}}; the
    base encoder is taken), and plain or timm state dicts. Heads, decoders, predictors are ignored and reported.
    `pos_embed` is resized (bicubic) when the image size differs. Raises ValueError when the file is for another model.
    Returns the list of skipped keys.
    """
    sd = path_or_state_dict
    if isinstance(sd, (str, os.PathLike)):
        if not os.path.isfile(sd):
            raise ValueError(f"checkpoint {sd} not found; pass the path of a .pt/.pth file")
        try:
            sd = torch.load(sd, map_location="cpu", weights_only=True)  # weights_only: a checkpoint never runs code
        except Exception as e:  # not a PyTorch file, cut short, or a pickled object (never unpickled here)
            raise ValueError(f"cannot read {sd} as a file of weights ({type(e).__name__}); "
                             "pass a .pt/.pth of tensors") from None
    if not isinstance(sd, dict):
        raise ValueError(f"the checkpoint holds a {type(sd).__name__}, not a dict of weights")
    for key in ("model", "state_dict", "encoder"):  # ours / MAE, MoCo v3, some third-party files
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if any(".base_encoder." in "." + k for k in sd):  # MoCo v3 (official, or our moco.py / graft.py)
        sd = {k.split("base_encoder.", 1)[1] if "base_encoder." in k else "_other." + k: v for k, v in sd.items()}
    prefixes = ("module.", "_orig_mod.", "encoder.", "student.")
    def strip(k):
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        return k
    sd = {strip(k): v for k, v in sd.items()}
    own = model.state_dict()
    load, skipped = {}, []
    for k, v in sd.items():
        if k not in own or k.startswith("head."):
            skipped.append(k)
        elif k == "pos_embed" and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            load[k] = resize_pos_embed(v, own[k].shape[1] - 1)
            if verbose:
                print(f"load_pretrained: resized pos_embed {tuple(v.shape)} -> {tuple(own[k].shape)}")
        elif v.shape != own[k].shape:
            raise ValueError(f"checkpoint is for another model: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}; pass the matching --model / --patch-size")
        else:
            load[k] = v
    deeper = [k for k in skipped if k.startswith("blocks.")]
    if deeper:  # same width, more blocks: loading the first ones silently would give another model
        raise ValueError(f"checkpoint is for a deeper model: it has {deeper[0]} but the model has {len(model.blocks)} "
                         f"blocks; pass the matching --model")
    missing = [k for k in own if k not in load and not k.startswith("head.")]
    if missing:
        raise ValueError(f"checkpoint is for another model or is not a ViT encoder: {len(missing)} encoder weights "
                         f"missing (first: {missing[0]}); pass the matching --model, or a checkpoint with its encoder")
    model.load_state_dict(load, strict=False)
    if verbose:
        print(f"load_pretrained: loaded {len(load)} tensors, skipped {len(skipped)}"
              + (f" (e.g. {', '.join(sorted(skipped)[:3])})" if skipped else ""))
    return skipped


def resize_pos_embed(pos_embed, num_patches):
    """(1, 1+L, D) -> (1, 1+num_patches, D): bicubic interpolation of the patch grid, CLS row kept."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = int(math.sqrt(grid.shape[1])), int(math.sqrt(num_patches))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(cls.dtype)], dim=1)
