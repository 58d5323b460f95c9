"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022), end to end in one file.

The encoder (vit.py) sees only a random 25% of the patches; a light decoder gets the encoded visible tokens plus a
shared mask token at every removed position and regresses the pixels of the removed patches, each patch normalized
by its own mean and variance (norm-pix loss). Facts from the official code: facebookresearch/mae @ efb2a80.

Run (defaults = the paper's ViT-B/16 recipe: 800 epochs, global batch 4096, blr 1.5e-4, mask 0.75, norm-pix):
    torchrun --nproc_per_node 8 mae.py --data /imagenet --output-dir runs/mae_vitb
    python mae.py --data cifar10 --model vit_tiny --img-size 32 --patch-size 4 --batch-size 256 --epochs 100
A run auto-resumes from OUTPUT_DIR/checkpoint.pt. The encoder ends up in OUTPUT_DIR/encoder.pt (vit.py / timm names).

Recipe (paper / official code -> this file's default):
    mask ratio 0.75, norm_pix_loss on, decoder 512-d x 8 blocks x 16 heads, AdamW(0.9, 0.95), wd 0.05,
    lr = blr * global_batch / 256 with blr 1.5e-4, 40 warm-up epochs then per-iteration cosine to 0, 800 epochs,
    RandomResizedCrop(224, scale 0.2-1, bicubic) + horizontal flip, no gradient clipping.
Deviations from the official code, on purpose:
    - bf16 autocast by default (official: fp16 + GradScaler, still available as --amp fp16).
    - No weight decay on 1-D parameters (LayerNorm, biases) but decay on cls/mask tokens: the same as timm 0.3.2's
      add_weight_decay that the official code calls.
    - DDP without find_unused_parameters (every parameter gets a gradient; the official flag only costs time).
    - No gradient accumulation: --batch-size is the global batch, spread over the GPUs you have. MAE is not
      batch-sensitive (maintainer, mae#32: 1024 works for ViT-L); lr follows the batch through blr.
    - A non-finite loss is checked every --log-every steps (the official code checks every step) to avoid a
      host sync per step.

Sections: model | data | boilerplate (identical in every method script) | arguments | main.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
import torchvision.transforms as T
from torchvision.utils import save_image
from tqdm import tqdm

import vit

# ----------------------------------------------------------------------------------------------------------- model

class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True):
        super().__init__()
        # The encoder's parts are registered at the top level so that state_dict() has the official MAE names
        # (patch_embed.*, cls_token, pos_embed, blocks.*, norm.*) and an official checkpoint loads as is.
        # self.encoder is the same module, kept unregistered so its weights are not listed twice.
        self.__dict__["encoder"] = encoder
        self.patch_embed, self.cls_token, self.pos_embed = encoder.patch_embed, encoder.cls_token, encoder.pos_embed
        self.blocks, self.norm = encoder.blocks, encoder.norm
        self.patch_size, D = encoder.patch_size, encoder.embed_dim
        self.norm_pix_loss = norm_pix_loss

        # Decoder (MAE Sec. 3): a linear map to the decoder width, a shared learned mask token, fixed sin-cos
        # positions, a few transformer blocks, and a linear layer to the p*p*3 pixels of each patch.
        self.decoder_embed = nn.Linear(D, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(vit.sincos_pos_embed(decoder_embed_dim, encoder.patch_embed.grid_size)[None],
                                              requires_grad=False)  # (1, 1+L, Dd)
        self.decoder_blocks = nn.ModuleList([vit.Block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * 3)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:  # MAE init, as in vit.py
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs):
        """(B, 3, H, W) -> (B, L, p*p*3), channels fastest (the official 'nchpwq->nhwpqc' order)."""
        p, B = self.patch_size, imgs.shape[0]
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
        return x.reshape(B, h * w, p * p * 3)

    def unpatchify(self, x):
        """(B, L, p*p*3) -> (B, 3, H, W)."""
        p, B, h = self.patch_size, x.shape[0], int(math.sqrt(x.shape[1]))
        return x.reshape(B, h, h, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, h * p)

    def random_masking(self, noise, mask_ratio):
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
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)  # var is unbiased, as official
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L) per-patch MSE
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs (B, 3, H, W); noise (B, L) in [0, 1) decides the mask (drawn at random when None).
        Returns (loss, pred (B, L, p*p*3), mask (B, L) with 1 = removed)."""
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.patch_embed.num_patches, device=imgs.device)
        ids_keep, ids_restore, mask = self.random_masking(noise, mask_ratio)
        latent = self.encoder.forward_features(imgs, ids_keep)  # (B, 1+K, D): the encoder sees visible patches only
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


@torch.no_grad()
def reconstruction_grid(model, imgs, path, mask_ratio, seed=0):
    """Save a PNG: one row per image, original | masked | reconstruction (visible patches pasted back)."""
    model.eval()
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(imgs, mask_ratio, noise.to(imgs.device))
    target = model.patchify(imgs)
    if model.norm_pix_loss:  # undo the per-patch normalization with the true patch statistics
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred.float() * (var + 1e-6) ** 0.5 + mean
    m = mask[:, :, None]
    masked = model.unpatchify(target * (1 - m))
    recon = model.unpatchify(pred * m + target * (1 - m))
    mean, std = torch.tensor(IMAGENET_MEAN, device=imgs.device), torch.tensor(IMAGENET_STD, device=imgs.device)
    rows = torch.stack([imgs, masked, recon], dim=1).flatten(0, 1) * std[:, None, None] + mean[:, None, None]
    save_image(rows.clamp(0, 1), path, nrow=3, padding=1)
    model.train()


def train_transform(args):
    # MAE main_pretrain.py: RandomResizedCrop(scale 0.2-1, bicubic) + flip, nothing else.
    return T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ======================================================================= boilerplate: identical in every method script
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
    train = split == "train"
    try:
        if args.data == "cifar10":
            return datasets.CIFAR10(args.data_root, train=train, transform=transform, download=True)
        if args.data == "cifar100":
            return datasets.CIFAR100(args.data_root, train=train, transform=transform, download=True)
        if args.data == "stl10":
            return datasets.STL10(args.data_root, split="train+unlabeled" if train else "test", transform=transform,
                                  download=True)
    except (OSError, RuntimeError) as e:  # no network, a partial download, a full disk
        raise StopRun(f"--data {args.data}: could not download into --data-root {args.data_root} ({e}); "
                      f"download it by hand into that folder, or pass an ImageFolder root") from None
    folder = os.path.join(args.data, split)
    if not os.path.isdir(args.data):
        raise StopRun(f"--data {args.data}: no such folder; pass an ImageNet-layout root (ROOT/{split}/<class>/<image>) "
                      f"or one of cifar10, cifar100, stl10")
    if not os.path.isdir(folder):
        raise StopRun(f"--data {args.data}: no '{split}' folder inside; expected the ImageNet layout "
                      f"ROOT/{split}/<class>/<image>")
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=pil_loader)
    except FileNotFoundError as e:
        raise StopRun(f"--data {args.data}: {folder} holds no class folders with images ({e}); expected "
                      f"ROOT/{split}/<class>/<image>") from None


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs one process on cuda:0 or the CPU."""
    if "RANK" in os.environ:
        rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")  # CPU: tests and debugging
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if args.batch_size % world_size:
        raise StopRun(f"--batch-size {args.batch_size} is global and must be divisible by the {world_size} processes; "
                      f"use e.g. {args.batch_size // world_size * world_size}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return rank, world_size, device


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


def make_loader(dataset, args, rank, world_size, device):
    # drop_last: every step sees the same per-GPU batch (contrastive labels assume it); the sampler shuffles by seed+epoch
    if len(dataset) < args.batch_size:
        raise StopRun(f"--data has {len(dataset)} training images, fewer than one --batch-size {args.batch_size}; "
                      f"lower --batch-size")
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size // world_size, sampler=sampler,
                                       num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True)


def autocast(args, device):
    if args.amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()  # CPU runs in fp32
    return torch.autocast("cuda", dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def save_checkpoint(obj, path):
    """Atomic: write a temporary file, then rename it over the old one; a crash never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


# What may differ between a run and its resumption: where things are, how fast it runs, how long it lasts. Any other
# flag (model, recipe, seed) would silently continue another run.
RESUME_MAY_CHANGE = {"data", "data_root", "output_dir", "epochs", "num_workers", "amp", "compile", "log_every",
                     "max_steps", "vis_every", "init", "mim_checkpoint", "teacher"}


def resume(path, args, model, optimizer, scaler):
    """Load OUTPUT_DIR/checkpoint.pt if there is one; returns the epoch to start from."""
    if not os.path.isfile(path):
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in ckpt["args"].items():
        if k not in RESUME_MAY_CHANGE and getattr(args, k, v) != v:
            raise StopRun(f"{path} was written with --{k.replace('_', '-')} {v}, not {getattr(args, k)}; pass the "
                          f"same value or another --output-dir")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise StopRun(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}); pass the flags of the run "
                      f"that wrote it, or another --output-dir") from None
    scaler.load_state_dict(ckpt["scaler"]) if ckpt.get("scaler") else None
    print0(f"resumed from {path} at epoch {ckpt['epoch']}")
    return ckpt["epoch"]


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
# ================================================================================================= end boilerplate

# ------------------------------------------------------------------------------------------------------- arguments

def get_args(argv=None):
    p = argparse.ArgumentParser(description="MAE pre-training (He et al. 2022)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, output_dir="runs/mae", model="vit_base", epochs=800, warmup_epochs=40, batch_size=4096,
                    blr=1.5e-4, weight_decay=0.05)  # MAE PRETRAIN.md recipe
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (paper: 0.75)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalized pixel targets (paper recipe: on)")
    p.add_argument("--decoder-embed-dim", type=int, default=512, help="decoder width (paper: 512)")
    p.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks (paper: 8)")
    p.add_argument("--decoder-num-heads", type=int, default=16, help="decoder heads (paper: 16)")
    p.add_argument("--vis-every", type=int, default=20, help="epochs between reconstruction PNGs")
    return p.parse_args(argv)

# ------------------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = setup_distributed(args)
    is_main = rank == 0
    args.lr = args.blr * args.batch_size / 256
    os.makedirs(args.output_dir, exist_ok=True)
    print0(f"lr = blr {args.blr} x batch {args.batch_size} / 256 = {args.lr:.3g}; {world_size} process(es) x "
           f"{args.batch_size // world_size} images on {device}; torch {torch.__version__}")

    # data
    dataset = build_dataset(args, train_transform(args))
    loader = make_loader(dataset, args, rank, world_size, device)
    steps_per_epoch = len(loader)
    vis_set = build_dataset(args, T.Compose([T.Resize(args.img_size, interpolation=T.InterpolationMode.BICUBIC),
                                             T.CenterCrop(args.img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
                            "val" if args.data in ("cifar10", "cifar100", "stl10") or os.path.isdir(os.path.join(args.data, "val")) else "train")
    vis_imgs = torch.stack([vis_set[i][0] for i in range(0, len(vis_set), max(1, len(vis_set) // 8))][:8]).to(device)

    # model: the same seed on every rank, and DDP also broadcasts rank 0's weights
    torch.manual_seed(args.seed)
    encoder = vit.MODELS[args.model](img_size=args.img_size, **({"patch_size": args.patch_size} if args.patch_size else {}))
    args.patch_size = encoder.patch_size
    model = MaskedAutoencoder(encoder, args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads, args.norm_pix_loss)
    if args.init:
        try:
            vit.load_pretrained(encoder, args.init, verbose=is_main)
        except ValueError as e:  # missing file, another model size
            raise StopRun(f"--init {args.init}: {e}") from None
        decoder = {k: v for k, v in torch.load(args.init, map_location="cpu", weights_only=True).get("model", {}).items()
                   if k.startswith(("decoder_", "mask_token"))}
        model.load_state_dict(decoder, strict=False) if decoder else None
        print0(f"--init {args.init}: encoder loaded" + (", decoder loaded" if decoder else ", decoder random"))
    model.to(device)
    model_without_ddp = model

    # optimizer: AdamW(0.9, 0.95), no weight decay on 1-D parameters (norms, biases); the fixed pos-embeds are skipped
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    start_epoch = resume(ckpt_path, args, model_without_ddp, optimizer, scaler)
    if is_main:  # after resume(), which refuses a checkpoint of another run
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # train
    global_step = start_epoch * steps_per_epoch
    log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a") if is_main else None
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and global_step >= args.max_steps:
            break
        torch.manual_seed(args.seed + 10_000 * epoch + rank)  # data, masks and worker seeds: a function of (seed, epoch, rank)
        loader.sampler.set_epoch(epoch)
        loss_sum, n_sum, t0 = torch.zeros((), device=device), 0, time.perf_counter()
        for it, (imgs, _) in enumerate(tqdm(loader, desc=f"epoch {epoch}", disable=not is_main, leave=False, dynamic_ncols=True)):
            lr = lr_at(global_step, steps_per_epoch, args)
            for g in optimizer.param_groups:
                g["lr"] = lr
            imgs = imgs.to(device, non_blocking=True)
            with autocast(args, device):
                loss, _, _ = model(imgs, args.mask_ratio)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            loss_sum += loss.detach()
            n_sum += 1
            if global_step % args.log_every == 0 or it == steps_per_epoch - 1:
                if world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world_size
                loss_avg = loss_sum.item() / n_sum  # host sync, once per log interval
                if not math.isfinite(loss_avg):
                    raise StopRun(f"non-finite loss ({loss_avg}) within steps {global_step - n_sum + 1}-{global_step}; "
                                  f"the last checkpoint ({ckpt_path}) is intact: lower --blr or use --amp bf16")
                dt = time.perf_counter() - t0
                log = {"epoch": epoch, "step": global_step, "loss": round(loss_avg, 5), "lr": lr,
                       "img_per_s": round(n_sum * args.batch_size / dt, 1),
                       "mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else 0.0}
                print0(json.dumps(log))
                log_file.write(json.dumps(log) + "\n") if is_main else None
                log_file.flush() if is_main else None
                loss_sum, n_sum, t0 = torch.zeros((), device=device), 0, time.perf_counter()
            if args.max_steps is not None and global_step >= args.max_steps:
                break
        else:  # the epoch ran to its end: checkpoint it (rank 0 writes, everyone waits)
            if is_main:
                save_checkpoint({"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                 "epoch": epoch + 1, "args": vars(args)}, ckpt_path)
                if (epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs:
                    reconstruction_grid(model_without_ddp, vis_imgs, os.path.join(args.output_dir, f"recon_{epoch + 1:04d}.png"),
                                        args.mask_ratio)
            dist.barrier() if world_size > 1 else None

    if is_main:  # the encoder alone, in vit.py / timm names
        save_checkpoint(encoder.state_dict(), os.path.join(args.output_dir, "encoder.pt"))
        print0(f"done: {args.output_dir}/encoder.pt after {global_step} steps")
        log_file.close()
    if world_size > 1:
        dist.destroy_process_group()
    return model_without_ddp


if __name__ == "__main__":
    try:
        main()
    except StopRun as e:
        sys.exit(f"error: {one_line(e)}")
