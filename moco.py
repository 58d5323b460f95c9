"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie, He, ICCV 2021), end to end
in one file.

Two augmented views of each image go through a ViT whose head is an MLP projector, then through an MLP predictor:
the queries q1, q2. A momentum copy of the ViT + projector (an exponential moving average of its weights, no
gradient) turns the same views into keys k1, k2. InfoNCE then asks q1 to pick k2 of the same image among the keys of
every image in the GLOBAL batch (gathered from all GPUs; no queue), and q2 to pick k1. Facts from the official code:
facebookresearch/moco-v3 @ c349e6e (moco/builder.py, vits.py, main_moco.py, moco/loader.py, CONFIG.md).

Run (defaults = the ViT-B recipe of CONFIG.md: 300 epochs, global batch 4096, blr 1.5e-4, wd 0.1, tau 0.2):
    torchrun --nproc_per_node 8 moco.py --data /imagenet --output-dir runs/moco_vitb
    torchrun --nproc_per_node 8 moco.py --data /imagenet --model vit_small --num-heads 12   # the paper's ViT-S
    python moco.py --data cifar10 --model vit_tiny --img-size 32 --patch-size 4 --batch-size 256 --epochs 100 \
        --warmup-epochs 10 --blr 1e-3
A run auto-resumes from OUTPUT_DIR/checkpoint.pt. The base encoder, without its projector, ends up in
OUTPUT_DIR/encoder.pt (vit.py / timm names). The paper's ViT-S has 12 heads, not DeiT's 6 (moco-v3#7).

Recipe (official -> this file's default):
    projector D->4096->4096->256 as the ViT head, predictor 256->4096->256; every Linear without bias, BN+ReLU after
    each hidden Linear, a final BatchNorm without affine (builder.py _build_mlp); momentum encoder = a copy of the ViT
    + projector. Loss 2*tau*[CE(q1 k2^T / tau) + CE(q2 k1^T / tau)], tau 0.2. Momentum m from 0.99 to 1 on a
    half-cosine over training, per iteration (--moco-m-cos). Frozen random patch projection (--stop-grad-conv1).
    AdamW with PyTorch's default betas (0.9, 0.999) and weight decay 0.1 on ALL parameters (no parameter groups:
    biases, LayerNorm, BN and cls_token are decayed too), lr = blr * global_batch / 256 with blr 1.5e-4, 40 warm-up
    epochs then a per-iteration cosine to 0, 300 epochs, batch 4096.
    ViT init (vits.py): qkv uniform +-sqrt(6/(D + D)) (q, k, v treated as three D x D matrices), other Linear
    xavier-uniform with zero bias, cls_token normal(std 1e-6), patch projection uniform +-sqrt(6/(3 p^2 + D)) with
    zero bias, fixed sin-cos positions in MoCo's layout; the MLP heads keep PyTorch's default init.
    Augmentation (BYOL's, main_moco.py): two asymmetric views, each RandomResizedCrop(scale 0.08-1, bilinear),
    ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur sigma in [0.1, 2] (p 1.0 on view 1, p 0.1 on
    view 2), solarize (threshold 128) p 0.2 on view 2 only, horizontal flip, ImageNet normalization.
Deviations from the official code, on purpose:
    - bf16 autocast by default (official: fp16 + GradScaler, still available as --amp fp16).
    - Every random choice of the views uses the torch RNG (the official blur and solarize use Python's `random`),
      so --seed reproduces a run. The blur itself is PIL's GaussianBlur(radius=sigma), as officially.
    - The crop size is --img-size (official: 224, hard-coded).
    - SyncBatchNorm only under CUDA DDP: PyTorch's SyncBatchNorm is CUDA-only, so under CPU/gloo every process
      normalizes its own part of the batch (per-GPU BN), and the result depends on the number of processes.
    - One process without torch.distributed works (official: DDP is required): the key gather is then the identity.
    - The momentum always follows the cosine (official: the --moco-m-cos flag, on in the ViT recipe).
    - AdamW gets the trainable parameters only. The frozen patch projection and pos-embed never have a gradient,
      and PyTorch's AdamW skips such parameters, decay included, so the update is the same.
    - No gradient accumulation, on purpose: for a contrastive loss k accumulated micro-batches are not one k-times
      larger batch (each micro-batch sees only its own negatives and its own BN statistics). Lower --batch-size
      instead (the README of moco-v3: smaller batches are more stable, only slower; lr follows through blr).
    - Checkpoints go to --output-dir every epoch; a non-finite loss is checked every --log-every steps. --init
      takes a full MoCo state (ours, or official) or any encoder file vit.load_pretrained reads (into both encoders).

Read top to bottom: the model and its loss, the data, main() (build, then the training loop), the checks of the
inputs, and an appendix of plumbing that is the same text in every method script.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time

import torch
from PIL import ImageFilter
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import torchvision.transforms as T
from tqdm import tqdm

import vit


# ------------------------------------------------------------------------------------------- model and loss

def moco_vit(arch, stop_grad_conv1=True, **kw):
    """A vit.py encoder with MoCo v3's init (vits.py VisionTransformerMoCo). arch: vit.MODELS[name] or
    vit.VisionTransformer; kw go to it (img_size, patch_size, num_heads, ...)."""
    encoder = arch(pos_embed_layout="moco", **kw)  # MoCo's sin-cos layout: [sin, cos](row), [sin, cos](col)
    # Every weight is re-initialized as vits.py does; the MLP heads, added later by MoCo, keep PyTorch's default init.
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # q, k, v are three D x D maps: xavier bound of one of them, sqrt(6 / (D + D))
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(encoder.cls_token, std=1e-6)
    proj = encoder.patch_embed.proj  # xavier bound of the conv seen as a (3 p^2 -> D) Linear
    bound = math.sqrt(6.0 / (proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    if stop_grad_conv1:  # "random patch projection" (paper Sec. 4.2): frozen at init, it stabilizes training
        proj.requires_grad_(False)
    return encoder


def build_mlp(num_layers, in_dim, mlp_dim, out_dim):
    """builder.py _build_mlp with last_bn=True: [Linear(no bias), BN, ReLU] per hidden layer, then Linear(no bias),
    BN(affine=False) ("SimCLR's design, gamma removed"). Sequential indices as official, so checkpoints load."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else mlp_dim, out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)] if i < num_layers - 1 else [nn.BatchNorm1d(d_out, affine=False)]
    return nn.Sequential(*layers)


@torch.no_grad()
def all_gather_nograd(x):
    """Concatenate x from every rank along dim 0: (n, C) -> (world_size * n, C), rank order.
    *** NO GRADIENT ***: dist.all_gather is not differentiable. Right for the momentum keys only, which carry no
    gradient anyway. Without a process group it returns x (detached)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def contrastive_loss(q, k, tau=0.2):
    """InfoNCE (paper Eq. 1; builder.py contrastive_loss). q (n, C) this rank's queries, k (n, C) this rank's keys.
    Logits (n, N) against the keys of the whole global batch; the positive of query i of rank r is key n*r + i.
    The 2*tau factor follows the official code (moco-v3#31: it only rescales the gradient)."""
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits: .float() alone does not stop autocast's bf16 matmul
        q = F.normalize(q.float(), dim=1)  # fp32: normalization and the softmax are precision-sensitive
        k = F.normalize(k.float(), dim=1)
        k = all_gather_nograd(k)  # (N, C), N = n * world_size
        logits = q @ k.t() / tau  # (n, N)
        rank = dist.get_rank() if dist.is_initialized() else 0
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank  # equal n on every rank: drop_last
        return F.cross_entropy(logits, labels) * (2 * tau)


class MoCo(nn.Module):
    """builder.py MoCo_ViT. encoder_fn() builds one vit.py encoder; it is called once per encoder, as officially."""
    def __init__(self, encoder_fn, dim=256, mlp_dim=4096, tau=0.2):
        super().__init__()
        self.tau = tau
        self.base_encoder, self.momentum_encoder = encoder_fn(), encoder_fn()
        D = self.base_encoder.embed_dim
        self.base_encoder.head = build_mlp(3, D, mlp_dim, dim)  # projector: the ViT's CLS token -> (B, dim)
        self.momentum_encoder.head = build_mlp(3, D, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim)  # ViT: last BN kept (the ResNet predictor drops it)
        for pb, pm in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            pm.data.copy_(pb.data)  # the momentum encoder starts as a copy ...
            pm.requires_grad = False  # ... and is never trained by gradients

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        """theta_m <- m * theta_m + (1 - m) * theta_b over the ViT + projector parameters. Buffers (BN running
        statistics) are not averaged: each encoder keeps its own, as officially."""
        for pb, pm in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            pm.copy_(pm * m + pb.detach() * (1.0 - m))  # the official arithmetic: bit-identical momentum weights

    def forward(self, x1, x2, m):
        """x1, x2 (B, 3, H, W): the two views of the same B images; m: momentum for this step. Returns the loss.
        One view per encoder call, as officially: the BN statistics are per view."""
        q1 = self.predictor(self.base_encoder(x1))  # (B, dim)
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():  # keys: no gradient
            self.update_momentum_encoder(m)  # first update, then compute the keys with the new weights
            k1 = self.momentum_encoder(x1)  # (B, dim)
            k2 = self.momentum_encoder(x2)
        return contrastive_loss(q1, k2, self.tau) + contrastive_loss(q2, k1, self.tau)  # symmetrized


def momentum_at(step, steps_per_epoch, args):
    """main_moco.py adjust_moco_momentum: m = 1 - (1 - m0) * (1 + cos(pi * t / E)) / 2, t the fractional epoch,
    so m goes from m0 (0.99) at the first step to 1 at the end. A pure function of the step, like lr_at."""
    t = step / steps_per_epoch
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / args.epochs)) * (1.0 - args.moco_m)


# ------------------------------------------------------------------------------------------------------- data

class GaussianBlur:
    """PIL's Gaussian blur with sigma ~ U[0.1, 2] (moco/loader.py GaussianBlur), drawn from torch's RNG so that
    seeding reproduces the views. PIL's filter is ~3-4x cheaper than a 23-tap tensor blur, which matters: the two
    views are the loader's bottleneck."""
    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=torch.empty(()).uniform_(0.1, 2.0).item()))


def view_transform(args, blur_p, solarize_p):
    """One of BYOL's two asymmetric pipelines (main_moco.py augmentation1 / augmentation2)."""
    return T.Compose([
        T.RandomResizedCrop(args.img_size, scale=(args.crop_min, 1.0)),  # bilinear, as officially
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # "not strengthened" (official comment)
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur()], p=blur_p),
        *([T.RandomSolarize(128, p=solarize_p)] if solarize_p > 0 else []),  # PIL ImageOps.solarize's threshold
        T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViews:
    """One image -> [view1, view2] (moco/loader.py TwoCropsTransform): view 1 always blurred, view 2 rarely blurred
    and sometimes solarized."""
    def __init__(self, args):
        self.view1 = view_transform(args, blur_p=1.0, solarize_p=0.0)
        self.view2 = view_transform(args, blur_p=0.1, solarize_p=0.2)

    def __call__(self, img):
        return [self.view1(img), self.view2(img)]


# ------------------------------------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v3 pre-training (Chen, Xie, He 2021)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, output_dir="runs/moco", model="vit_base", epochs=300, warmup_epochs=40, batch_size=4096,
                    blr=1.5e-4, weight_decay=0.1)  # MoCo v3 CONFIG.md ViT recipe (wd on all parameters)
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: the model's). The paper's "
                   "ViT-S has 12 (vit.py's vit_small: 6): pass 12 for it, also with an official ViT-S checkpoint")
    p.add_argument("--moco-dim", type=int, default=256, help="output dim of projector and predictor (paper: 256)")
    p.add_argument("--moco-mlp-dim", type=int, default=4096, help="hidden dim of projector and predictor (paper: 4096)")
    p.add_argument("--moco-t", type=float, default=0.2, help="softmax temperature tau (paper ViT: 0.2)")
    p.add_argument("--moco-m", type=float, default=0.99, help="momentum at step 0; cosine to 1 at the end (paper: 0.99)")
    p.add_argument("--stop-grad-conv1", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the random patch projection (paper ViT recipe: on; it avoids loss spikes)")
    p.add_argument("--crop-min", type=float, default=0.08, help="RandomResizedCrop min scale (paper ViT: 0.08)")
    return p.parse_args(argv)


def build_model(args, verbose=True):
    """MoCo v3 of --model's size (--num-heads, --init); the same seed on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(args.seed)
    kw = {k: v for k, v in (("patch_size", args.patch_size), ("num_heads", args.num_heads)) if v}
    encoder_fn = functools.partial(moco_vit, vit.MODELS[args.model], args.stop_grad_conv1, img_size=args.img_size, **kw)
    try:
        model = MoCo(encoder_fn, args.moco_dim, args.moco_mlp_dim, args.moco_t)
    except AssertionError as e:  # vit.py checks the sizes: e.g. embed_dim not divisible by --num-heads
        raise StopRun(f"--model {args.model}: {e}") from None
    args.patch_size, args.num_heads = model.base_encoder.patch_size, model.base_encoder.blocks[0].attn.num_heads
    if args.init:
        print0(f"--init {args.init}: " + load_init(model, args.init, verbose))
    return model


def build_optimizer(model, args, device):
    """AdamW with default betas and weight decay on every trainable parameter, as main_moco.py."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                             weight_decay=args.weight_decay, fused=device.type == "cuda")


def main(argv=None):
    args = get_args(argv)
    run = Run(args)
    check_args(args, run.world_size)
    loader = run.loader(build_dataset(args, TwoViews(args)))
    model = build_model(args, verbose=run.is_main).to(run.device)
    if run.world_size > 1 and run.device.type == "cuda":
        # main_moco.py converts every BN to SyncBN, so the projector/predictor statistics are over the global batch
        # of the recipe. SyncBatchNorm is CUDA-only in PyTorch: on CPU/gloo each process keeps per-process BN.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, args, run.device)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and run.device.type == "cuda")
    start_epoch = run.resume(model, optimizer, scaler)
    ddp_model = run.wrap(model)  # one forward of one module per step: both views, the momentum update and the loss
    # m enters the model as a 0-d tensor: a Python float that changes every step makes torch.compile specialize on
    # it (recompiles, and a crash in DDP's graph splitting). float64 keeps eager results bit-identical to a float.
    m_t = torch.zeros((), dtype=torch.float64, device=run.device)

    for epoch in range(start_epoch, args.epochs):
        for (x1, x2), _ in run.batches(loader, epoch):
            lr = set_lr(optimizer, lr_at(run.step, run.steps_per_epoch, args))
            m = momentum_at(run.step, run.steps_per_epoch, args)
            x1, x2 = x1.to(run.device, non_blocking=True), x2.to(run.device, non_blocking=True)
            with autocast(args, run.device):
                m_t.fill_(m)  # no host sync (torch.tensor(m, device=...) would copy and wait)
                loss = ddp_model(x1, x2, m_t)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.end_step(loss, lr=lr, m=m)
        run.end_epoch(model, optimizer, scaler)
    run.finish({k: v for k, v in model.base_encoder.state_dict().items() if not k.startswith("head.")})  # no projector
    return model


# ------------------------------------------------------------------------------- inputs and their one-line errors

def check_args(args, world_size):
    if not 0.0 <= args.moco_m <= 1.0:
        raise StopRun(f"--moco-m {args.moco_m} must lie in [0, 1] (paper: 0.99)")
    if args.batch_size // world_size < 2:
        raise StopRun(f"--batch-size {args.batch_size} gives {args.batch_size // world_size} image(s) per process; the "
                      f"BatchNorm in the projector and predictor needs at least 2: use --batch-size {2 * world_size} or more")


def load_init(model, path, verbose=True):
    """--init PATH. A full MoCo state whose names and shapes all match (our checkpoint.pt, or an official MoCo v3
    checkpoint with 'module.' names) restores everything: both encoders, projectors and the predictor. Anything else
    that vit.load_pretrained reads (encoder.pt, MAE, timm) goes into BOTH encoders; the heads stay as initialized."""
    if not os.path.isfile(path):
        raise StopRun(f"--init {path}: no such file; pass a checkpoint.pt, encoder.pt or an official .pth(.tar)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StopRun(f"--init {path}: cannot read it as a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise StopRun(f"--init {path}: holds a {type(sd).__name__}, not a state dict")
    full = next((sd[k] for k in ("model", "state_dict") if isinstance(sd.get(k), dict)), sd)
    full = {k.removeprefix("module."): v for k, v in full.items()}
    own = model.state_dict()
    if all(torch.is_tensor(full.get(k)) and full[k].shape == v.shape for k, v in own.items()):
        model.load_state_dict({k: full[k] for k in own})
        return "full MoCo state (both encoders, projectors, predictor)"
    try:
        for enc in (model.base_encoder, model.momentum_encoder):
            vit.load_pretrained(enc, sd, verbose=verbose and enc is model.base_encoder)
    except ValueError as e:
        raise StopRun(f"--init {path}: {e}") from None
    return "encoder weights into both encoders; projectors and predictor as initialized"


# ================================================================= appendix: the same text in every method script
# Plumbing every training script shares (data, processes, schedule, checkpoints, logging, command line, one-line
# errors); tests/test_shared_blocks.py keeps it identical everywhere: read it once, skip it in the other scripts.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class StopRun(Exception):
    """A problem the user can fix (bad input, a diverged run): printed as one line, without a traceback."""


def one_line(e):
    """The message of a StopRun, also when it was raised inside a DataLoader worker and wrapped there."""
    lines = str(e).strip().splitlines()
    return lines[-1].split("StopRun: ", 1)[-1] if len(lines) > 1 else str(e)


def pil_loader(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise StopRun(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace that file") from None


def build_dataset(args, transform, split="train"):
    """--data ROOT: ROOT/<split> as an ImageFolder (ImageNet layout). --data cifar10|cifar100|stl10: torchvision
    downloads into --data-root on first use ('val' is the test split)."""
    import torchvision.datasets as datasets
    train, named = split == "train", {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    try:
        if args.data in named:
            return named[args.data](args.data_root, train=train, transform=transform, download=True)
        if args.data == "stl10":
            return datasets.STL10(args.data_root, "train+unlabeled" if train else "test", transform=transform, download=True)
    except (OSError, RuntimeError) as e:  # no network, a partial download, a full disk
        raise StopRun(f"--data {args.data}: could not download into --data-root {args.data_root} ({e}); "
                      f"download it by hand into that folder, or pass an ImageFolder root") from None
    layout, folder = f"ROOT/{split}/<class>/<image>", os.path.join(args.data, split)
    if not os.path.isdir(args.data):
        raise StopRun(f"--data {args.data}: no such folder; pass an ImageNet-layout root ({layout}) or one of "
                      f"cifar10, cifar100, stl10")
    if not os.path.isdir(folder):
        raise StopRun(f"--data {args.data}: no '{split}' folder inside; expected the ImageNet layout {layout}")
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=pil_loader)
    except FileNotFoundError as e:
        raise StopRun(f"--data {args.data}: {folder} holds no class folders with images ({e}); expected {layout}") from None


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(" ".join(str(x) for x in a), **kw)


def lr_at(step, steps_per_epoch, args):
    """Per-iteration schedule (MAE util/lr_sched.py): 1) linear warm-up from 0 over warmup_epochs,
    2) half-cosine from lr to 0 over the remaining epochs. A pure function of the step, so resuming needs no state."""
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))


def set_lr(optimizer, lr):
    """Every parameter group gets lr x its "lr_scale" (1 unless a script sets one, e.g. graft.py's lower layers)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def autocast(args, device):
    if args.amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()  # CPU runs in fp32
    return torch.autocast("cuda", dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def save_checkpoint(obj, path):
    """Atomic: write a temporary file, then rename it over the old one; a crash never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


# The flags a resumed run may change (where things are, how fast, how long); any other would continue another run.
RESUME_MAY_CHANGE = {"data", "data_root", "output_dir", "epochs", "num_workers", "amp", "compile", "log_every",
                     "max_steps", "vis_every", "init", "mim_checkpoint", "teacher"}


class Run:
    """Everything around the training loop: processes and device, the step count, checkpoint.pt (resume, then a save
    after every whole epoch), log.jsonl and encoder.pt. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python`
    runs one process on cuda:0 or the CPU (gloo for several CPU processes: tests and debugging)."""
    def __init__(self, args):
        self.args, self.step, self.log_file = args, 0, None
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.is_main, local_rank = self.rank == 0, int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if "RANK" in os.environ and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        elif "RANK" in os.environ:
            dist.init_process_group("gloo")  # CPU: tests and debugging
        if args.batch_size % self.world_size:
            raise StopRun(f"--batch-size {args.batch_size} is global and must be divisible by the {self.world_size} "
                          f"processes; use e.g. {args.batch_size // self.world_size * self.world_size}")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        args.lr = args.blr * args.batch_size / 256
        os.makedirs(args.output_dir, exist_ok=True)
        self.ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
        print0(f"lr = blr {args.blr} x batch {args.batch_size} / 256 = {args.lr:.3g}; {self.world_size} process(es) x "
               f"{args.batch_size // self.world_size} images on {self.device}; torch {torch.__version__}")

    def loader(self, dataset):
        """Each process its share of a seed + epoch shuffle; drop_last: every step has the same per-process batch."""
        b = self.args.batch_size // self.world_size
        if len(dataset) < self.args.batch_size:
            raise StopRun(f"--data has {len(dataset)} training images, fewer than one --batch-size "
                          f"{self.args.batch_size}; lower --batch-size")
        sampler = torch.utils.data.DistributedSampler(dataset, self.world_size, self.rank, seed=self.args.seed,
                                                      drop_last=True)
        loader = torch.utils.data.DataLoader(dataset, b, sampler=sampler, num_workers=self.args.num_workers,
                                             pin_memory=self.device.type == "cuda", drop_last=True)
        self.steps_per_epoch = len(loader)
        return loader

    def resume(self, model, optimizer, scaler):
        """Load checkpoint.pt if there is one (refusing one of another recipe); write args.json. Returns the epoch."""
        epoch, args = 0, self.args
        if os.path.isfile(self.ckpt_path):
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            for k, v in ckpt["args"].items():
                if k not in RESUME_MAY_CHANGE and getattr(args, k, v) != v:
                    raise StopRun(f"{self.ckpt_path} was written with --{k.replace('_', '-')} {v}, not "
                                  f"{getattr(args, k)}; pass the same value or another --output-dir")
            try:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise StopRun(f"{self.ckpt_path} does not fit this model ({str(e).strip().splitlines()[0]}); pass the "
                              f"flags of the run that wrote it, or another --output-dir") from None
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            epoch = ckpt["epoch"]
            print0(f"resumed from {self.ckpt_path} at epoch {epoch}")
        if self.is_main:
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            self.log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a")
        self.step = epoch * self.steps_per_epoch
        return epoch

    def wrap(self, model):
        """--compile and, with several processes, DDP around the model (the module itself stays as it is)."""
        model = torch.compile(model) if self.args.compile else model
        if self.world_size > 1:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def batches(self, loader, epoch):
        """The epoch's batches, until --max-steps. Data, masks and augmentations are a function of (seed, epoch,
        rank): a resumed epoch sees what the interrupted one saw."""
        self.epoch, self.epoch_done, self.sums, self.n, self.t0 = epoch, False, {}, 0, time.perf_counter()
        if self.args.max_steps is not None and self.step >= self.args.max_steps:
            return
        torch.manual_seed(self.args.seed + 10_000 * epoch + self.rank)
        loader.sampler.set_epoch(epoch)
        for self.it, batch in enumerate(tqdm(loader, f"epoch {epoch}", disable=not self.is_main, leave=False,
                                             dynamic_ncols=True)):
            yield batch
            if self.args.max_steps is not None and self.step >= self.args.max_steps:
                return
        self.epoch_done = True

    def end_step(self, loss, **logged):
        """Count one optimizer step. Every --log-every steps and at the epoch's end, one log line (one host sync):
        loss and the other tensors averaged over those steps and the processes; lr and other numbers as given."""
        self.step, self.n = self.step + 1, self.n + 1
        for k, v in {"loss": loss, **logged}.items():
            if torch.is_tensor(v):
                self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        if self.step % self.args.log_every and self.it != self.steps_per_epoch - 1:
            return
        means = torch.stack(list(self.sums.values())) / self.n
        if self.world_size > 1:
            dist.all_reduce(means)
            means /= self.world_size
        means = dict(zip(self.sums, means.tolist()))
        if not math.isfinite(means["loss"]):
            raise StopRun(f"non-finite loss ({means['loss']}) within steps {self.step - self.n + 1}-{self.step}; "
                          f"the last checkpoint ({self.ckpt_path}) is intact: lower --blr or use --amp bf16")
        log = {"epoch": self.epoch, "step": self.step, **{k: round(v, 5) for k, v in means.items()},
               **{k: v for k, v in logged.items() if not torch.is_tensor(v)},
               "img_per_s": round(self.n * self.args.batch_size / (time.perf_counter() - self.t0), 1),
               "mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if self.device.type == "cuda" else 0.0}
        print0(json.dumps(log))
        if self.is_main:
            self.log_file.write(json.dumps(log) + "\n")
            self.log_file.flush()
        self.sums, self.n, self.t0 = {}, 0, time.perf_counter()

    def end_epoch(self, model, optimizer, scaler):
        """checkpoint.pt after an epoch that ran to its end (rank 0 writes, all wait). Returns whether it wrote."""
        if self.epoch_done and self.is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                             "epoch": self.epoch + 1, "args": vars(self.args)}, self.ckpt_path)
        if self.epoch_done and self.world_size > 1:
            dist.barrier()
        return self.epoch_done

    def finish(self, encoder_state_dict):
        """encoder.pt: the encoder alone, in vit.py / timm names."""
        if self.is_main:
            save_checkpoint(encoder_state_dict, os.path.join(self.args.output_dir, "encoder.pt"))
            print0(f"done: {self.args.output_dir}/encoder.pt after {self.step} steps")
            self.log_file.close()
        if self.world_size > 1:
            dist.destroy_process_group()


def add_common_args(p, **defaults):
    """The command line every method script shares; each script passes its paper defaults."""
    p.add_argument("--data", required=True, help="ImageNet-layout root (ROOT/train/<class>/*) or cifar10|cifar100|stl10")
    p.add_argument("--data-root", default="./data", help="download folder for --data cifar10|cifar100|stl10")
    p.add_argument("--output-dir", default=defaults["output_dir"], help="checkpoint.pt, encoder.pt, args.json, log.jsonl")
    p.add_argument("--model", default=defaults["model"], choices=list(vit.MODELS), help="encoder size")
    p.add_argument("--img-size", type=int, default=224, help="input resolution")
    p.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's, 16 or 14)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="training epochs")
    p.add_argument("--warmup-epochs", type=int, default=defaults["warmup_epochs"], help="linear warm-up epochs")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="GLOBAL batch, over all processes")
    p.add_argument("--blr", type=float, default=defaults["blr"], help="base lr; lr = blr * batch_size / 256")
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"], help="AdamW weight decay")
    p.add_argument("--num-workers", type=int, default=min(10, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype on CUDA (CPU: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="seed for init (same on all ranks) and data (seed+rank)")
    p.add_argument("--init", default=None, help="start from these weights (any file vit.load_pretrained reads)")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines (and non-finite loss checks)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    return p
# ====================================================================================================== end appendix


if __name__ == "__main__":
    try:
        main()
    except StopRun as e:
        sys.exit(f"error: {one_line(e)}")
