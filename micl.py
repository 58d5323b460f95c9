"""MiCL: Masked Image Contrastive Learning (Yang & Xu, arXiv 2411.09858, 2024; v2 renamed "OCL"), in one file.

Two views of one image without any hand-made augmentation between them: one random mask per image keeps 10% of
the patches, the kept patches (in random order) are split into two disjoint halves, and each half, with its own CLS
token, goes through the same ViT. The two CLS features of an image are a positive pair; the other images of the
batch are the negatives (symmetric InfoNCE). No projector, predictor, momentum encoder or decoder: the encoder is all.
Facts from the authors' (anonymous) release AnonymGiant/OCL @ 9445a98 (models_mae.py, main_pretrain.py).

Run (defaults = the released recipe, ViT-L/16; the paper: 133 h on 4x A100, 85.8% ImageNet fine-tune):
    torchrun --nproc_per_node 4 micl.py --data /imagenet --output-dir runs/micl_vitl     # 1800 images per GPU
    python micl.py --data cifar10 --model vit_tiny --img-size 32 --patch-size 4 --batch-size 256 --epochs 100
A run auto-resumes from OUTPUT_DIR/checkpoint.pt. The encoder ends up in OUTPUT_DIR/encoder.pt (vit.py / timm names).

Recipe (release -> this file's default):
    ViT-L/16, mask ratio 0.9 (kept int(L(1-r)) // 2 * 2 = 18 of 196 patches, 9 per view), CLS after the final norm,
    phi(c) = (1 + c) / 2 / (1 + kappa (1 - c)) with kappa 1/64, tau 0.07, AdamW(0.9, 0.95), wd 0.05 (not on 1-D
    parameters), lr = blr * batch / 256 with blr 5e-5, 10 warm-up epochs then per-iteration cosine to 0, 200 epochs,
    batch 1800 per GPU x 4 GPUs = 7200 (lr 1.41e-3), RandomResizedCrop(224, scale 0.2-1, bicubic) + flip (the same
    crop for both views), no gradient clipping.
THE PER-GPU BATCH IS PART OF THE METHOD. The release contrasts within each GPU's batch only (no all_gather), and so
does this file by default: each image has per-GPU batch - 1 negatives. --batch-size here is global (as in every
script of this project), so the release's 1799 negatives need --batch-size 7200 on 4 processes; on 8 GPUs the same
command gives 899 negatives and another method. --gather contrasts against the global batch instead (a deviation
from the release, then only the global batch matters).
Deviations from the release, on purpose:
    - A non-finite loss stops the run (checked every --log-every steps). The release prints it and carries on
      (engine_pretrain.py: the sys.exit is commented out), so a diverged run keeps training silently.
    - bf16 autocast by default (release: fp16 + GradScaler, still available as --amp fp16); the loss runs in fp32.
    - DDP without find_unused_parameters; seed 0 (release: 42); checkpoint every epoch (release: every 40).
    - The patch embedding of each image is computed twice, once per view (see MiCL.forward); the release embeds once.
    - The release's PRETRAIN.md is MAE's (mask 0.75, 800 epochs); the code defaults above are what it runs.

Read top to bottom: the model and its loss, the data, main() (build, then the training loop), the checks of this
script's inputs, and an appendix of plumbing that is the same text in every method script.
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
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import torchvision.transforms as T
from tqdm import tqdm

import vit

# ------------------------------------------------------------------------------------------- model and loss

def all_gather_grad(x):
    """(n, ...) on every rank -> (world_size * n, ...), rank order, WITH gradient: the backward hands each rank the
    sum over all ranks of the gradient w.r.t. its slice, so other ranks' losses reach this rank's encoder.
    (dist.all_gather has no gradient; the common "put my own tensor back in my slot" fix loses those cross-rank terms.)
    .contiguous(): autograd all_gather once computed wrong gradients for non-contiguous inputs (pytorch#120386)."""
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def phi(c, kappa):
    """MiCL's similarity map (release compute_tSP, a t-vMF-style kernel): cosine c in [-1, 1] -> [0, 1], equal to
    (1 + c) / 2 at kappa = 0; kappa > 0 pushes dissimilar pairs further down."""
    return 0.5 * (1 + c) / (1 + kappa * (1 - c))


def contrastive_loss(a, b, kappa=1 / 64, tau=0.07, gather=False):
    """Symmetric InfoNCE on L2-normalized features a (view A) and b (view B), both (N, D), row i = image i:
        loss = 1/2 [CE(phi(a b^T) / tau, arange) + CE(phi(b a^T) / tau, arange)]
    gather=False: the negatives are the local batch (the release). gather=True: the other ranks' images too; the
    labels are offset by rank, and the loss is the mean over local images, so DDP's gradient average is the gradient
    of the mean loss over the global batch."""
    labels = torch.arange(a.shape[0], device=a.device)  # (N,) image i's positive is column i
    a_all, b_all = a, b
    if gather and dist.is_initialized() and dist.get_world_size() > 1:
        a_all, b_all = all_gather_grad(a), all_gather_grad(b)  # (W*N, D)
        labels = labels + a.shape[0] * dist.get_rank()  # equal N on every rank: Run.loader drops the last batch
    logits_ab = phi(a @ b_all.T, kappa) / tau  # (N, N or W*N)
    logits_ba = phi(b @ a_all.T, kappa) / tau
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


class MiCL(vit.VisionTransformer):
    """A vit.py encoder (its own patch_embed, cls_token, pos_embed, blocks, norm: also the release's names) and MiCL's
    loss; nothing else is trained. vit_kw: the encoder's size (vit.MODELS[name](cls=MiCL, ...))."""
    def __init__(self, mask_ratio=0.9, kappa=1 / 64, tau=0.07, gather=False, **vit_kw):
        super().__init__(**vit_kw)
        self.mask_ratio, self.kappa, self.tau, self.gather = mask_ratio, kappa, tau, gather
        check_mask_ratio(mask_ratio, self.patch_embed.num_patches)

    def len_keep(self, L):
        return int(L * (1 - self.mask_ratio)) // 2 * 2  # release: rounded down to even, 196 -> int(19.6) = 19 -> 18

    def split_views(self, noise):
        """noise (N, L) -> (ids_a, ids_b), each (N, K/2): patch indices of the two views, disjoint.
        One random permutation per image (argsort of the noise); the first K indices are kept, in that shuffled
        order, and the first half goes to view A, the second to view B (the release's reshape(2N, K/2, D))."""
        K = self.len_keep(noise.shape[1])
        ids_keep = torch.argsort(noise, dim=1)[:, :K]  # (N, K) the K patches with the lowest noise, random order
        return ids_keep[:, : K // 2], ids_keep[:, K // 2:]

    def forward(self, imgs, noise=None):
        """imgs (N, 3, H, W); noise (N, L) in [0, 1) decides the masks (drawn at random when None). Returns the loss."""
        N = imgs.shape[0]
        if noise is None:
            noise = torch.rand(N, self.patch_embed.num_patches, device=imgs.device)
        ids_a, ids_b = self.split_views(noise)  # 2x (N, K/2)
        # Both views as one 2N batch (rows 0..N-1 view A, N..2N-1 view B), through vit.py's documented interface.
        # Cost of that readability: forward_features embeds all L patches of every row before it keeps K/2, so the
        # patch embedding (one conv layer) runs twice per image. For ViT-L/16 at 224 px that is ~0.15 GMAC per
        # image against ~6 GMAC for the 24 blocks on 2 x 10 tokens, plus a transient (2N, L, D) activation.
        x = self.forward_features(torch.cat([imgs, imgs]), torch.cat([ids_a, ids_b]))  # (2N, 1+K/2, D)
        with torch.autocast(imgs.device.type, enabled=False):  # fp32: autocast would run the matmuls in bf16/fp16
            z = F.normalize(x[:, 0].float(), dim=-1)  # (2N, D) CLS after the final norm, unit length
            return contrastive_loss(z[:N], z[N:], self.kappa, self.tau, self.gather)


# ------------------------------------------------------------------------------------------------------- data

def train_transform(args):
    # The release's main_pretrain.py = MAE's: RandomResizedCrop(scale 0.2-1, bicubic) + flip, nothing else.
    # Both views come from this one crop: the masks are the only difference between them.
    return T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ------------------------------------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description="MiCL pre-training (Yang & Xu 2024)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, output_dir="runs/micl", model="vit_large", epochs=200, warmup_epochs=10, batch_size=7200,
                    blr=5e-5, weight_decay=0.05)  # release main_pretrain.py; batch = 1800 per GPU x 4 GPUs
    p.add_argument("--mask-ratio", type=float, default=0.9, help="fraction of patches removed; the kept ones are split "
                   "into the two views (release: 0.9, main_pretrain.py)")
    p.add_argument("--kappa", type=float, default=1 / 64, help="kappa of phi(c) = (1+c)/2/(1+kappa(1-c)) (release: 1/64)")
    p.add_argument("--tau", type=float, default=0.07, help="InfoNCE temperature (release: 0.07)")
    p.add_argument("--gather", action="store_true", help="negatives from all processes (global batch) instead of the "
                   "per-GPU batch only (release: per GPU; then results depend on the per-GPU batch)")
    return p.parse_args(argv)


def build_model(args, verbose=True):
    """The MiCL of --model's size; the same seed on every rank (DDP also broadcasts rank 0's weights)."""
    torch.manual_seed(args.seed)
    model = vit.MODELS[args.model](cls=MiCL, img_size=args.img_size, mask_ratio=args.mask_ratio, kappa=args.kappa,
                                   tau=args.tau, gather=args.gather, **({"patch_size": args.patch_size} if args.patch_size else {}))
    args.patch_size = model.patch_size
    L = model.patch_embed.num_patches
    print0(f"mask ratio {args.mask_ratio}: {model.len_keep(L)} of {L} patches kept, {model.len_keep(L) // 2} per view")
    if args.init:
        load_init(model, args.init, verbose)
    return model


def build_optimizer(model, args, device):
    """AdamW(0.9, 0.95), no weight decay on 1-D parameters (norms, biases); the fixed pos-embed is not trained."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def main(argv=None):
    args = get_args(argv)
    run = Run(args)
    check_negatives(args, run.world_size)
    loader = run.loader(build_dataset(args, train_transform(args)))
    model = build_model(args, verbose=run.is_main).to(run.device)
    optimizer = build_optimizer(model, args, run.device)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and run.device.type == "cuda")
    start_epoch = run.resume(model, optimizer, scaler)
    ddp_model = run.wrap(model)

    for epoch in range(start_epoch, args.epochs):
        for imgs, _ in run.batches(loader, epoch):
            lr = set_lr(optimizer, lr_at(run.step, run.steps_per_epoch, args))
            with autocast(args, run.device):
                loss = ddp_model(imgs.to(run.device, non_blocking=True))  # one forward: both views and the loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.end_step(loss, lr=lr)
        run.end_epoch(model, optimizer, scaler)
    run.finish(model.state_dict())  # the model is the encoder: its state dict has the plain vit.py names
    return model


# ------------------------------------------------------------------------------- inputs and their one-line errors

def check_mask_ratio(mask_ratio, L):
    """Each view needs at least one of the L patches: the mask must keep 2 or more."""
    if not 0 <= mask_ratio < 1 or int(L * (1 - mask_ratio)) < 2:
        raise StopRun(f"--mask-ratio {mask_ratio} keeps {int(L * (1 - mask_ratio))} of {L} patches; "
                      f"each view needs one, so keep 2 or more (release: 0.9)")


def check_negatives(args, world_size):
    """Each image is contrasted with the other images of its process's batch (of the global batch with --gather)."""
    negatives = (args.batch_size if args.gather else args.batch_size // world_size) - 1
    if negatives < 1:
        raise StopRun(f"--batch-size {args.batch_size} on {world_size} process(es) leaves each image no negative "
                      f"(its loss would be 0); use 2 or more images per process, or --gather (release: 1800 per GPU)")
    print0(f"negatives per image: {negatives} ({'global batch, --gather' if args.gather else 'per-GPU batch'}; "
           f"release: 1799 per GPU)")


def load_init(model, path, verbose):
    """--init: an encoder any vit.load_pretrained reads (the model is a vit.py encoder)."""
    try:
        vit.load_pretrained(model, path, verbose=verbose)
    except ValueError as e:  # missing file, another model size
        raise StopRun(f"--init {path}: {e}") from None


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
