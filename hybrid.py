"""Hybrid: the naive joint objective of CL and MIM on one shared ViT, L = (1 - lam) L_MIM + lam L_CL, end to end in
one file. The multi-task baseline of Layer Grafted Pre-training (Jiang et al., ICLR 2023), whose "naive joint
optimization" leads to "conflicting gradient directions - more severe as the layers go deeper", and the "simplest
harmonization" of "What Do Self-Supervised Vision Transformers Learn?" (Park et al., ICLR 2023).

MIM is mae.py's: the shared encoder sees the visible 25% of a minimally augmented view (crop + flip, as MAE) and MAE's
light decoder regresses the normalized pixels of the removed patches. CL is moco.py's: two BYOL views through the
same encoder with MoCo v3's projector and predictor, keys from a momentum copy of encoder + projector, symmetric
InfoNCE over the global batch. lam = 0 is MAE, lam = 1 is MoCo v3 (a test checks both ends against mae.py's and
moco.py's losses on the same weights and images). Both losses are computed at every step (and logged), so the
gradients of each can be compared per block (analyze.py --conflict, on this script's checkpoint.pt: it keeps both
heads).

Run (defaults: the recipe the two share, see below):
    torchrun --nproc_per_node 8 hybrid.py --data /imagenet --output-dir runs/hybrid_vitb
    python hybrid.py --data cifar10 --model vit_tiny --img-size 32 --patch-size 4 --batch-size 256 --epochs 100 \
        --warmup-epochs 10 --blr 1e-3
A run auto-resumes from OUTPUT_DIR/checkpoint.pt at the step it stopped (README: When things go wrong). The shared
encoder, without the projector, ends up in OUTPUT_DIR/encoder.pt (vit.py / timm names).

Recipe (sources -> this file's default):
    --lam 0.2: Park et al.'s sweep of (1 - lam) SimMIM + lam MoCo (their Fig. 12, values read off the figure, in a
    reduced setting) has lam 0.2 best for fine-tuning (about 82.3 vs 81.9 for MIM alone and 81.35 for CL alone) with
    most of CL's linear-probe gain (about 61.5 vs 18.5 MIM and 58 CL). Layer Grafted does not publish the weights of
    its multi-task baseline's two losses.
    MIM part = mae.py: mask ratio 0.75, norm-pix loss, decoder 512-d x 8 blocks x 16 heads, RandomResizedCrop(scale
    0.2-1, bicubic) + flip. CL part = moco.py: projector D->4096->4096->256, predictor 256->4096->256, tau 0.2,
    momentum 0.99 -> 1 (cosine), BYOL's two views (crop scale 0.08-1).
    What the two recipes share: blr 1.5e-4, global batch 4096, 40 warm-up epochs then a per-iteration cosine.
Our choices where they differ (no published recipe of this hybrid says otherwise):
    - 300 epochs (MoCo v3's ViT-B; MAE's 800 cost more than twice as much here, where every step runs both parts).
    - The encoder starts with vit.py's (MAE's) init, and its patch projection trains (MoCo v3 freezes a random one,
      --stop-grad-conv1, against loss spikes; a frozen projection would also limit what MIM can learn).
    - AdamW(0.9, 0.95), weight decay 0.05, none on 1-D parameters: MAE's optimizer (MoCo v3: default betas, 0.1 on
      every parameter).
    - As moco.py: SyncBN in the projector and predictor under CUDA DDP only, and its --in-memory views.
Plumbing as in every script (bf16, DDP, global batch, exact resume, NaN checks, --in-memory): README, "What every
script does the same way"."""
import argparse
import contextlib
import datetime
import fcntl
import hashlib
import functools
import json
import math
import os
import signal
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

# checked copy of moco.py (tests/test_shared_blocks.py): build_mlp, all_gather_nograd, contrastive_loss, MoCo
def build_mlp(num_layers, in_dim, mlp_dim, out_dim):
    """builder.py _build_mlp with last_bn=True: [Linear(no bias), BN, ReLU] per hidden layer, then Linear(no bias),
    BN(affine=False) ("SimCLR's design, gamma removed"). Sequential indices as official, so checkpoints load."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        d_in, d_out = in_dim if i == 0 else mlp_dim, out_dim if last else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        layers += [nn.BatchNorm1d(d_out, affine=False)] if last else [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
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
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits; .float() alone leaves autocast's bf16 matmul
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


class Hybrid(nn.Module):
    """One shared vit.py encoder with both heads: MoCo v3's (self.moco: the encoder as moco.base_encoder with its
    projector, the momentum copy, the predictor) and MAE's decoder (built here as MaskedAutoencoder.__init__ builds
    it; its methods below are checked copies of mae.py's)."""
    def __init__(self, encoder_fn, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True,
                 mask_ratio=0.75, dim=256, mlp_dim=4096, tau=0.2, lam=0.2):
        super().__init__()
        self.moco = MoCo(encoder_fn, dim, mlp_dim, tau)
        self.patch_size = self.encoder.patch_size
        self.norm_pix_loss, self.mask_ratio, self.lam = norm_pix_loss, mask_ratio, lam
        # MAE's decoder (mae.py): linear map to the decoder width, mask token, fixed sin-cos positions, blocks, pixels
        self.decoder_embed = nn.Linear(self.encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos_embed = vit.sincos_pos_embed(decoder_embed_dim, self.patch_embed.grid_size)[None]  # (1, 1+L, Dd)
        self.decoder_pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.decoder_blocks = nn.ModuleList([vit.Block(decoder_embed_dim, decoder_num_heads)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * 3)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:  # MAE init, as in vit.py
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def encoder(self):
        """The shared encoder: MoCo's base encoder (its head is the projector). A property, not a second name in
        the state dict."""
        return self.moco.base_encoder

    @property
    def patch_embed(self):
        return self.encoder.patch_embed

    # checked copy of mae.py (tests/test_shared_blocks.py): MaskedAutoencoder.patchify, random_masking,
    # forward_decoder, forward_loss
    def patchify(self, imgs):
        """(B, 3, H, W) -> (B, L, p*p*3), channels fastest (the official 'nchpwq->nhwpqc' order)."""
        p, B = self.patch_size, imgs.shape[0]
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
        return x.reshape(B, h * w, p * p * 3)

    @staticmethod
    def random_masking(noise, mask_ratio):
        """Per-sample random masking (MAE Sec. 3): keep the len_keep patches with the lowest noise."""
        B, L = noise.shape
        len_keep = int(L * (1 - mask_ratio))  # 196 * 0.25 = 49
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # inverse permutation
        ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
        mask = torch.ones(B, L, device=noise.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (B, L), 1 = removed, in the original patch order
        return ids_keep, ids_restore, mask

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # one per removed patch
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # CLS back in front
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*3), CLS dropped

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error on the removed patches only; targets normalized per patch if norm_pix_loss."""
        target = self.patchify(imgs).float()  # fp32: pixel statistics and the MSE are precision-sensitive
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as official
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L) per-patch MSE
        return (loss * mask).sum() / mask.sum()

    def forward(self, x_mim, x1, x2, m, noise=None):
        """x_mim: the MIM view; x1, x2: the two CL views of the same B images; m: the momentum of this step; noise
        (B, L) decides the mask (random when None). Returns (loss, loss_mim, loss_cl)."""
        if noise is None:
            noise = torch.rand(x_mim.shape[0], self.patch_embed.num_patches, device=x_mim.device)
        ids_keep, ids_restore, mask = self.random_masking(noise, self.mask_ratio)
        latent = self.encoder.forward_features(x_mim, ids_keep)  # (B, 1+K, D): visible patches only
        loss_mim = self.forward_loss(x_mim, self.forward_decoder(latent, ids_restore), mask)
        loss_cl = self.moco(x1, x2, m)  # the same encoder, full views, then the projector and predictor
        return (1 - self.lam) * loss_mim + self.lam * loss_cl, loss_mim, loss_cl


# checked copy of moco.py (tests/test_shared_blocks.py)
def momentum_at(step, steps_per_epoch, args):
    """main_moco.py adjust_moco_momentum: m = 1 - (1 - m0) * (1 + cos(pi * t / E)) / 2, t the fractional epoch,
    so m goes from m0 (0.99) at the first step to 1 at the end. A pure function of the step, like lr_at."""
    t = step / steps_per_epoch
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / args.epochs)) * (1.0 - args.moco_m)


# ------------------------------------------------------------------------------------------------------- data

# checked copy of mae.py (tests/test_shared_blocks.py)
def train_transform(args):
    # MAE main_pretrain.py: RandomResizedCrop(scale 0.2-1, bicubic) + flip, nothing else.
    return T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# checked copy of mae.py (tests/test_shared_blocks.py)
def train_transform_batch(x, args):
    """train_transform on a batch of uint8 images on the device (--in-memory): the appendix's ops, a draw per image."""
    return T.functional.normalize(resized_crop(x, args.img_size, (0.2, 1.0), "bicubic"), IMAGENET_MEAN, IMAGENET_STD)


# checked copy of moco.py (tests/test_shared_blocks.py): GaussianBlur, view_transform, TwoViews
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


# checked copy of moco.py (tests/test_shared_blocks.py): view_transform_batch, two_views_batch
def view_transform_batch(x, args, blur_p, solarize_p):
    """view_transform on a batch of uint8 images on the device (--in-memory): the appendix's ops, a draw per image.
    The blur is a true Gaussian (PIL's GaussianBlur approximates one with box filters)."""
    x = resized_crop(x, args.img_size, (args.crop_min, 1.0), "bilinear")  # the flip included
    x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8)
    x = random_grayscale(x, p=0.2)
    x = gaussian_blur(x, (0.1, 2.0), p=blur_p)
    return T.functional.normalize(random_solarize(x, p=solarize_p), IMAGENET_MEAN, IMAGENET_STD)


def two_views_batch(x, args):
    """TwoViews on a batch (--in-memory)."""
    return [view_transform_batch(x, args, blur_p=1.0, solarize_p=0.0),
            view_transform_batch(x, args, blur_p=0.1, solarize_p=0.2)]


class ThreeViews:
    """One image -> [MAE's view, BYOL's view 1, BYOL's view 2]: each part of the loss sees its own augmentation."""
    def __init__(self, args):
        self.mim, self.cl = train_transform(args), TwoViews(args)

    def __call__(self, img):
        return [self.mim(img), *self.cl(img)]


def three_views_batch(x, args):
    """ThreeViews on a batch (--in-memory)."""
    return [train_transform_batch(x, args), *two_views_batch(x, args)]


# ------------------------------------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description="CL + MIM on one ViT: (1 - lam) MAE + lam MoCo v3",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, output_dir="runs/hybrid", model="vit_base", epochs=300, warmup_epochs=40, batch_size=4096,
                    blr=1.5e-4, weight_decay=0.05)  # the shared MAE / MoCo v3 values; 300 epochs and wd: ours
    p.add_argument("--lam", type=float, default=0.2, help="weight of the CL loss: (1 - lam) L_MIM + lam L_CL "
                   "(Park et al. Fig. 12: 0.2)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (MAE: 0.75)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalized pixel targets (MAE: on)")
    p.add_argument("--decoder-embed-dim", type=int, default=512, help="decoder width (MAE: 512)")
    p.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks (MAE: 8)")
    p.add_argument("--decoder-num-heads", type=int, default=16, help="decoder heads (MAE: 16)")
    p.add_argument("--moco-dim", type=int, default=256, help="output dim of projector and predictor (MoCo v3: 256)")
    p.add_argument("--moco-mlp-dim", type=int, default=4096,
                   help="hidden dim of projector and predictor (MoCo v3: 4096)")
    p.add_argument("--moco-t", type=float, default=0.2, help="softmax temperature tau (MoCo v3: 0.2)")
    p.add_argument("--moco-m", type=float, default=0.99, help="step-0 momentum; cosine to 1 at the end (MoCo v3: 0.99)")
    p.add_argument("--crop-min", type=float, default=0.08,
                   help="RandomResizedCrop min scale of the CL views (MoCo v3: 0.08)")
    return check_args(p.parse_args(argv))


def build_model(args, verbose=True):
    """The Hybrid of --model's size; the same seed on every rank (DDP also broadcasts rank 0's weights)."""
    torch.manual_seed(args.seed)
    encoder_fn = functools.partial(vit.MODELS[args.model], img_size=args.img_size,
                                   **({"patch_size": args.patch_size} if args.patch_size else {}))
    try:
        model = Hybrid(encoder_fn, args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads,
                       args.norm_pix_loss, args.mask_ratio, args.moco_dim, args.moco_mlp_dim, args.moco_t, args.lam)
    except AssertionError as e:  # vit.py checks the sizes: e.g. img_size not a multiple of the patch
        raise StopRun(f"--model {args.model}: {e}") from None
    args.patch_size, L = model.patch_size, model.patch_embed.num_patches
    if not 1 <= int(L * (1 - args.mask_ratio)) < L:
        raise StopRun(f"--mask-ratio {args.mask_ratio} keeps {int(L * (1 - args.mask_ratio))} of {L} patches; the "
                      f"encoder needs 1 or more and the decoder 1 or more to rebuild (MAE: 0.75)")
    if verbose:
        print0(f"L = {1 - args.lam:g} x MAE ({int(L * (1 - args.mask_ratio))} of {L} patches seen) + {args.lam:g} x "
               f"MoCo v3 (two full views), one shared {args.model}")
    if args.init:
        load_init(model, args.init, verbose)
    return model


def build_optimizer(model, args, device):
    """AdamW(0.9, 0.95), no weight decay on 1-D parameters (norms, biases); the momentum encoder and the fixed
    pos-embeds have no gradient and are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def main(argv=None):
    args = get_args(argv)
    run = Run(args, nan_suspects=("moco_t", "mask_ratio"))
    loader = run.loader(build_dataset(args, ThreeViews(args)), three_views_batch)
    model = build_model(args, verbose=run.is_main).to(run.device)
    if run.world_size > 1 and run.device.type == "cuda":  # as moco.py: BN statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, args, run.device)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and run.device.type == "cuda")
    epochs = run.resume(model, optimizer, scaler)
    ddp_model = run.wrap(model)  # one forward of one module per step: both parts of the loss
    m_t = torch.zeros((), dtype=torch.float64, device=run.device)  # a 0-d tensor, as in moco.py

    for epoch in epochs:
        for (x_mim, x1, x2), _ in run.batches(loader, epoch):
            lr = set_lr(optimizer, lr_at(run.step, run.steps_per_epoch, args))
            m = momentum_at(run.step, run.steps_per_epoch, args)
            x_mim, x1, x2 = (x.to(run.device, non_blocking=True) for x in (x_mim, x1, x2))
            with autocast(args, run.device):
                m_t.fill_(m)
                loss, loss_mim, loss_cl = ddp_model(x_mim, x1, x2, m_t)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.end_step(loss, lr=lr, m=m, loss_mim=loss_mim, loss_cl=loss_cl)
    run.finish({k: v for k, v in model.encoder.state_dict().items() if not k.startswith("head.")})  # no projector
    return model


# ------------------------------------------------------------------------------- inputs and their one-line errors

def check_args(args):
    """The flags, the shared ones first, refused before anything is read or written."""
    check_common_args(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_flags(args, [(0 <= args.lam <= 1, "--lam", "must lie in [0, 1] (0: MAE, 1: MoCo v3; Park et al.: 0.2)"),
                       (0 < args.mask_ratio < 1, "--mask-ratio", "must lie in (0, 1) (MAE: 0.75)"),
                       (args.moco_t > 0, "--moco-t", "must be > 0 (MoCo v3: 0.2)"),
                       (0.0 <= args.moco_m <= 1.0, "--moco-m", "must lie in [0, 1] (MoCo v3: 0.99)"),
                       (0 < args.crop_min <= 1, "--crop-min", "must lie in (0, 1] (MoCo v3: 0.08)"),
                       *[(getattr(args, f) >= 1, "--" + f.replace("_", "-"), "must be >= 1") for f in
                         ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "moco_dim", "moco_mlp_dim")],
                       (args.batch_size // world_size >= 2, "--batch-size", f"gives {args.batch_size // world_size} "
                        f"image(s) per process; the BatchNorm in the projector and predictor needs 2 or more")])
    return args


def load_init(model, path, verbose):
    """--init: the shared encoder (into both MoCo encoders) from any file vit.load_pretrained reads; a hybrid.py
    checkpoint.pt restores everything. Otherwise the heads start as initialized, MAE's decoder included."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    except Exception as e:  # damaged, truncated, or not a PyTorch file
        raise StopRun(f"--init {path}: cannot read it as a PyTorch checkpoint ({type(e).__name__})") from None
    try:
        if isinstance(sd, dict) and sd.get("method") == METHOD and "optimizer" in sd:
            model.load_state_dict(sd["model"])
            return print0(f"--init {path}: every weight (a hybrid.py checkpoint)")
        for enc in (model.moco.base_encoder, model.moco.momentum_encoder):
            vit.load_pretrained(enc, path, verbose=verbose and enc is model.encoder)
    except ValueError as e:  # missing, unreadable, another model size
        raise StopRun(f"--init {path}: {e}") from None
    except RuntimeError as e:  # a hybrid checkpoint of other sizes
        raise StopRun(f"--init {path} does not fit ({str(e).strip().splitlines()[-1].strip()}); pass the flags of the "
                      f"run that wrote it") from None


# ================================================================= appendix: the same text in every method script
# Plumbing every training script shares (data, processes, schedule, checkpoints, signals, logging, the shared flags
# and their one-line errors), kept identical everywhere by tests/test_shared_blocks.py: read it once. One step of the
# loop: run.batches yields its batch (draws seeded by (seed, step, rank)), lr_at its lr, run.end_step logs and saves.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METHOD = os.path.splitext(os.path.basename(__file__))[0]  # "mae", "moco", ...: recorded in every file a run writes


class StopRun(Exception):
    """A problem the user can fix (bad input, a diverged run, a stop signal): printed as one line, no traceback."""


def one_line(e):
    """The message of a StopRun, also when it was raised inside a DataLoader worker and wrapped there."""
    lines = str(e).strip().splitlines()
    return lines[-1].split("StopRun: ", 1)[-1] if len(lines) > 1 else str(e)


def pil_loader(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode.startswith("I"):  # 16-bit grey PNG/TIFF: convert("RGB") would clip it to almost white
                import numpy as np
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
            return img.convert("RGB")
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
            split_name = "train+unlabeled" if train else "test"
            return datasets.STL10(args.data_root, split_name, transform=transform, download=True)
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
        raise StopRun(f"--data {args.data}: {folder} holds no class folders with images ({e}); "
                      f"expected {layout}") from None


class Seeded(torch.utils.data.Dataset):
    """dataset[(index, seed)]: the item, its random augmentation drawn from torch's RNG seeded with `seed` (the
    CPU state is restored after): a view depends on the image's place in the epoch, not on workers or restarts."""
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, index_seed):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(index_seed[1])  # the CPU one only (torch.manual_seed: CUDA too, slowly)
            return self.dataset[index_seed[0]]


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


def tensors(obj):
    """Every tensor in a nest of dicts, lists and tuples (a checkpoint)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from tensors(v)


def save_checkpoint(obj, path):
    """Atomic: written to a temporary file that is then renamed over the old one, so a crash, a kill or a full disk
    never leaves a half-written checkpoint (a failed write removes its temporary file). Refuses NaN weights."""
    if not all(torch.isfinite(t).all() for t in tensors(obj) if t.is_floating_point()):
        raise StopRun(f"the weights to be saved in {path} are not finite (NaN or inf); nothing was written")
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # e.g. the disk filled up during the write
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise StopRun(f"could not write {path} ({type(e).__name__}: {str(e).strip().splitlines()[0]}); free some "
                      f"space or pass another --output-dir (the last checkpoint is kept)") from None


def check_flags(args, rules):
    """rules: (ok, flag, what it must be). The first broken rule stops the run before anything is read or written."""
    for ok, flag, rule in rules:
        if not ok:
            raise StopRun(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {rule}")


def check_common_args(a):
    """The shared flags' rules; then the lr the optimizer starts from: lr = blr x batch / 256."""
    at_least = {"batch_size": 1, "epochs": 1, "img_size": 1, "num_workers": 0, "log_every": 1, "save_every_minutes": 0,
                "keep_every_epochs": 0}
    check_flags(a, [(getattr(a, k) >= low, "--" + k.replace("_", "-"), f"must be >= {low}")
                    for k, low in at_least.items()])
    check_flags(a, [
        (a.warmup_epochs == 0 or 0 < a.warmup_epochs < a.epochs, "--warmup-epochs",
         f"must be 0 or shorter than --epochs {a.epochs} (the lr would never reach its peak)"),
        (math.isfinite(a.blr) and a.blr > 0, "--blr", "must be a positive number"),
        (math.isfinite(a.weight_decay) and a.weight_decay >= 0, "--weight-decay", "must be >= 0"),
        (a.patch_size is None or 1 <= a.patch_size and a.img_size % a.patch_size == 0, "--patch-size",
         f"must be >= 1 and divide --img-size {a.img_size}"),
        (0 <= a.seed < 2**63, "--seed", "must be >= 0 and < 2**63"),
        (a.max_steps is None or a.max_steps >= 1, "--max-steps", "must be >= 1"),
        (a.in_memory_size is None or a.in_memory and a.in_memory_size >= 1, "--in-memory-size",  # --in-memory
         "must be >= 1 and needs --in-memory"),  # --in-memory
    ])
    a.lr = a.blr * a.batch_size / 256


# The flags a resumed run may change (where things are, how fast, how long, how often), besides those a script adds
# (Run.resume's may_change); any other would continue another run. The data may move, but must hold as many images.
RESUME_MAY_CHANGE = {"data", "data_root", "output_dir", "epochs", "num_workers", "amp", "compile", "log_every",
                     "max_steps", "save_every_minutes", "keep_every_epochs", "in_memory"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # schedulers send SIGTERM (or USR1) before a kill


def ignore_stop_signals(worker_id):
    """In DataLoader workers: a signal to the process group (SLURM, Ctrl-C) is for the main process, which saves."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def take_lock(path):
    """run.lock, locked (POSIX fcntl.lockf) while its run lives: a second run in the folder stops; the lock goes with
    its process however it ends, kill -9 included, and forked DataLoader workers do not hold it. Returns the file."""
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # another process holds it
        f.seek(0)
        holder = f.read().strip() or "a run that has not written its name yet"
        f.close()
        raise StopRun(f"--output-dir {os.path.dirname(path)} is in use by another run ({holder}); wait for it or "
                      f"pass another --output-dir") from None
    except OSError as e:  # e.g. NFS mounted without its lock manager
        f.close()
        raise StopRun(f"--output-dir {os.path.dirname(path)}: its file system cannot lock run.lock ({e.strerror}); "
                      f"pass an --output-dir on another file system") from None
    f.truncate(0)
    f.write(f"host {os.uname().nodename}, pid {os.getpid()}")
    f.flush()
    return f


class Run:
    """Around main()'s loop, in its order: Run(args) starts the processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK;
    plain `python`: one process) and takes the output folder; loader(); resume(); batches() and end_step() frame each
    step; finish() writes encoder.pt. nan_suspects: the script's flags to name when its loss stops being finite."""
    def __init__(self, args, nan_suspects=()):
        self.args, self.nan_suspects, self.step, self.signal = args, nan_suspects, 0, 0
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.is_main, local_rank = self.rank == 0, int(os.environ.get("LOCAL_RANK", 0))
        if args.batch_size % self.world_size:
            raise StopRun(f"--batch-size {args.batch_size} is global and must be divisible by the {self.world_size} "
                          f"processes; use e.g. {max(1, args.batch_size // self.world_size) * self.world_size}")
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if "RANK" in os.environ and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        elif "RANK" in os.environ:
            dist.init_process_group("gloo")  # CPU: tests and debugging
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        self.ckpt_path, self.lock_path = (os.path.join(args.output_dir, f) for f in ("checkpoint.pt", "run.lock"))
        self.saved, error = "nothing saved yet", None
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            if self.is_main:
                self.lock = take_lock(self.lock_path)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.ckpt_path + ".tmp")  # left by a run killed while saving
        except OSError as e:
            error = f"--output-dir {args.output_dir}: {e.strerror or e}; pass a folder you can write to"
        except StopRun as e:
            error = str(e)
        error = self.agree(error)
        if error:
            raise StopRun(error)
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        print0(f"lr = blr {args.blr} x batch {args.batch_size} / 256 = {args.lr:.3g}; {self.world_size} process(es) "
               f"x {args.batch_size // self.world_size} images on {self.device}; torch {torch.__version__}")
        if self.device.type == "cpu" and torch.get_num_threads() > 1:  # (idle OpenMP threads spin, taking turns)
            print0(f"note: {torch.get_num_threads()} CPU threads; with other work running, OMP_NUM_THREADS=1 is faster")

    def on_signal(self, signum, frame):
        if not self.signal:
            self.signal, self.signal_at = signum, time.monotonic()  # end_step saves after this step, then stops
        elif time.monotonic() - self.signal_at > 5:  # schedulers may send the same one twice at once: not a repeat
            sys.exit(f"error: {signal.Signals(signum).name} again: stopped at once; {self.saved}")

    def agree(self, error):
        """Called by every process at the same point: if one has an error (a message, else None), all get one."""
        if self.world_size > 1:
            failed = torch.tensor([error is not None], device=self.device)
            dist.all_reduce(failed, dist.ReduceOp.MAX)
            error = error or ("another process stopped (its line says why)" if failed.item() else None)
        return error

    def loader(self, dataset, batch_transform=None):
        """loader(items): a DataLoader of the items epoch_items lists, each process its share of each global batch.
        batch_transform(images, args): the script's augmentation of a batch on the device, for --in-memory."""
        if len(dataset) < self.args.batch_size:
            raise StopRun(f"--data has {len(dataset)} training images, fewer than one --batch-size "
                          f"{self.args.batch_size}; lower --batch-size")
        self.images, self.steps_per_epoch = len(dataset), len(dataset) // self.args.batch_size
        if self.args.in_memory:  # --in-memory
            return in_memory_loader(self, dataset, batch_transform)  # --in-memory

        def epoch_loader(items):  # batches() calls it once an epoch (workers restart every epoch anyway)
            return torch.utils.data.DataLoader(Seeded(dataset), self.args.batch_size // self.world_size, sampler=items,
                                               num_workers=self.args.num_workers, pin_memory=self.device.type == "cuda",
                                               drop_last=True, worker_init_fn=ignore_stop_signals)
        return epoch_loader

    def epoch_items(self, epoch, start=0):
        """This process's (index, seed of its augmentation) pairs of the epoch from its step `start` on: a seeded
        permutation cut to whole global batches; global batch k is its positions [k*B, (k+1)*B), of which process r
        takes every W-th from r. So a run resumed mid-epoch sees the rest of the epoch as it would have."""
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        n = self.steps_per_epoch * self.args.batch_size
        order = torch.randperm(self.images, generator=g)[:n].tolist()
        seeds = torch.randint(-2**63, 2**63 - 1, (n,), generator=g).tolist()
        first = start * self.args.batch_size + self.rank
        return list(zip(order[first::self.world_size], seeds[first::self.world_size]))

    def resume(self, model, optimizer, scaler, may_change=()):
        """Load checkpoint.pt if there is one, refusing one of another run (may_change: the script's own flags that a
        resumed run may change); write args.json. Every save writes these three objects. Returns the epochs to run."""
        self.model, self.optimizer, self.scaler, self.world_size_before = model, optimizer, scaler, None
        args = self.args
        if os.path.isfile(self.ckpt_path):
            self.load(may_change)
        if self.is_main:
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            self.log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a")
            if self.step:  # the lines after this one may repeat steps that were logged but not saved before a kill
                self.log_file.write(json.dumps({"resumed_at_step": self.step}) + "\n")
        self.saved_at, spe = time.monotonic(), self.steps_per_epoch
        last = args.epochs if args.max_steps is None else min(args.epochs, -(-args.max_steps // spe))
        return range(self.step // spe, last)  # the epochs to run: none past the one --max-steps ends in

    def load(self, may_change):
        path, args, spe = self.ckpt_path, self.args, self.steps_per_epoch
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            step, method, old_args, images = ckpt["step"], ckpt["method"], ckpt["args"], ckpt["images"]
        except Exception as e:
            raise StopRun(f"{path} cannot be read ({type(e).__name__}), so it is damaged or not ours; "
                          f"move it away to start from step 0, or pass another --output-dir") from None
        if method != METHOD:
            raise StopRun(f"{path} was written by {method}.py, not {METHOD}.py; pass another --output-dir")
        for k, v in old_args.items():
            if k not in RESUME_MAY_CHANGE | set(may_change) and getattr(args, k, v) != v:
                raise StopRun(f"{path} was written with --{k.replace('_', '-')} {v}, not {getattr(args, k)}; pass "
                              f"the same value or another --output-dir")
        if images != self.images:
            raise StopRun(f"{path} was trained on {images} images, --data {args.data} has {self.images}; pass the "
                          f"same data or another --output-dir")
        if step > args.epochs * spe:
            raise StopRun(f"{path} is at step {step}, past the {args.epochs * spe} steps of --epochs {args.epochs}; "
                          f"pass --epochs {-(-step // spe)} or more")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise StopRun(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}); pass the "
                          f"flags of the run that wrote it, or another --output-dir") from None
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.world_size_before, self.saved = step, ckpt["world_size"], f"{path} (step {step}) is intact"
        print0(f"resumed from {path} at step {step} (epoch {step // spe}, batch {step % spe} of {spe})")

    def wrap(self, model):
        """--compile and, with several processes, DDP around the model (the module itself stays as it is). First a
        step that cannot fit stops: its activations take at least 4 bytes per image, patch, width and block (measured:
        27 for MAE ViT-B, 7.7 for ViT-H at mask ratio 0.9; more for the scripts whose encoder sees every patch)."""
        enc = next((m for m in model.modules() if isinstance(m, vit.VisionTransformer)), None)  # (MoCo: the base)
        images = self.args.batch_size // self.world_size
        need = 0 if enc is None else 4 * images * enc.patch_embed.num_patches * enc.embed_dim * enc.depth
        have = (torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda"
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if need > have:
            raise StopRun(f"--img-size {self.args.img_size}: a step needs more than {need / 1e9:.0f} GB, the "
                          f"{self.device} has {have / 1e9:.0f} GB; lower --img-size or --batch-size")
        model = torch.compile(model) if self.args.compile else model
        if self.world_size > 1:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def batches(self, loader, epoch):
        """The epoch's batches from where the run stands, until --max-steps. Before each step torch's RNG is seeded
        from (seed, step, rank): the masks and other draws of a step do not depend on where the run restarted."""
        self.epoch, self.epoch_done, self.sums, self.n, self.t0 = epoch, False, {}, 0, time.perf_counter()
        if self.args.max_steps is not None and self.step >= self.args.max_steps:
            return
        start = self.step - epoch * self.steps_per_epoch
        for self.it, batch in enumerate(tqdm(loader(self.epoch_items(epoch, start)), f"epoch {epoch}", initial=start,
                                             total=self.steps_per_epoch, disable=not self.is_main, leave=False,
                                             dynamic_ncols=True), start):
            torch.manual_seed(hash((self.args.seed, self.step, self.rank)))
            if self.args.in_memory:  # --in-memory
                batch = augment_in_memory(self, batch)  # --in-memory
            yield batch
            if self.args.max_steps is not None and self.step >= self.args.max_steps:
                self.epoch_done = self.it == self.steps_per_epoch - 1
                return
        self.epoch_done = True

    def end_step(self, loss, **logged):
        """Count one optimizer step; log every --log-every steps; save at the epoch's end, at --max-steps, every
        --save-every-minutes and after a stop signal, then stop. The processes agree (one tiny all-reduce a step)."""
        a, self.step, self.n = self.args, self.step + 1, self.n + 1
        for k, v in {"loss": loss, **logged}.items():
            if torch.is_tensor(v):
                self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        stop = self.signal
        timed = self.is_main and 0 < a.save_every_minutes < (time.monotonic() - self.saved_at) / 60
        if self.world_size > 1:  # (a signal arriving during this sync counts at the next step, on every rank)
            flags = torch.tensor([stop, timed], device=self.device)
            dist.all_reduce(flags, dist.ReduceOp.MAX)
            stop, timed = flags.tolist()
        last = self.it == self.steps_per_epoch - 1
        save = last or timed or stop or self.step == a.max_steps
        if save or self.step % a.log_every == 0:
            self.log(logged)  # before a save: the loss of every step since the last check is finite
        if save:
            self.save(keep=last and a.keep_every_epochs > 0 and (self.epoch + 1) % a.keep_every_epochs == 0)
        if stop:
            raise self.stop(f"stopped by {signal.Signals(stop).name} after step {self.step}; {self.saved}: the "
                            f"same command resumes from it")

    def log(self, logged):
        """One log line: loss and the other tensors averaged over the steps since the last line and the processes
        (one host sync); lr and other numbers as given. A non-finite loss stops the run before anything is saved."""
        means = torch.stack(list(self.sums.values())) / self.n
        if self.world_size > 1:
            dist.all_reduce(means)
            means /= self.world_size
        means = dict(zip(self.sums, means.tolist()))
        if not math.isfinite(means["loss"]):
            causes = [f"--{k.replace('_', '-')} {getattr(self.args, k)}" for k in ("blr", *self.nan_suspects)]
            if self.args.amp == "fp16" and self.device.type == "cuda":
                causes.append("fp16 overflow (use --amp bf16)")
            raise self.stop(f"non-finite loss ({means['loss']}) within steps {self.step - self.n + 1}-{self.step}; "
                            f"likely causes, in order: {', '.join(causes)}; {self.saved}")
        log = {"epoch": self.epoch, "step": self.step, **{k: round(v, 5) for k, v in means.items()},
               **{k: v for k, v in logged.items() if not torch.is_tensor(v)},
               "img_per_s": round(self.n * self.args.batch_size / (time.perf_counter() - self.t0), 1),
               "mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if self.device.type == "cuda" else 0.0}
        print0(json.dumps(log))
        if self.is_main:
            self.log_file.write(json.dumps(log) + "\n")
            self.log_file.flush()
        self.sums, self.n, self.t0 = {}, 0, time.perf_counter()

    def save(self, keep=False):
        """checkpoint.pt: all a resumed run needs to go on as if never stopped (the RNGs are a function of the step).
        Rank 0 writes; the others wait and stop with it if the save failed. keep: also a copy for this epoch."""
        error, epoch_path = None, os.path.join(self.args.output_dir, f"checkpoint_epoch{self.epoch + 1:04d}.pt")
        if self.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "step": self.step,
                     "method": METHOD, "images": self.images, "world_size": self.world_size, "args": vars(self.args)}
            try:
                for path in [self.ckpt_path] + [epoch_path] * keep:
                    save_checkpoint(state, path)
            except StopRun as e:
                error = str(e)
        error = self.agree(error)
        if error:
            raise self.stop(f"{error}; {self.saved}")
        self.saved, self.saved_at = f"{self.ckpt_path} (step {self.step}) is intact", time.monotonic()

    def finish(self, encoder_state_dict):
        """encoder.pt: {"model": the encoder alone, in vit.py / timm names, "method", "step", "args"}."""
        if self.is_main:
            save_checkpoint({"model": encoder_state_dict, "method": METHOD, "step": self.step, "args": vars(self.args)},
                            os.path.join(self.args.output_dir, "encoder.pt"))
            print0(f"done: {self.args.output_dir}/encoder.pt after {self.step} steps")
        self.stop("done")
        if self.world_size > 1:
            dist.destroy_process_group()

    def stop(self, message):
        """Leave the output folder to the next run (log file, lock), restore the signal handlers; a StopRun to raise."""
        if self.is_main:
            with contextlib.suppress(AttributeError):  # (no log file before resume)
                self.log_file.close()
            self.lock.close()  # the next run may take the folder (the file stays: deleting it would race)
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)
        return StopRun(message)


def add_common_args(p, **defaults):
    """The command line every method script shares; each script passes its paper defaults."""
    p.add_argument("--data", required=True, help="ImageNet-layout root (ROOT/train/CLASS/*) or cifar10|cifar100|stl10")
    p.add_argument("--data-root", default="./data", help="download folder for --data cifar10|cifar100|stl10")
    p.add_argument("--output-dir", default=defaults["output_dir"], help="for checkpoint.pt, encoder.pt, logs")
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
    p.add_argument("--seed", type=int, default=0, help="seed for init (same on all ranks), data order and draws")
    p.add_argument("--init", default=None, help="start from these weights (any file vit.load_pretrained reads)")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines (and non-finite loss checks)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total (saved)")
    p.add_argument("--save-every-minutes", type=float, default=30, help="also save checkpoint.pt this often (0: off)")
    p.add_argument("--keep-every-epochs", type=int, default=0, help="keep checkpoint_epochNNNN.pt every K epochs")
    p.add_argument("--in-memory", action="store_true", help="decode once, augment on the device")  # --in-memory
    p.add_argument("--in-memory-size", type=int, help="--in-memory: store images at S x S")  # --in-memory
    return p


# ============================================ --in-memory: an optional block, the same text in every method script
# The train split decoded once into a uint8 tensor on the device, each batch augmented there (a draw per image, seeded
# by Run.batches). A copy without it deletes this block and the lines that end in "# --in-memory".

def in_memory_loader(run, dataset, batch_transform):
    """run.memory: the training images as uint8 (3, S, S) on the device, the labels, batch_transform; cached by rank 0
    in --data-root/in_memory/ (keyed by the files, sizes, times). Returns loader(items): the items in batches."""
    # a gloo group that waits a day for rank 0's decoding (NCCL: 10 minutes), made before anything can fail
    wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if run.world_size > 1 else None
    a, S, files = run.args, run.args.in_memory_size, getattr(dataset, "samples", None)
    stamp = [(p, os.path.getsize(p), os.path.getmtime(p)) for p, _ in files] if files else [type(dataset).__name__]
    where = os.path.abspath(a.data if files else a.data_root)  # "v2": the decoding below; change it with it
    key = hashlib.sha1(json.dumps(["v2", S, where, len(dataset), stamp]).encode()).hexdigest()[:16]
    path = os.path.join(a.data_root, "in_memory", f"train_{key}.pt")
    resize = [T.Resize(S, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(S)] if S else []
    dataset.transform = T.Compose([*resize, T.PILToTensor()])
    shape = torch.Size((3, S, S)) if S else dataset[0][0].shape  # (no 40000 px test image is ever made)
    ram = math.inf  # (unknown outside Linux)
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        ram = int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    free = ram / int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # this process's share of the RAM, and half a GPU's
    free = min(free, torch.cuda.mem_get_info(run.device)[0] / 2) if run.device.type == "cuda" else free
    need = len(dataset) * shape.numel()
    if need > 0.8 * free:
        raise StopRun(f"--in-memory: {len(dataset)} images of {'x'.join(map(str, shape))} need {need / 1e9:.1f} GB, "
                      f"more than the {free / 1e9:.1f} GB free; pass a smaller --in-memory-size or drop --in-memory")
    if run.is_main:  # rank 0 first: it decodes and caches, then the others load its file
        images, labels = load_or_decode(run, dataset, shape, path)
    if wait is not None:
        dist.barrier(group=wait)
        if not run.is_main:  # (they decode too where rank 0's file is not theirs to read: a disk per machine)
            images, labels = load_or_decode(run, dataset, shape, path)
        dist.barrier(group=wait)
        dist.destroy_process_group(wait)
    run.memory = images.to(run.device), labels.to(run.device), batch_transform
    b = a.batch_size // run.world_size
    return lambda items: [items[i:i + b] for i in range(0, len(items), b)]


def load_or_decode(run, dataset, shape, path):
    with contextlib.suppress(Exception):
        images, labels = torch.load(path, map_location="cpu", weights_only=True)
        if images.shape == (len(dataset), *shape) and images.dtype == torch.uint8:
            print0(f"--in-memory: {len(dataset)} images loaded from {path}")
            return images, labels
    images, labels = torch.empty((len(dataset), *shape), dtype=torch.uint8), torch.empty(len(dataset), dtype=torch.long)
    decoded = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=run.args.num_workers,
                                          worker_init_fn=ignore_stop_signals)
    for k, (image, label) in enumerate(tqdm(decoded, "--in-memory: decoding", disable=not run.is_main, leave=False)):
        if image.shape != shape:
            raise StopRun(f"--in-memory: image {k} of --data is {'x'.join(map(str, image.shape))}, image 0 is "
                          f"{'x'.join(map(str, shape))}; pass --in-memory-size S to store all at S x S")
        images[k], labels[k] = image, label
    print0(f"--in-memory: {len(images)} images decoded, to be cached in {path}")
    if run.is_main:  # one writer; a cache that cannot be written only makes the next run decode again
        with contextlib.suppress(OSError, StopRun):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_checkpoint((images, labels), path)
    return images, labels


def augment_in_memory(run, batch):  # a batch of (index, seed): its images augmented by the script's batch_transform
    images, labels, batch_transform = run.memory
    index = torch.tensor([i for i, _ in batch], device=run.device)
    return batch_transform(images[index], run.args), labels[index]


def resized_crop(x, size, scale, interpolation, flip_p=0.5):
    """RandomResizedCrop + RandomHorizontalFlip on uint8 (B, 3, H, W), float out: torchvision's draws per image, then
    rows @ image @ cols^T in batches (the horizontal pass first and clipped, as PIL's is; a flip reverses cols)."""
    draws = [T.RandomResizedCrop.get_params(im, scale, (3 / 4, 4 / 3)) + (torch.rand(1).item() < flip_p,) for im in x]
    i, j, h, w, flips = zip(*draws)  # torchvision's draws, an image at a time: get_params, then the flip
    rows = resize_matrices(i, h, x.shape[2], size, interpolation, x.device)
    cols = resize_matrices(j, w, x.shape[3], size, interpolation, x.device)
    cols = torch.where(torch.tensor(flips, device=x.device)[:, None, None], cols.flip(1), cols)
    x = (x.float() / 255 @ cols[:, None].transpose(-1, -2)).clamp_(0, 1)
    return (rows[:, None] @ x).clamp_(0, 1)


def resize_matrices(starts, lengths, in_size, size, interpolation, device):
    """(B, size, in_size): torch's antialiased resize (PIL's filters) of each [start, start + length), as matrices."""
    lengths, n_max = torch.tensor(lengths), max(lengths)
    unique, which = lengths.unique(return_inverse=True)
    weights = torch.stack([F.pad(F.interpolate(torch.eye(n, device=device)[None, None], (size, n), mode=interpolation,
                                               antialias=True)[0, 0], (0, n_max - n)) for n in unique.tolist()])
    cols = (torch.tensor(starts)[:, None] + torch.arange(n_max)).clamp(max=in_size - 1).to(device)
    m = torch.zeros(len(starts), size, in_size, device=device)
    return m.scatter_add_(2, cols[:, None].expand(-1, size, -1), weights[which.to(device)])


def gray(x):  # torchvision's rgb_to_grayscale
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_hue(x, shift):
    """torchvision's adjust_hue with a shift per image: RGB to HSV, hue + shift mod 1, back (a closed form)."""
    maxc, minc = x.max(1).values, x.min(1).values
    delta, (r, g, b) = maxc - minc, x.unbind(1)
    d = torch.where(delta > 0, delta, 1.0)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = (h / 6 + shift[:, None, None]) % 1
    s = delta / torch.where(delta > 0, maxc, 1.0)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device)[:, None, None] + 6 * h[:, None]) % 6
    return maxc[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x, brightness, contrast, saturation, hue, p):
    """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p): each image its own factors and its own
    order of the four adjustments, drawn as ColorJitter.get_params draws them; each adjustment as torchvision's."""
    def blend(a, b, factor):
        return (factor[:, None, None, None] * a + (1 - factor[:, None, None, None]) * b).clamp(0, 1)
    B = len(x)
    on = torch.rand(B) < p
    low = [max(0, 1 - brightness), max(0, 1 - contrast), max(0, 1 - saturation), -hue]
    high = [1 + brightness, 1 + contrast, 1 + saturation, hue]
    factors = [torch.empty(B).uniform_(lo, hi) for lo, hi in zip(low, high)]
    order = torch.rand(B, 4).argsort(1)  # a uniform random permutation per image, like torch.randperm(4)
    adjust = [lambda y, f: blend(y, torch.zeros_like(y), f),  # brightness
              lambda y, f: blend(y, gray(y).mean((1, 2, 3), keepdim=True), f),  # contrast
              lambda y, f: blend(y, gray(y), f), adjust_hue]  # saturation, hue
    for slot in range(4):
        for a in range(4):
            sel = (on & (order[:, slot] == a)).nonzero()[:, 0]
            x[sel.to(x.device)] = adjust[a](x[sel.to(x.device)], factors[a][sel].to(x.device))
    return x


def random_grayscale(x, p):
    return torch.where((torch.rand(len(x)) < p).to(x.device)[:, None, None, None], gray(x).expand_as(x), x)


def gaussian_blur(x, sigma, p):
    """RandomApply([GaussianBlur(2 * ceil(3 sigma) + 1, sigma ~ U(sigma))], p): torchvision's, a kernel per image."""
    B, C, H, W = x.shape
    s, on = torch.empty(B).uniform_(*sigma).double(), torch.rand(B) < p
    r = min(math.ceil(3 * sigma[1]), H - 1, W - 1)  # the widest kernel's radius; narrower ones are zero-padded
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / s[:, None]) ** 2) * (t.abs() <= (3 * s).ceil()[:, None])
    k = torch.where(on[:, None], k / k.sum(1, keepdim=True), (t == 0).double())  # off: the identity kernel
    k = k.float().repeat_interleave(C, 0).to(x.device)  # (B*C, 2r+1): one kernel per image and channel
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k[:, None, None, :], groups=B * C), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def random_solarize(x, p, threshold=128 / 255):  # RandomSolarize(128, p) on PIL: pixels >= 128 of 255 inverted
    on = (torch.rand(len(x)) < p).to(x.device)[:, None, None, None]
    return torch.where(on & (x >= threshold), 1 - x, x)


# ====================================================================================================== end appendix

if __name__ == "__main__":
    try:
        main()
    except StopRun as e:
        sys.exit(f"error: {one_line(e)}")
