"""Training-step throughput of every method script: img/s, step time, peak memory and MFU, and the official code's.

What is timed is one optimizer step of each script's own module on synthetic images that are already on the device
(no data loading: benchmarks/bench_data.py measures that): forward under autocast, backward, AdamW step, exactly the
lines of the scripts' training loops. Warm-up steps first (they include torch.compile's compilation), then the MEDIAN
of --steps steps, each between two torch.cuda.synchronize() calls. MFU = model FLOPs per step (written out below, per
method) / step time / the GPU's peak dense bf16 rate.

    python benchmarks/bench_throughput.py --json bench_throughput.json  # GPU: ViT-S/B/L, 224 px, bf16, compile off+on
    python benchmarks/bench_throughput.py --models vit_base --compile off --methods mae,moco \\
        --reference-mae ~/src/mae --reference-moco ~/src/moco-v3                # side by side with the official code
    python benchmarks/bench_throughput.py --models vit_base --methods finetune --reference-mae ~/src/mae   # fine-tuning
    python benchmarks/bench_throughput.py --device cpu                          # CPU smoke run: vit_tiny, 64 px, fp32
On a shared or noisy machine add --threads 1 (CPU) and --interleave (ours and the official step alternate, so a change
of load hits both alike). Results go to the JSON after every configuration, so a run cut short keeps what it measured.

--reference-mae / --reference-moco take checkouts of facebookresearch/mae and facebookresearch/moco-v3 (nothing of them
is copied into this project; the checkout is only imported, never modified). With --reference-mae and finetune among
--methods, the official fine-tuning step is timed too (see "Fine-tuning" below). They need timm (`pip install timm`; any
recent version: this project itself never imports timm). The official code was written for timm 0.3.2 / 0.4.x, numpy
< 1.24 and torch < 1.13, so this script applies import-time shims, in this process only:
    MAE:     np.float = float (util/pos_embed.py); a stub module torch._six with `inf` (util/misc.py); while
             models_mae.py is imported, timm's Block is a subclass that accepts and drops `qk_scale` (removed in timm).
    MoCo v3: a module timm.models.layers.helpers with to_2tuple (moved to timm.layers); VisionTransformerMoCo.num_tokens
             = 1 (timm renamed it num_prefix_tokens); a 1-process process group (gloo on CPU, nccl on GPU) for its
             concat_all_gather; on a CPU-only machine Tensor.cuda() returns the tensor itself while its step runs
             (its loss calls labels.cuda()).
Attention: timm 0.3.2, which the official code ships with, computes softmax(q k^T) v explicitly; a recent timm calls
F.scaled_dot_product_attention. --reference-attn explicit (default) switches the reference models' timm attention to
the explicit path, so that the official code is timed as shipped; --reference-attn sdpa times it on recent timm.
The official models are built with the SAME size, image size, patch size and batch as ours (their factories only fix
these, e.g. mae_vit_base_patch16_dec512d8b = MaskedAutoencoderViT(patch 16, 768, 12 blocks, 12 heads, decoder 512 x 8
x 16 heads)), and stepped as their training loops step them: fp16 autocast + GradScaler, MAE: AdamW(betas 0.9, 0.95,
not fused) through util.misc.NativeScalerWithGradNormCount (it also computes the gradient norm every step) and
loss.item() every step (engine_pretrain.py); MoCo v3: torch.optim.AdamW(model.parameters(), weight_decay=0.1)
(PyTorch defaults otherwise) and loss.item() every step (main_moco.py). Neither side is wrapped in DDP (one process;
SyncBatchNorm on one process is plain BatchNorm). Ours: each script's own build_model and build_optimizer (so a
change in a script is measured here) and the scripts' defaults (bf16 autocast, no GradScaler, fused AdamW on CUDA).
The ratio table is ours / official img/s.

FLOP count (model FLOPs, 2 per multiply-add, matrix products only: LayerNorm, softmax, GELU, BatchNorm, the optimizer
and the pixel loss are left out, all elementwise and well under 1%):
    one ViT block, n tokens of width d, MLP ratio 4:  24 n d^2 + 4 n^2 d
        (qkv 6nd^2, output projection 2nd^2, MLP 16nd^2, scores q k^T 2n^2 d, weights x v 2n^2 d)
    patch embedding of L patches of p x p x 3 pixels:  2 L 3p^2 d;  a Linear n x d_in -> d_out: 2 n d_in d_out
    backward = 2 x forward for every product whose input and weight both need a gradient; 1 x forward where only one
        does (the patch embedding: the image needs none; MoCo's logits: the keys carry none); 0 for work done without
        gradient (momentum encoder, a frozen patch projection). So training = 3 x forward, less these small terms.
    (tests/test_benchmarks.py checks every formula against torch.utils.flop_counter on the real modules, with the
     attention written out as two matrix products while counting: counted_flops below. The counter cannot see inside
     the fused kernel on every device and release (0 FLOPs on CPU in torch 2.13-2.14), and where it does it counts the
     backward's recomputation of q k^T, which is not model work.)
Per method, per step of B images (L patches, K kept, D width; the values are the scripts' defaults, read from their
get_args, so --method-args changes them in the count too):
    MAE:  encoder on 1+K tokens (K = int(L(1 - 0.75))), decoder_embed (1+K) x D -> 512, 8 decoder blocks of width 512
          on 1+L tokens, decoder_pred (1+L) x 512 -> 3p^2; patch embedding on all L patches. Everything trained.
    MoCo v3: base encoder on both views (1+L tokens each), projector D -> 4096 -> 4096 -> 256 and predictor
          256 -> 4096 -> 256 (bias-free Linears), fwd + bwd; momentum encoder + projector on both views, forward only;
          logits q k^T 2B^2 256 per loss term, two terms; frozen patch projection (stop-grad-conv1): forward only.
    MiCL: 2B views, each through the encoder on 1 + K/2 tokens (K = int(L(1 - 0.9)) rounded down to even), the patch
          embedding on all L patches of each view (micl.py embeds every image twice); logits phi(a b^T) 2B^2 D per
          term, two terms, both sides trained.
    MimCo: frozen teacher (here: a random encoder of the student's size) forward only on 1+L tokens; student encoder
          on 1+K tokens (K = int(L(1 - 0.75))), decoder as MAE's at mimco.py's width (256 x 4 blocks) with
          decoder_pred (1+L) x 256 -> teacher width, image head D -> 2048 -> teacher width on the CLS token, trained;
          patch logits 2 M^2 C per image (M = L - K removed patches; "batch" negatives: 2 (BM)^2 C) and image logits
          2 B^2 C, C the teacher width; their targets carry no gradient.
    Layer Grafted: MoCo v3's count (patch projection frozen); with --freeze-lower the embeddings and the lower
          graft_depth blocks run forward only. Its optimizer has the script's two learning-rate groups.
    Fine-tuning (finetune.py): the encoder on all 1+L tokens and the head D -> 1000 classes on one pooled token,
          everything trained (patch embedding 2 x forward: the image needs no gradient); MixUp / CutMix, the pooling,
          fc_norm and the loss are elementwise.

Fine-tuning. Ours: finetune.py's build_model (--init random, 1000 classes, its defaults: global pool + fc_norm, drop
path 0.1) and build_optimizer (AdamW over param_groups, the layer-wise lr decay groups), and the lines of its training
loop: soft_targets (MixUp or CutMix per batch, label smoothing 0.1) on the batch, the model, soft_cross_entropy. The
official step is engine_finetune.py train_one_epoch's, accum_iter 1: models_vit.VisionTransformer(global_pool=True) of
the same size and drop path, torch.optim.AdamW(util/lr_decay.py param_groups_lrd(model, 0.05, no_weight_decay(),
layer decay)), timm's Mixup(0.8, 1.0, mode 'batch', smoothing 0.1) on a copy of the batch (the loader gives a fresh
one each step; Mixup works in place), fp16 autocast, SoftTargetCrossEntropy, loss.item(), NativeScalerWithGradNorm-
Count(clip_grad=None), zero_grad. One more shim: timm >= 0.9's VisionTransformer.forward pools again in forward_head
(MAE's forward_features already returns the pooled, normed feature), so the official model's forward is timm 0.3.2's,
head(forward_features(x)).

Peak dense bf16 (= fp16) TFLOP/s by device name: H100 SXM 989, H100 NVL 835, H100 PCIe 756, H200 989, A100 312
(vendor datasheets); --peak-tflops overrides (and then MFU is also given on a CPU, where it is otherwise n/a). On CUDA
the script also times one large bf16 matrix product (8192^3, random data) and reports MFU against that measured ceiling.
"""
import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the project root: vit, mae, moco, ...
import vit  # noqa: E402

METHOD_NAMES = ["mae", "moco", "micl", "mimco", "graft", "finetune"]
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0)]

# ------------------------------------------------------------------------------------------------------ FLOP count


def block_flops(n, d, mlp_ratio=4.0):
    """One ViT block, forward, n tokens of width d: qkv 6nd^2 + proj 2nd^2 + MLP 4*r*nd^2 + scores and AV 4n^2 d."""
    return int((8 + 4 * mlp_ratio) * n * d * d) + 4 * n * n * d


def patch_embed_flops(L, p, d, c=3):
    """The strided convolution = a Linear of each p x p x c patch to d."""
    return 2 * L * c * p * p * d


def linear_flops(n, d_in, d_out):
    return 2 * n * d_in * d_out


def encoder_flops(cfg, n_tokens):
    """(patch embedding of all L patches, blocks on n_tokens), forward, one image."""
    return patch_embed_flops(cfg["L"], cfg["patch_size"], cfg["D"]), cfg["depth"] * block_flops(n_tokens, cfg["D"])


def mae_flops(cfg, B, a):
    """a: mae.py's arguments (mask_ratio, decoder_embed_dim, decoder_depth). Returns forward and training FLOPs."""
    L, D, p, Dd = cfg["L"], cfg["D"], cfg["patch_size"], a.decoder_embed_dim
    K = int(L * (1 - a.mask_ratio))
    pe, enc = encoder_flops(cfg, 1 + K)
    dec = (linear_flops(1 + K, D, Dd) + a.decoder_depth * block_flops(1 + L, Dd)
           + linear_flops(1 + L, Dd, 3 * p * p))
    return {"forward": B * (pe + enc + dec), "train": B * (2 * pe + 3 * (enc + dec))}


def moco_flops(cfg, B, a):
    """a: moco.py's arguments (moco_dim, moco_mlp_dim, stop_grad_conv1)."""
    L, D, h, c = cfg["L"], cfg["D"], a.moco_mlp_dim, a.moco_dim
    pe, enc = encoder_flops(cfg, 1 + L)
    proj = linear_flops(1, D, h) + linear_flops(1, h, h) + linear_flops(1, h, c)  # 3-layer projector on the CLS token
    pred = linear_flops(1, c, h) + linear_flops(1, h, c)  # 2-layer predictor
    logits = 2 * linear_flops(B, c, B)  # q1 k2^T and q2 k1^T, (B, c) x (c, B) each
    base_fwd, mom_fwd = 2 * B * (pe + enc + proj + pred), 2 * B * (pe + enc + proj)  # two views each
    base_train = 2 * B * ((1 if a.stop_grad_conv1 else 2) * pe + 3 * (enc + proj + pred))
    return {"forward": base_fwd + mom_fwd + logits, "train": base_train + mom_fwd + 2 * logits}


def micl_flops(cfg, B, a):
    """a: micl.py's arguments (mask_ratio)."""
    L, D = cfg["L"], cfg["D"]
    K = int(L * (1 - a.mask_ratio)) // 2 * 2
    pe, enc = encoder_flops(cfg, 1 + K // 2)
    logits = 2 * linear_flops(B, D, B)  # phi(a b^T) and phi(b a^T)
    return {"forward": 2 * B * (pe + enc) + logits, "train": 2 * B * (2 * pe + 3 * enc) + 3 * logits}


def graft_flops(cfg, B, a, graft_depth):
    """a: graft.py's arguments. MoCo v3's count (patch projection always frozen); with --freeze-lower the embeddings
    and blocks < graft_depth get no gradient at all (nothing below them is trained): forward only."""
    f = moco_flops(cfg, B, argparse.Namespace(moco_dim=a.moco_dim, moco_mlp_dim=a.moco_mlp_dim, stop_grad_conv1=True))
    if a.freeze_lower:
        f["train"] -= 2 * B * 2 * graft_depth * block_flops(1 + cfg["L"], cfg["D"])  # two views, 3x -> 1x
    return f


def mimco_flops(cfg, B, a, teacher_cfg):
    """a: mimco.py's arguments (mask_ratio, decoder_*, head_hidden_dim, patch_negatives); teacher_cfg: the teacher's
    sizes (same patch grid). The teacher runs forward only, on all 1+L tokens."""
    L, D, Dt, Dd = cfg["L"], cfg["D"], teacher_cfg["D"], a.decoder_embed_dim
    K = int(L * (1 - a.mask_ratio))
    M = L - K
    pe, enc = encoder_flops(cfg, 1 + K)
    teacher = sum(encoder_flops(teacher_cfg, 1 + L))
    dec = (linear_flops(1 + K, D, Dd) + a.decoder_depth * block_flops(1 + L, Dd)
           + linear_flops(1 + L, Dd, Dt))  # decoder_pred to the teacher's width, on 1+L tokens
    head = linear_flops(1, D, a.head_hidden_dim) + linear_flops(1, a.head_hidden_dim, Dt)  # image-level head on the CLS
    patch_logits = B * linear_flops(M, Dt, M) if a.patch_negatives == "image" else linear_flops(B * M, Dt, B * M)
    image_logits = linear_flops(B, Dt, B)
    fwd = B * (teacher + pe + enc + dec + head) + patch_logits + image_logits
    train = B * (teacher + 2 * pe + 3 * (enc + dec + head)) + 2 * (patch_logits + image_logits)  # targets: no grad
    return {"forward": fwd, "train": train}


@contextlib.contextmanager
def explicit_attention():
    """While inside, F.scaled_dot_product_attention is softmax(q k^T / sqrt(d)) v written out, the same maths, so that
    a FLOP counter sees its two matrix products (it cannot see inside the fused kernels on every device)."""
    import torch.nn.functional as F
    fused = F.scaled_dot_product_attention
    def written_out(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        assert attn_mask is None and dropout_p == 0.0 and not is_causal, "only plain attention is written out"
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    F.scaled_dot_product_attention = written_out
    try:
        yield
    finally:
        F.scaled_dot_product_attention = fused


def counted_flops(loss_fn):
    """FLOPs of one forward and of forward + backward, counted by torch.utils.flop_counter on the real code, with the
    attention written out (explicit_attention) so that the count does not depend on which fused kernel runs."""
    from torch.utils.flop_counter import FlopCounterMode
    with explicit_attention():
        with FlopCounterMode(display=False) as fwd:
            loss = loss_fn()
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    return {"forward": fwd.get_total_flops(), "train": fwd.get_total_flops() + bwd.get_total_flops()}


# ---------------------------------------------------------------------------------------------- our method scripts


def script_args(mod, cfg, extra=()):
    """The method script's own defaults (its get_args), at this benchmark's model and image size, with the flags
    given to this benchmark by --method-args for that method."""
    argv = ["--data", "synthetic", "--model", cfg["model"], "--img-size", str(cfg["img_size"]),
            "--patch-size", str(cfg["patch_size"]), *extra, *cfg.get("method_args", {}).get(mod.__name__, [])]
    try:
        return mod.get_args(argv)
    except SystemExit:  # argparse already printed why
        raise RuntimeError(f"{mod.__name__}.get_args({argv}) failed: its command line changed; "
                           "update this adapter") from None


def images(B, cfg, device, gen):
    return torch.randn(B, 3, cfg["img_size"], cfg["img_size"], device=device, generator=gen)  # never zeros


def random_encoder_file(cfg):
    """graft.py's stage-1 weights and mimco.py's teacher: a random encoder of the benchmark's size, in a temporary
    file (the weights do not change the cost)."""
    import tempfile
    path = os.path.join(tempfile.mkdtemp(prefix="bench_"), "encoder.pt")
    torch.save(vit.MODELS[cfg["model"]](img_size=cfg["img_size"], patch_size=cfg["patch_size"]).state_dict(), path)
    return path


# The inputs and the loss call of each method's module (its forward returns the loss, or (loss, extras)); the model
# and its optimizer are built by the script's own build_model / build_optimizer, so a change there is measured here.
EXTRA_ARGS = {"mimco": lambda cfg: ["--teacher", random_encoder_file(cfg), "--teacher-model", cfg["model"]],
              "graft": lambda cfg: ["--mim-checkpoint", random_encoder_file(cfg)],
              "finetune": lambda cfg: ["--init", "random"]}  # a random encoder: the weights do not change the cost
INPUTS = {"mae": 1, "moco": 2, "micl": 1, "mimco": 1, "graft": 2}  # views per image


def loss_fn(method, a, xs):
    """m changes every step, as in training (a compiled model must not recompile for it)."""
    if method == "mae":
        return lambda model, step: model(xs[0], a.mask_ratio)[0]
    if method in ("moco", "graft"):
        first = (lambda out: out) if method == "moco" else (lambda out: out[0])
        return lambda model, step: first(model(xs[0], xs[1], a.moco_m + 1e-6 * step))
    if method == "mimco":
        return lambda model, step: model(xs[0])[0]
    return lambda model, step: model(xs[0])


def method_flops(method, cfg, B, a, model):
    if method == "mae":
        return mae_flops(cfg, B, a)
    if method == "moco":
        return moco_flops(cfg, B, a)
    if method == "micl":
        return micl_flops(cfg, B, a)
    if method == "graft":
        return graft_flops(cfg, B, a, model.graft_depth)
    return mimco_flops(cfg, B, a, {**cfg, "D": model.teacher.embed_dim, "depth": model.teacher.depth})


def build_ours(method, mod, cfg, B, device, gen):
    """The script's model (build_model) on the device, its optimizer (build_optimizer), inputs, loss call, FLOPs."""
    a = script_args(mod, cfg, EXTRA_ARGS[method](cfg) if method in EXTRA_ARGS else ())
    a.lr = a.blr * B / 256  # as the scripts' get_args sets it
    model = mod.build_model(a, verbose=False).to(device)
    if getattr(a, "l1_weight", 0) > 0:  # graft.py takes the L1 reference on the device, after build_model
        model.set_l1_reference()
    xs = [images(B, cfg, device, gen) for _ in range(INPUTS[method])]
    return {"model": model, "optimizer": mod.build_optimizer(model, a, device),
            "flops": method_flops(method, cfg, B, a, model), "loss": loss_fn(method, a, xs)}


FINETUNE_CLASSES = 1000  # ImageNet-1k's head


def finetune_flops(cfg, B, a=None):
    """Encoder on all 1+L tokens, head D -> FINETUNE_CLASSES on the pooled token; all trained."""
    pe, enc = encoder_flops(cfg, 1 + cfg["L"])
    head = linear_flops(1, cfg["D"], FINETUNE_CLASSES)
    return {"forward": B * (pe + enc + head), "train": B * (2 * pe + 3 * (enc + head))}


def build_finetune(mod, cfg, B, device, gen):
    """finetune.py's classifier (build_model, --init random) and optimizer (build_optimizer: the layer-wise lr decay
    groups), a batch with labels, and its training-loop lines: soft_targets (MixUp / CutMix, smoothing), the model,
    soft_cross_entropy."""
    a = script_args(mod, cfg, EXTRA_ARGS["finetune"](cfg))
    a.lr, a.num_classes = a.blr * B / 256, FINETUNE_CLASSES  # as get_args and build_datasets set them
    model = mod.build_model(a, verbose=False).to(device)
    x = images(B, cfg, device, gen)
    y = torch.randint(0, FINETUNE_CLASSES, (B,), device=device, generator=gen)
    mix = mod.mixup_cutmix(a)

    def loss(model, step):
        imgs, targets = mod.soft_targets(x, y, mix, a)  # v2 MixUp / CutMix return new tensors: x stays as it is
        return mod.soft_cross_entropy(model(imgs), targets)
    return {"model": model, "optimizer": mod.build_optimizer(model, a, device), "flops": finetune_flops(cfg, B, a),
            "loss": loss}


BUILDERS = {m: functools.partial(build_ours, m) for m in METHOD_NAMES}
BUILDERS["finetune"] = build_finetune

# ------------------------------------------------------------------------------------------ the official code


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_reference_mae(path):
    """models_mae.py and util/misc.py of a facebookresearch/mae checkout, with the import-time shims of the
    docstring."""
    import numpy as np
    import timm.models.vision_transformer as tvt
    if not hasattr(np, "float"):
        np.float = float  # util/pos_embed.py: np.float, removed in numpy 1.24
    if "torch._six" not in sys.modules:  # util/misc.py: from torch._six import inf (removed in torch 1.13)
        six = types.ModuleType("torch._six")
        six.inf = math.inf
        sys.modules["torch._six"] = six
    timm_block = tvt.Block

    class Block(timm_block):  # models_mae.py passes qk_scale=None, which timm >= 0.5 no longer accepts
        def __init__(self, *args, qk_scale=None, **kw):
            super().__init__(*args, **kw)
    if ("util" in sys.modules
            and not os.path.abspath(getattr(sys.modules["util"], "__file__", "")).startswith(os.path.abspath(path))):
        raise RuntimeError("a module named 'util' is already imported; MAE's util package cannot be loaded beside it")
    tvt.Block, saved_path = Block, list(sys.path)
    sys.path.insert(0, os.path.abspath(path))  # models_mae.py imports util.pos_embed
    try:
        models_mae = _load_file("official_mae_models_mae", os.path.join(path, "models_mae.py"))
        misc = importlib.import_module("util.misc")
    finally:
        tvt.Block, sys.path[:] = timm_block, saved_path
    return models_mae, misc


def load_reference_finetune(path):
    """models_vit.py, util/lr_decay.py and util/misc.py of a facebookresearch/mae checkout (with load_reference_mae's
    shims), and timm's Mixup and SoftTargetCrossEntropy, as main_finetune.py imports them."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    misc = sys.modules.get("util.misc") or load_reference_mae(path)[1]  # already there when mae's was loaded
    saved_path = list(sys.path)
    sys.path.insert(0, os.path.abspath(path))
    try:
        models_vit = _load_file("official_mae_models_vit", os.path.join(path, "models_vit.py"))
        lrd = importlib.import_module("util.lr_decay")
    finally:
        sys.path[:] = saved_path
    return models_vit, lrd, misc, Mixup, SoftTargetCrossEntropy


def load_reference_moco(path):
    """vits.py and moco/builder.py of a facebookresearch/moco-v3 checkout, loaded under other names (this project has a
    moco.py of its own), with the import-time shims of the docstring."""
    try:
        from timm.layers import to_2tuple  # timm >= 0.9
    except ImportError:
        from timm.models.layers import to_2tuple
    if "timm.models.layers.helpers" not in sys.modules:  # vits.py: from timm.models.layers.helpers import to_2tuple
        helpers = types.ModuleType("timm.models.layers.helpers")
        helpers.to_2tuple = to_2tuple
        sys.modules["timm.models.layers.helpers"] = helpers
    vits = _load_file("official_mocov3_vits", os.path.join(path, "vits.py"))
    builder = _load_file("official_mocov3_builder", os.path.join(path, "moco", "builder.py"))
    vits.VisionTransformerMoCo.num_tokens = 1  # vits.py asserts self.num_tokens == 1; timm renamed it num_prefix_tokens
    return vits, builder


def set_timm_attention(model, mode):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = mode == "sdpa"


def build_reference_mae(mods, cfg, B, device, gen, attn, a):
    """a: mae.py's arguments (the paper's values unless --method-args changed them), so both sides build one model."""
    models_mae, misc = mods
    model = models_mae.MaskedAutoencoderViT(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["D"], depth=cfg["depth"],
        num_heads=cfg["heads"], decoder_embed_dim=a.decoder_embed_dim, decoder_depth=a.decoder_depth,
        decoder_num_heads=a.decoder_num_heads, mlp_ratio=4, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=a.norm_pix_loss)  # = their factory functions at the paper's values
    set_timm_attention(model, attn)
    x = images(B, cfg, device, gen)
    return {"model": model, "flops": mae_flops(cfg, B, a),
            "make_step": lambda model: _reference_mae_step(model, misc, x, device, a.mask_ratio)}


def _reference_mae_step(model, misc, x, device, mask_ratio):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # add_weight_decay's two groups
    groups = [{"params": [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")], "weight_decay": 0.05},
              {"params": [p for n, p in params if p.ndim <= 1 or n.endswith(".bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95))  # main_pretrain.py
    with warnings_off():
        loss_scaler = misc.NativeScalerWithGradNormCount()  # torch.cuda.amp.GradScaler inside (disabled on a CPU)

    def step(i):  # engine_pretrain.py train_one_epoch, accum_iter 1
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            loss, _, _ = model(x, mask_ratio=mask_ratio)
        loss.item()  # loss_value = loss.item(), then the isfinite check
        loss_scaler(loss, optimizer, parameters=model.parameters(), update_grad=True)
        optimizer.zero_grad()
    return step


def build_reference_finetune(mods, cfg, B, device, gen, attn, a):
    """a: finetune.py's arguments (FINETUNE.md's ViT-B values unless --method-args changed them)."""
    models_vit = mods[0]
    model = models_vit.VisionTransformer(
        global_pool=not a.cls_token, img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["D"],
        depth=cfg["depth"], num_heads=cfg["heads"], mlp_ratio=4, qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), num_classes=FINETUNE_CLASSES,
        drop_path_rate=a.drop_path)  # = models_vit.vit_base_patch16(num_classes, drop_path_rate, global_pool)
    model.forward = lambda x: model.head(model.forward_features(x))  # timm 0.3.2's forward (see the docstring)
    set_timm_attention(model, attn)
    x = images(B, cfg, device, gen)
    y = torch.randint(0, FINETUNE_CLASSES, (B,), device=device, generator=gen)
    return {"model": model, "flops": finetune_flops(cfg, B, a),
            "make_step": lambda model: _reference_finetune_step(model, mods, x, y, device, a)}


def _reference_finetune_step(model, mods, x, y, device, a):
    _, lrd, misc, Mixup, SoftTargetCrossEntropy = mods
    groups = lrd.param_groups_lrd(model, a.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                  layer_decay=a.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=a.blr * x.shape[0] / 256)  # main_finetune.py
    with warnings_off():
        loss_scaler = misc.NativeScalerWithGradNormCount()
    mixup_fn = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=1.0, switch_prob=a.mixup_switch_prob,
                     mode="batch", label_smoothing=a.smoothing, num_classes=FINETUNE_CLASSES)
    criterion = SoftTargetCrossEntropy()

    def step(i):  # engine_finetune.py train_one_epoch, accum_iter 1
        samples, targets = mixup_fn(x.clone(), y)  # in place, on what the loader would hand over fresh
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            loss = criterion(model(samples), targets)
        loss.item()  # loss_value = loss.item(), then the isfinite check
        loss_scaler(loss, optimizer, clip_grad=None, parameters=model.parameters(), create_graph=False,
                    update_grad=True)
        optimizer.zero_grad()
    return step


def build_reference_moco(mods, cfg, B, device, gen, attn, a):
    """a: moco.py's arguments (CONFIG.md's values unless --method-args changed them), so both sides build one model."""
    vits, builder = mods
    encoder = functools.partial(vits.VisionTransformerMoCo, stop_grad_conv1=a.stop_grad_conv1, img_size=cfg["img_size"],
                                patch_size=cfg["patch_size"], embed_dim=cfg["D"], depth=cfg["depth"],
                                num_heads=a.num_heads or cfg["heads"], mlp_ratio=4, qkv_bias=True,
                                norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))  # = vits.vit_small / vit_base
    model = builder.MoCo_ViT(encoder, a.moco_dim, a.moco_mlp_dim, a.moco_t)  # main_moco.py: 256, 4096, 0.2
    set_timm_attention(model, attn)
    x1, x2 = images(B, cfg, device, gen), images(B, cfg, device, gen)
    return {"model": model, "flops": moco_flops(cfg, B, a),
            "make_step": lambda model: _reference_moco_step(model, x1, x2, device, a.moco_m)}


def _reference_moco_step(model, x1, x2, device, m0):
    optimizer = torch.optim.AdamW(model.parameters(), 1.5e-4 * x1.shape[0] / 256, weight_decay=0.1)  # main_moco.py
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def step(i):  # main_moco.py train()
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            loss = model(x1, x2, m0 + 1e-6 * i)
        loss.item()  # losses.update(loss.item(), ...)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def one_process_group(device):
    """MoCo v3's loss all-gathers its keys: a process group of one process, only around the official model's step."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def cpu_tensor_cuda_is_identity(device):
    """On a machine without CUDA, the official MoCo loss's labels.cuda() keeps the tensor where it is."""
    if device.type == "cuda":
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved

# ------------------------------------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fns, device, warmups, steps):
    """Warm each step function up (warmups[k] untimed steps), then `steps` rounds in which each runs once, in turn,
    each step between two synchronizations. One function: plain timing. Several: interleaved timing, so that a change
    of the machine's load or clocks hits them alike. Returns (per-function step seconds, per-function warm-up seconds,
    peak memory in GB: the steady state of the one function, None when interleaved or not on CUDA)."""
    warm = []
    for f, n in zip(fns, warmups):
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            f(i)
        sync(device)
        warm.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # steady state: weights, grads, optimizer state, activations
    times = [[] for _ in fns]
    for i in range(max(warmups), max(warmups) + steps):
        for f, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            f(i)
            sync(device)
            ts.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" and len(fns) == 1 else None
    return times, warm, peak


def result_row(job, cfg, B, times, warm, peak_mem, device_peak, measured, interleaved):
    med = statistics.median(times)
    flops = job["flops"]
    row = {"method": job["method"], "impl": job["impl"], "model": cfg["model"], "img_size": cfg["img_size"],
           "patch_size": cfg["patch_size"], "batch": B, "precision": job["precision"], "compile": job["compile"],
           "img_per_s": B / med, "step_ms": 1e3 * med, "step_ms_min": 1e3 * min(times),
           "step_ms_max": 1e3 * max(times), "steps": len(times), "warmup_s": warm, "interleaved": interleaved,
           "peak_mem_gb": peak_mem, "train_flops_per_step": flops,
           "tflops_per_s": flops / med / 1e12 if flops else None}
    row["mfu"] = row["tflops_per_s"] / device_peak if flops and device_peak else None
    row["mfu_vs_measured_matmul"] = row["tflops_per_s"] / measured if flops and measured else None
    row.update(job.get("extra", {}))
    return row


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


def prepare_ours(method, mod, cfg, B, device, args, compiled):
    """Our script's module and its training-loop step; returns a job: step function, FLOPs, labels."""
    gen = torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    b = BUILDERS[method](mod, cfg, B, device, gen)
    model, optimizer = b["model"].train(), b["optimizer"]
    use_amp = device.type == "cuda" and args.amp != "none"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and args.amp == "fp16")
    fmodel = torch.compile(model) if compiled else model

    def step(i):  # the scripts' training loop
        with torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                            enabled=use_amp):
            loss = b["loss"](fmodel, i)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return {"method": method, "impl": "ours", "compile": compiled, "step": step, "flops": b["flops"]["train"],
            "precision": args.amp if use_amp else "fp32", "warmup": args.warmup + (2 if compiled else 0)}


REFERENCE_DEFAULTS = {  # the papers' values, used when our mae.py / moco.py cannot be imported to read them from
    "mae": dict(mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True),
    "moco": dict(moco_dim=256, moco_mlp_dim=4096, moco_t=0.2, moco_m=0.99, stop_grad_conv1=True, num_heads=None),
    "finetune": dict(cls_token=False, drop_path=0.1, weight_decay=0.05, layer_decay=0.65, blr=5e-4, mixup=0.8,
                     cutmix=1.0, mixup_switch_prob=0.5, smoothing=0.1)}


def prepare_reference(method, mods, cfg, B, device, args, ours_mod=None):
    """The official model and its training-loop step (fp16 autocast + GradScaler on CUDA, fp32 on a CPU), built with
    our script's hyper-parameters (ours_mod.get_args) so that both sides are the same model."""
    gen = torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    a = (script_args(ours_mod, cfg, EXTRA_ARGS[method](cfg) if method in EXTRA_ARGS else ()) if ours_mod else
         argparse.Namespace(**REFERENCE_DEFAULTS[method]))
    build = {"mae": build_reference_mae, "moco": build_reference_moco, "finetune": build_reference_finetune}[method]
    with warnings_off():  # torch.meshgrid / torch.cuda.amp deprecation warnings of the official code
        b = build(mods, cfg, B, device, gen, args.reference_attn, a)
        model = b["model"].to(device).train()
        step = b["make_step"](model)
    return {"method": method, "impl": "official", "compile": False, "step": step, "flops": b["flops"]["train"],
            "precision": "fp16" if device.type == "cuda" else "fp32", "warmup": args.warmup,
            "extra": {"attention": args.reference_attn}}


@contextlib.contextmanager
def reference_context(method, device):
    """What the official code's step needs around it: MoCo v3 a process group (and .cuda() on a CPU-only machine)."""
    with contextlib.ExitStack() as stack:
        if method == "moco":
            stack.enter_context(one_process_group(device))
            stack.enter_context(cpu_tensor_cuda_is_identity(device))
        stack.enter_context(warnings_off())
        yield


# -------------------------------------------------------------------------------------------------- provenance


def device_name(device):
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def provenance(device, argv, script):
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torchvision
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python", f"benchmarks/{script}", *argv]), "device": device_name(device),
            "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "project_commit": commit}


def peak_tflops(device, override):
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on CPU (pass --peak-tflops to get MFU anyway)"
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS:
        if key in name:
            return tf, f"datasheet dense bf16 for '{key}'"
    return None, f"unknown device '{name}': pass --peak-tflops"


def measure_matmul_tflops(device):
    """Achieved bf16 rate of one large matrix product (random data, median of 20 event-timed runs)."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * n ** 3 / statistics.median(ts) / 1e12

# ------------------------------------------------------------------------------------------------------ output


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown_tables(report):
    lines = ["| method | code | model | px/patch | batch | precision | compile | img/s | step ms (median) | peak GB | "
             "TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['impl']} | {r['model']} | {r['img_size']}/{r['patch_size']} | "
                     f"{r['batch']} | {r['precision']} | {'on' if r['compile'] else 'off'} | {r['img_per_s']:.1f} | "
                     f"{r['step_ms']:.1f} | {fmt(r['peak_mem_gb'], '.2f')} | {fmt(r['tflops_per_s'], '.3g')} | "
                     f"{pct(r['mfu'])} |")
    for s in report["skipped"]:
        lines.append(f"| {s['method']} | {s.get('impl', 'ours')} | {s.get('model', '')} | | | | | "
                     f"skipped: {s['why']} | | | | |")
    if report["ratios"]:
        lines += ["", "| method | model | batch | ours img/s (compile off) | ours img/s (compile on) | "
                  "official img/s | ratio off | ratio on |", "|---|---|---|---|---|---|---|---|"]
        for r in report["ratios"]:
            lines.append(f"| {r['method']} | {r['model']} | {r['batch']} | {fmt(r['ours_img_per_s'], '.1f')} | "
                         f"{fmt(r['ours_compiled_img_per_s'], '.1f')} | {r['official_img_per_s']:.1f} | "
                         f"{fmt(r['ratio'], '.2f')} | {fmt(r['ratio_compiled'], '.2f')} |")
    return "\n".join(lines)


def ratios(results):
    out = []
    for off in (r for r in results if r["impl"] == "official"):
        ours = {r["compile"]: r["img_per_s"] for r in results if r["impl"] == "ours" and r["method"] == off["method"]
                and r["model"] == off["model"] and r["batch"] == off["batch"]}
        out.append({"method": off["method"], "model": off["model"], "batch": off["batch"],
                    "official_img_per_s": off["img_per_s"], "ours_img_per_s": ours.get(False),
                    "ours_compiled_img_per_s": ours.get(True),
                    "ratio": ours[False] / off["img_per_s"] if False in ours else None,
                    "ratio_compiled": ours[True] / off["img_per_s"] if True in ours else None})
    return out

# -------------------------------------------------------------------------------------------------------- main


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Training-step throughput and MFU of the method scripts (and the official "
                                "MAE / MoCo v3 code)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated; missing scripts are skipped")
    p.add_argument("--models", default=None, help="comma-separated vit.py models (GPU: vit_small,vit_base,vit_large; "
                   "CPU: vit_tiny)")
    p.add_argument("--img-size", type=int, default=None, help="GPU: 224; CPU: 64")
    p.add_argument("--patch-size", type=int, default=None, help="GPU: the model's (16); CPU: 8")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (GPU: 128; CPU: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (GPU: 20; CPU: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU: 5; CPU: 1; +2 with compile)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype on CUDA (CPU: fp32)")
    p.add_argument("--compile", default=None, choices=["off", "on", "both"], help="torch.compile (GPU: both; CPU: off)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--reference-mae", default=None, help="a facebookresearch/mae checkout: time its model too (and "
                   "its fine-tuning step, main_finetune.py's, when finetune is among --methods)")
    p.add_argument("--reference-moco", default=None, help="a facebookresearch/moco-v3 checkout: time its model too")
    p.add_argument("--reference-attn", default="explicit", choices=["explicit", "sdpa"],
                   help="attention of the official models' timm blocks: explicit = as timm 0.3.2 that they ship with")
    p.add_argument("--interleave", action="store_true", help="time ours (compile off) and the official model of the "
                   "same method in alternation, step by step (for a shared or noisy machine; peak memory is then n/a)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    p.add_argument("--method-args", action="append", default=[], metavar='METHOD="FLAGS"',
                   help='flags for one method script\'s own command line, e.g. moco="--num-heads 12" '
                   '(MoCo v3\'s ViT-S) or mae="--decoder-depth 1"; repeatable. The FLOP formulas and the official '
                   'model follow them')
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    for k, g, c in (("models", "vit_small,vit_base,vit_large", "vit_tiny"), ("img_size", 224, 64),
                    ("patch_size", None, 8), ("batch_size", 128, 8), ("steps", 20, 3), ("warmup", 5, 1),
                    ("compile", "both", "off")):
        if getattr(args, k) is None:
            setattr(args, k, g if gpu else c)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv, device)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a test session: leave the process as it was


def run(args, argv, device):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the scripts' setup
    torch.backends.cudnn.benchmark = True
    prov = provenance(device, argv, "bench_throughput.py")
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    measured = measure_matmul_tflops(device) if device.type == "cuda" else None
    prov.update(peak_tflops=peak, peak_source=peak_source, matmul_tflops_measured=measured)
    print("\n".join(f"# {k}: {v}" for k, v in prov.items()), flush=True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BUILDERS]
    if unknown:
        raise SystemExit(f"error: --methods {','.join(unknown)}: unknown; choose from {','.join(METHOD_NAMES)}")
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    method_args = {}
    for item in args.method_args:
        m, _, flags = item.partition("=")
        if m not in BUILDERS or not _:
            raise SystemExit(f"error: --method-args {item!r}: expected METHOD=\"FLAGS\" with METHOD one of "
                             f"{','.join(METHOD_NAMES)}")
        method_args[m] = shlex.split(flags)
    report = {"provenance": prov, "settings": {k: v for k, v in vars(args).items()}, "results": [], "skipped": []}

    mods = {}
    for m in methods:
        try:
            mods[m] = importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 (not written yet, or half-written: a SyntaxError)
            report["skipped"].append({"method": m, "why": f"{m}.py not importable ({type(e).__name__}: {e})"})
            print(f"skip {m}: {m}.py not importable ({type(e).__name__}: {e})", flush=True)
    refs = {}
    loaders = {"mae": load_reference_mae, "moco": load_reference_moco, "finetune": load_reference_finetune}
    for m, path in (("mae", args.reference_mae), ("moco", args.reference_moco),
                    ("finetune", args.reference_mae if "finetune" in methods else None)):
        if path:
            try:
                with warnings_off():  # timm's deprecation warnings for the old import paths
                    refs[m] = loaders[m](path)
            except Exception as e:  # noqa: BLE001 (a missing timm, a broken checkout: say so, time the rest)
                report["skipped"].append({"method": m, "impl": "official", "why": f"{type(e).__name__}: {e}"})
                print(f"skip official {m} ({path}): {type(e).__name__}: {e}", flush=True)

    for model_name in args.models.split(","):
        with torch.device("meta"):  # read the sizes without allocating the weights
            enc = vit.MODELS[model_name](img_size=args.img_size,
                                         **({"patch_size": args.patch_size} if args.patch_size else {}))
        cfg = {"model": model_name, "img_size": args.img_size, "patch_size": enc.patch_size, "D": enc.embed_dim,
               "depth": enc.depth, "heads": enc.blocks[0].attn.num_heads, "L": enc.patch_embed.num_patches,
               "method_args": method_args}
        # groups of jobs timed together: one job each, or ours (eager) + official interleaved with --interleave
        groups = []
        for m in mods:
            for c in compile_modes:
                paired = args.interleave and m in refs and not c
                groups.append([(m, "ours", c)] + ([(m, "official", False)] if paired else []))
        groups += [[(m, "official", False)] for m in refs
                   if not (args.interleave and m in mods and False in compile_modes)]
        for group in groups:
            what = " + ".join(f"{m} {impl}" + (" compiled" if c else "") for m, impl, c in group) + (
                f" | {model_name} {cfg['img_size']}px/{cfg['patch_size']} batch {args.batch_size}")
            try:
                jobs = [prepare_ours(m, mods[m], cfg, args.batch_size, device, args, c) if impl == "ours" else
                        prepare_reference(m, refs[m], cfg, args.batch_size, device, args, mods.get(m))
                        for m, impl, c in group]
                with contextlib.ExitStack() as stack:
                    for m, impl, _ in group:
                        if impl == "official":
                            stack.enter_context(reference_context(m, device))
                    times, warm, peak_mem = time_steps([j["step"] for j in jobs], device, [j["warmup"] for j in jobs],
                                                       args.steps)
            except Exception as e:  # noqa: BLE001 (out of memory, a method whose API the adapter does not know)
                why = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"
                for m, impl, c in group:
                    report["skipped"].append({"method": m, "impl": impl, "model": model_name, "compile": c, "why": why})
                print(f"skip {what}: {why}", flush=True)
            else:
                for k, job in enumerate(jobs):
                    row = result_row(job, cfg, args.batch_size, times[k], warm[k], peak_mem, peak, measured,
                                     len(jobs) > 1)
                    report["results"].append(row)
                    print(f"{job['method']} {job['impl']}{' compiled' if job['compile'] else ''} {model_name} "
                          f"{cfg['img_size']}px/{cfg['patch_size']} batch {args.batch_size}: "
                          f"{row['img_per_s']:.1f} img/s, "
                          f"{row['step_ms']:.1f} ms/step, peak {fmt(row['peak_mem_gb'], '.2f')} GB, "
                          f"{fmt(row['tflops_per_s'], '.3g')} TFLOP/s, MFU {pct(row['mfu'])}", flush=True)
            jobs = None
            cleanup(device)
            write_json(report, args.json)  # after every group: a run stopped by a time limit keeps what it measured
    write_json(report, args.json)
    print("\n" + markdown_tables(report), flush=True)
    if args.json:
        print(f"\nwrote {args.json}")
    return report


def write_json(report, path):
    report["ratios"] = ratios(report["results"])
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
