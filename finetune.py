"""Fine-tuning: a pre-trained ViT encoder plus a linear classification head, trained end to end on labelled images
with MAE's recipe: the protocol behind the fine-tuning number of every paper this project follows.

Any encoder vit.load_pretrained reads (our scripts' encoder.pt, the official MAE / MoCo v3 releases, timm weights, or
`--init random`) gets a new head; every layer is trained, the lower ones at smaller learning rates (layer-wise lr
decay), under RandAugment, MixUp / CutMix, random erasing, label smoothing and stochastic depth; top-1 / top-5 on all
of val/ after every epoch. Facts from the official code: facebookresearch/mae @ efb2a80 (FINETUNE.md,
main_finetune.py, engine_finetune.py, models_vit.py, util/lr_decay.py, util/lr_sched.py, util/datasets.py) and the
timm functions it calls (Mixup, rand_augment_transform, RandomErasing; read in timm 1.0.31, the code pins 0.3.2).

Run (defaults = FINETUNE.md's ViT-B/16 recipe; MAE: 83.6 top-1 on ImageNet, four seeds 83.63/83.66/83.52/83.46):
    torchrun --nproc_per_node 8 finetune.py --data /imagenet --init runs/mae/encoder.pt
    torchrun --nproc_per_node 8 finetune.py --data /imagenet --init mae_pretrain_vit_large.pth --model vit_large \
        --epochs 50 --blr 1e-3 --layer-decay 0.75 --drop-path 0.2    # ViT-L: 85.9 (85.95/85.87/85.76/85.88)
    ... --model vit_huge --epochs 50 --blr 1e-3 --layer-decay 0.75 --drop-path 0.3    # ViT-H/14: 86.9
    python finetune.py --eval-only --init mae_finetuned_vit_base.pth --data /imagenet     # MAE's sanity check:
        # Acc@1 83.664 Acc@5 96.530 loss 0.731 (vit_large 85.952 / 97.570 / 0.646, vit_huge 86.928 / 98.088 / 0.584)
    torchrun --nproc_per_node 8 finetune.py --data /imagenet --init runs/graft/encoder.pt --percent 10 \
        --epochs 200 --blr 3e-5 --layer-decay 0.75 --cls-token       # Layer Grafted's 10%-label row (below)
    python finetune.py --data cifar10 --init runs/mae_cifar10/encoder.pt --model vit_tiny --img-size 32 \
        --patch-size 4 --batch-size 256 --epochs 100 --blr 1e-3      # small: 2 CPU cores or one GPU
A run auto-resumes from OUTPUT_DIR/checkpoint.pt at the step it stopped. log.jsonl: a line every --log-every steps
and one per epoch (val_top1, val_top5, val_loss, val_images, best_top1); best.pt: the best epoch's classifier;
encoder.pt: the last one (the whole classifier, fc_norm and head included). --eval-only reads both.

Recipe (FINETUNE.md / main_finetune.py -> this file's default): ViT-B 100 epochs, 5 warm-up epochs (linear from 0),
then a per-iteration half-cosine from lr to min lr 1e-6; global batch 1024, lr = blr * batch / 256, blr 5e-4 (ViT-L/H:
50 epochs, blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3; batch 1024 for all). AdamW(0.9, 0.999), weight decay 0.05
but none on 1-D parameters, cls_token and pos_embed. Layer-wise lr decay 0.65 (util/lr_decay.py, after BEiT): layer 0
= cls_token, pos_embed, patch_embed; block i = layer i + 1; the rest (fc_norm or norm, head) = layer depth + 1; layer
l trains at lr x 0.65^(depth + 1 - l). Stochastic depth 0.1, linear over the blocks. Global average pool of the patch
tokens (CLS left out) through its own LayerNorm fc_norm, the encoder's final norm removed (models_vit.py
--global_pool, the default); --cls-token: the CLS token after the final norm. Head Linear(D, classes), weight
trunc-normal std 2e-5, bias 0. pos_embed: the checkpoint's, trained; another --img-size resizes it bicubically
(vit.load_pretrained; official: util/pos_embed.py interpolate_pos_embed, the same resize of the patch grid, CLS row
kept). No gradient clipping. Train: RandomResizedCrop(img, scale 0.08-1, ratio 3/4-4/3, bicubic) + flip, RandAugment
rand-m9-mstd0.5-inc1, normalization, random erasing p 0.25 (mode pixel: per-pixel N(0, 1), one box); per batch MixUp
alpha 0.8 or CutMix alpha 1.0 (CutMix with probability 0.5; timm Mixup mode 'batch', prob 1, lambda corrected by the
clipped box), targets smoothed by 0.1, soft-target cross-entropy. Eval: Resize(img / 0.875, bicubic) (crop_pct 1
above 224 px) + CenterCrop(img).
Layer Grafted's 10% row (VITA-Group/layerGraftedPretraining_ICLR23 @ f1862e1, COMMANDS_AND_CHECKPOINTS.md,
main_finetune_mae.py): ViT-B, 10% of the ImageNet labels, 200 epochs, blr 3e-5, layer decay 0.75, batch 1022 (7
GPUs), timm's CLS-token head (no global pool), MAE's other defaults (wd 0.05, drop path 0.1, mixup 0.8, cutmix 1.0,
reprob 0.25, RandAugment); their head Linear(D, 4096, no bias) -> Linear(4096, classes) starts its first layer from
the MoCo projector's (--tuneFromFirstFC): not reproduced, ours is one Linear. ViT-L: 400 epochs, blr 3e-5, layer decay
0.65. --percent 1|10 / --split-file draw eval_fewshot.py's per-class splits (checked copies; --split-seed = its seed).
Deviations from the official code, on purpose:
    - Accuracy on all of val/, each image once: under torchrun rank r evaluates images r, r+W, ... and the counts are
      summed (official --dist_eval: DistributedSampler, which pads with duplicates).
    - RandAugment is torchvision's: two layers, each RandAugment(num_ops=1, magnitude 9 of 11 bins = timm's level 9
      of 10, bicubic, fill timm's mean colour (124, 116, 104)) applied with probability 0.5, as timm applies each of
      its 2 ops (drawn with replacement). Left different: the ops (torchvision: Identity, ShearX/Y, TranslateX/Y,
      Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize; timm inc1: no
      Identity, but Invert and SolarizeAdd); no magnitude noise (mstd0.5: timm draws the level from N(9, 0.5) clipped
      to [0, 10]); translation 150/331 x 0.9 = 0.41 of the image in whole pixels (timm 0.45 x 0.9, fractional);
      posterize keeps 4 bits (timm's increasing posterize: 4 - int(0.4 level) = 1 bit at level 9, 0 past 10);
      solarize threshold 25.5 (timm 26); enhance factors 1 +- 0.81 as timm's (which clamps at 0.1).
    - MixUp / CutMix are torchvision.transforms.v2's: each image is mixed with its neighbour (roll by 1; timm: the
      batch reversed, so pairs are mutual); CutMix box half-sides int(0.5 sqrt(1 - lam) H), up to a pixel smaller than
      timm's int(sqrt(1 - lam) H) split h // 2, (h + 1) // 2; both correct lambda by the clipped box. Smoothing after
      the mix, y (1 - e) + e / K: exactly timm's mix of smoothed one-hots (the mix is linear, its weights sum to 1).
      Odd batches are fine (timm asserts an even one).
    - RandomErasing is torchvision's with timm's ranges (area 0.02-1/3, log-uniform aspect 0.3-1/0.3, 10 tries,
      per-pixel N(0, 1)): the same distribution. Every draw above comes from torch's RNG (timm: random / numpy).
    - --init random: vit.py's MAE init with sin-cos pos_embed (trained), head std 2e-5 (official without --finetune:
      timm's trunc-normal 0.02 everywhere). The head is always new (official keeps a same-shape head's bias).
    - Keeps best.pt, the best epoch's classifier (official: prints the best accuracy).
Plumbing as in every script (bf16, DDP, global batch, exact resume, NaN checks, --in-memory): README, "What every
script does the same way"."""
import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import torchvision
import torchvision.transforms as T
from torchvision.transforms import v2
from tqdm import tqdm

import vit

# ------------------------------------------------------------------------------------------- model and loss

class Classifier(vit.VisionTransformer):
    """A vit.py encoder plus MAE's fine-tuning head (models_vit.py). global_pool: the mean of the patch tokens
    after the last block through its own LayerNorm fc_norm, the encoder's final norm removed (MAE's default);
    else the CLS token after the final norm. Names are the official ones (fc_norm, head), so MAE's fine-tuned
    checkpoints load as they are."""
    def __init__(self, num_classes, global_pool=True, **vit_kw):
        super().__init__(**vit_kw)
        self.global_pool = global_pool
        del self.head  # re-made below, after fc_norm: the official parameter order (and so the group order)
        if global_pool:
            self.norm = nn.Identity()  # models_vit.py: `del self.norm`; an Identity keeps forward_features as is
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # main_finetune.py: a near-zero head, so early steps
        nn.init.zeros_(self.head.bias)  # do not destroy the pre-trained features
        self.pos_embed.requires_grad_(True)  # fine-tuning trains it (timm's pos_embed is a parameter)

    def forward(self, x):
        tokens = self.forward_features(x)  # (B, 1+L, D); no final norm when global_pool (norm is the identity)
        feature = self.fc_norm(tokens[:, 1:].mean(dim=1)) if self.global_pool else tokens[:, 0]  # (B, D)
        return self.head(feature)  # (B, classes)


def param_groups(model, weight_decay, layer_decay):
    """Layer-wise lr decay (MAE util/lr_decay.py param_groups_lrd, after BEiT): a group per (layer, decay or not),
    in the order its first parameter appears, each with "lr_scale" = layer_decay^(depth + 1 - layer) (set_lr
    multiplies the lr by it) and "weight_decay" (0 for 1-D parameters, cls_token and pos_embed)."""
    depth, groups = len(model.blocks), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")  # timm's no_weight_decay() + every 1-D tensor
        layer = vit.layer_id(name, depth)  # embeddings 0, blocks.i -> i + 1, the rest depth + 1
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def soft_targets(imgs, labels, mix, args):
    """(images, targets (B, K)): MixUp or CutMix when on (mix), then label smoothing y (1 - e) + e / K. timm smooths
    each one-hot before mixing; the mix is linear and its weights sum to one, so the two orders give the same."""
    if mix is not None:
        imgs, y = mix(imgs, labels)  # (B, 3, H, W), (B, K)
    else:
        y = F.one_hot(labels, args.num_classes).float()
    return imgs, y * (1 - args.smoothing) + args.smoothing / args.num_classes


def soft_cross_entropy(logits, targets):
    """-sum_k y_k log softmax(logits)_k, averaged over the batch: timm's SoftTargetCrossEntropy (and, unmixed, its
    LabelSmoothingCrossEntropy). fp32: log-softmax is precision-sensitive."""
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(model, dataset, args, device):
    """{"val_top1", "val_top5" (%), "val_loss", "val_images"} on every image of dataset, each exactly once: under
    torch.distributed rank r takes images r, r+W, ... and the counts are summed (no DistributedSampler padding)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    part = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(part, max(1, args.batch_size // world_size), num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, summed loss, images
    for imgs, labels in loader:
        imgs, labels = imgs.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
        with autocast(args, device):
            logits = model(imgs)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (B, 5)
        sums += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                             torch.tensor(len(labels), device=device)]).double()
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    n = sums[3].item()
    return {"val_top1": round(100 * sums[0].item() / n, 4), "val_top5": round(100 * sums[1].item() / n, 4),
            "val_loss": round(sums[2].item() / n, 5), "val_images": int(n)}


# ------------------------------------------------------------------------------------------------------- data

def train_transform(args):
    """timm create_transform(is_training=True) as main_finetune.py calls it, with torchvision's ops (docstring)."""
    ops = [T.RandomResizedCrop(args.img_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip()]
    if args.aa != "none":  # rand-m9-mstd0.5-inc1: 2 layers, each an op at level 9 of 10 with probability 0.5
        fill = [round(255 * m) for m in IMAGENET_MEAN]  # timm's fill: (124, 116, 104)
        one_op = T.RandAugment(num_ops=1, magnitude=9, num_magnitude_bins=11, fill=fill,
                               interpolation=T.InterpolationMode.BICUBIC)
        ops += [T.RandomApply([one_op], p=0.5), T.RandomApply([one_op], p=0.5)]
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if args.reprob > 0:  # timm RandomErasing(mode 'pixel', one box), on the normalized image
        ops.append(T.RandomErasing(p=args.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random"))
    return T.Compose(ops)


def eval_transform(args):
    """util/datasets.py: Resize(img / crop_pct, bicubic) + CenterCrop(img), crop_pct 224/256 up to 224 px, else 1."""
    crop_pct = 224 / 256 if args.img_size <= 224 else 1.0
    return T.Compose([T.Resize(int(args.img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(args.img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def mixup_cutmix(args):
    """timm Mixup(mixup_alpha, cutmix_alpha, prob 1.0, switch_prob, mode 'batch') from torchvision's v2 MixUp and
    CutMix: each batch is mixed by one of them, CutMix with probability --mixup-switch-prob. None when both are off."""
    mixers = [(v2.MixUp, args.mixup, 1 - args.mixup_switch_prob), (v2.CutMix, args.cutmix, args.mixup_switch_prob)]
    on = [(make(alpha=alpha, num_classes=args.num_classes), p) for make, alpha, p in mixers if alpha > 0]
    if len(on) < 2:
        return on[0][0] if on else None
    return v2.RandomChoice([t for t, _ in on], p=[p for _, p in on])


def build_datasets(args, train=True):
    """(train set, or its --percent / --split-file part, or None; val set); args.num_classes from the class folders.
    --data stl10 trains on its 5k labelled images (build_dataset's train split is train+unlabeled, for pre-training)."""
    val_set = build_dataset(args, eval_transform(args), "val")  # first: a missing val/ stops before any work
    if len(val_set) == 0:
        raise StopRun(f"--data {args.data}: the val set is empty")
    train_set = None
    if train and args.data == "stl10":
        train_set = torchvision.datasets.STL10(args.data_root, "train", transform=train_transform(args))
    elif train:
        train_set = build_dataset(args, train_transform(args), "train")
    if train_set is not None and getattr(train_set, "classes", None) != getattr(val_set, "classes", None):
        raise StopRun(f"--data {args.data}: train/ and val/ have different class folders; labels would not match")
    args.num_classes = len(val_set.classes)
    if train_set is not None and (args.percent or args.split_file):
        if args.percent:
            idx = sample_split(targets_of(train_set), args.split_seed, percent=args.percent)
        else:
            idx = read_split_file(args.split_file, train_set)
        print0(f"{'--percent ' + format(args.percent, 'g') if args.percent else '--split-file ' + args.split_file}: "
               f"{len(idx)} of {len(train_set)} training images")
        train_set = torch.utils.data.Subset(train_set, idx.tolist())
    return train_set, val_set


# checked copy of eval_fewshot.py's targets_of (tests/test_shared_blocks.py)
def targets_of(dataset):
    """Labels without loading images: ImageFolder / CIFAR .targets, STL10 .labels."""
    return torch.as_tensor(dataset.targets if hasattr(dataset, "targets") else dataset.labels).long()


# checked copy of eval_fewshot.py's sample_split (tests/test_shared_blocks.py)
def sample_split(labels, seed, shots=None, percent=None, class_names=None):
    """Sorted indices of a class-balanced subset: `shots` images of each class, or round(percent% of each class),
    at least 1. The same seed gives the same subset."""
    labels, g, chosen = torch.as_tensor(labels), torch.Generator().manual_seed(seed), []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        k = shots if shots is not None else max(1, round(len(idx) * percent / 100))
        if k > len(idx):
            name = class_names[c] if class_names else c
            raise StopRun(f"--shots {shots}: class '{name}' has only {len(idx)} training images; use at most "
                          f"{int((labels.bincount()[labels.bincount() > 0]).min())} shots")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values


# checked copy of eval_fewshot.py's read_split_file (tests/test_shared_blocks.py)
def read_split_file(path, dataset):
    """Sorted indices of the images a split file names. SimCLR: `n04235860_14959.JPEG` (class = the wnid prefix);
    Layer Grafted: `train/n04235860/n04235860_14959.JPEG 797` (class = the folder; the label column is ignored)."""
    if not hasattr(dataset, "samples"):
        raise StopRun(f"--split-file needs an ImageNet-layout --data folder, not --data {dataset.__class__.__name__}")
    if not os.path.isfile(path):
        raise StopRun(f"--split-file {path}: no such file")
    by_class, by_name = {}, {}  # (class, file name) -> index; file name -> [indices]
    for i, (p, c) in enumerate(dataset.samples):
        by_class[(dataset.classes[c], os.path.basename(p))] = i
        by_name.setdefault(os.path.basename(p), []).append(i)
    chosen, missing = [], []
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    for line in lines:
        parts = line.split()[0].replace("\\", "/").split("/")
        name = parts[-1]
        cls = parts[-2] if len(parts) > 1 else name.split("_")[0]  # folder, or the wnid prefix n01440764_...
        i = by_class.get((cls, name))
        if i is None and len(by_name.get(name, [])) == 1:  # no class in the line: the file name must be unique
            i = by_name[name][0]
        if i is None:
            missing.append(line)
        else:
            chosen.append(i)
    if missing:
        raise StopRun(f"--split-file {path} names {len(missing)} images that are not in {dataset.root} "
                      f"(first: {missing[0]}); is --data the right folder?")
    if not chosen:
        raise StopRun(f"--split-file {path} names no image")
    return torch.tensor(sorted(set(chosen)))


# ------------------------------------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description="End-to-end fine-tuning with MAE's recipe",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, output_dir="runs/finetune", model="vit_base", epochs=100, warmup_epochs=5, batch_size=1024,
                    blr=5e-4, weight_decay=0.05)  # MAE FINETUNE.md, ViT-B
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (MAE ViT-B 0.65, L/H 0.75)")
    p.add_argument("--drop-path", type=float, default=0.1,
                   help="stochastic depth of the last block (B 0.1, L 0.2, H 0.3)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="the cosine ends here (MAE: 1e-6)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (MAE: 0.1)")
    p.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha, 0: off (MAE: 0.8)")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha, 0: off (MAE: 1.0)")
    p.add_argument("--mixup-switch-prob", type=float, default=0.5, help="P(CutMix) for a batch when both are on")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", choices=["rand-m9-mstd0.5-inc1", "none"],
                   help="RandAugment policy (torchvision's approximation of timm's, see the docstring)")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (MAE: 0.25)")
    p.add_argument("--cls-token", action="store_true", help="classify the CLS token after the final norm instead of "
                   "the fc_norm of the mean patch token (MAE's default --global_pool)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: the model's); official "
                   "MoCo v3 ViT-S needs 12, and the weights cannot tell")
    p.add_argument("--percent", type=float, default=None, help="train on this percentage of each class (1 or 10: "
                   "the label-efficiency protocols; the same split as eval_fewshot.py --percent)")
    p.add_argument("--split-file", default=None, help="train on the images this SimCLR / Layer Grafted list names")
    p.add_argument("--split-seed", type=int, default=0, help="the --percent split's seed (eval_fewshot's --seeds)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the fine-tuned classifier --init on val/")
    return check_args(p.parse_args(argv))


def build_model(args, verbose=True):
    """The classifier of --model's size on args.num_classes classes, from --init (an encoder; with --eval-only a
    fine-tuned classifier, whose pooling it follows); the same seed on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(args.seed)
    weights = read_weights(args.init) if args.init != "random" else None
    if args.eval_only:
        args.cls_token = "fc_norm.weight" not in weights  # a classifier is evaluated as it was trained
    kw = {k: getattr(args, k) for k in ("patch_size", "num_heads") if getattr(args, k)}
    try:
        model = vit.MODELS[args.model](cls=Classifier, img_size=args.img_size, num_classes=args.num_classes,
                                       global_pool=not args.cls_token, drop_path_rate=args.drop_path, **kw)
    except AssertionError as e:  # vit.py checks the sizes: e.g. img_size not a multiple of the patch
        raise StopRun(f"--model {args.model}: {e}") from None
    args.patch_size, args.num_heads = model.patch_size, model.blocks[0].attn.num_heads
    if args.eval_only:
        load_classifier(model, weights, args)
    elif weights is not None:
        load_encoder(model, weights, args, verbose)
    return model


def build_optimizer(model, args, device):
    """AdamW(0.9, 0.999) over param_groups: layer-wise lr scales, no decay on 1-D parameters, cls_token, pos_embed."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr, betas=(0.9, 0.999),
                             fused=device.type == "cuda")


def lr_at_min(step, steps_per_epoch, args):
    """MAE util/lr_sched.py as fine-tuning runs it: the appendix's lr_at, but the cosine ends at --min-lr, not 0."""
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    cos = 0.5 * (1.0 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))
    return args.min_lr + (args.lr - args.min_lr) * cos


def main(argv=None):
    args = get_args(argv)
    run = Run(args)
    train_set, val_set = build_datasets(args, train=not args.eval_only)
    if args.eval_only:
        return eval_only(args, run, val_set)
    loader = run.loader(train_set, train_transform_batch)
    model = build_model(args, verbose=run.is_main).to(run.device)
    optimizer = build_optimizer(model, args, run.device)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and run.device.type == "cuda")
    epochs = run.resume(model, optimizer, scaler)
    ddp_model = run.wrap(model)
    mix, evals = mixup_cutmix(args), past_evals(run)  # evals: {step: val top-1} of this run so far

    if run.step and run.step == epochs.start * run.steps_per_epoch and run.step not in evals:
        validate(model, val_set, args, run, epochs.start - 1, evals)  # the epoch-end evaluation a stop interrupted
    for epoch in epochs:
        for imgs, labels in run.batches(loader, epoch):
            lr = set_lr(optimizer, lr_at_min(run.step, run.steps_per_epoch, args))  # x each group's lr_scale
            imgs, targets = soft_targets(imgs.to(run.device, non_blocking=True), labels.to(run.device), mix, args)
            with autocast(args, run.device):
                loss = soft_cross_entropy(ddp_model(imgs), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.end_step(loss, lr=lr)
        if run.epoch_done:
            validate(model, val_set, args, run, epoch, evals)  # all of val/, after every epoch
    if run.step not in evals:  # stopped by --max-steps within an epoch: its number too
        validate(model, val_set, args, run, run.step // run.steps_per_epoch, evals)
    run.finish(model.state_dict())  # encoder.pt: the whole fine-tuned classifier
    return model


def validate(model, val_set, args, run, epoch, evals):
    """Evaluate, print and log the line (val_top1, val_top5, val_loss, val_images, best_top1); best.pt on a new best."""
    stats = evaluate(model, val_set, args, run.device)
    new_best = stats["val_top1"] > max(evals.values(), default=-1.0)
    evals[run.step] = stats["val_top1"]
    line = {"epoch": epoch, "step": run.step, **stats, "best_top1": max(evals.values())}
    print0(json.dumps(line))
    error = None
    if run.is_main:
        try:  # best.pt first: a run killed in between evaluates again when resumed, as the log lacks the line
            if new_best:
                save_checkpoint({"model": model.state_dict(), "method": METHOD, "step": run.step, "epoch": epoch,
                                 **stats, "args": vars(args)}, os.path.join(args.output_dir, "best.pt"))
            run.log_file.write(json.dumps(line) + "\n")
            run.log_file.flush()
        except StopRun as e:
            error = str(e)
    error = run.agree(error)  # every rank stops with rank 0 if best.pt could not be written
    if error:
        raise run.stop(f"{error}; {run.saved}")


def past_evals(run):
    """{step: val_top1} of the evaluations in log.jsonl up to the step this run resumed at (none on a fresh run),
    read by rank 0 and sent to the others, so that all take the same decisions."""
    path, evals = os.path.join(run.args.output_dir, "log.jsonl"), [{}]
    if run.is_main and run.step and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    d = json.loads(line)
                    if "val_top1" in d and d["step"] <= run.step:
                        evals[0][d["step"]] = d["val_top1"]
    if run.world_size > 1:
        dist.broadcast_object_list(evals, 0)
    return evals[0]


def eval_only(args, run, val_set):
    """--eval-only: the classifier --init on all of val/; the line is printed and appended to log.jsonl."""
    model = build_model(args, verbose=run.is_main).to(run.device)
    stats = evaluate(model, val_set, args, run.device)
    print0(f"* Acc@1 {stats['val_top1']:.3f} Acc@5 {stats['val_top5']:.3f} loss {stats['val_loss']:.3f} "
           f"({stats['val_images']} images, --init {args.init})")
    if run.is_main:
        run.log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a")  # Run.resume opens it for training
        run.log_file.write(json.dumps({"eval_only": args.init, **stats}) + "\n")
    run.stop("done")
    if run.world_size > 1:
        dist.destroy_process_group()
    return stats


def train_transform_batch(x, args):
    """train_transform on a batch of uint8 images on the device (--in-memory, which needs --aa none): the appendix's
    crop and flip, then random erasing image by image (torchvision's, as train_transform)."""
    x = T.functional.normalize(resized_crop(x, args.img_size, (0.08, 1.0), "bicubic"), IMAGENET_MEAN, IMAGENET_STD)
    if args.reprob > 0:
        erase = T.RandomErasing(p=args.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")
        x = torch.stack([erase(img) for img in x])
    return x


# ------------------------------------------------------------------------------- inputs and their one-line errors

def check_args(args):
    """The flags, the shared ones first, refused before anything is read or written."""
    check_common_args(args)
    lr = args.blr * args.batch_size / 256
    check_flags(args, [
        (0 < args.layer_decay <= 1, "--layer-decay", "must lie in (0, 1]: each layer's lr over the next one's "
                                                     "(1: no decay; MAE: 0.65 for ViT-B)"),
        (0 <= args.drop_path < 1, "--drop-path", "must lie in [0, 1): the last block's drop probability"),
        (math.isfinite(args.min_lr) and 0 <= args.min_lr <= lr, "--min-lr", f"must lie in [0, lr] (lr = --blr x "
                                                                            f"--batch-size / 256 = {lr:.3g})"),
        (0 <= args.smoothing < 1, "--smoothing", "must lie in [0, 1) (MAE: 0.1)"),
        (math.isfinite(args.mixup) and args.mixup >= 0, "--mixup",
         "must be >= 0: the Beta alpha (0: off; MAE: 0.8)"),
        (math.isfinite(args.cutmix) and args.cutmix >= 0, "--cutmix",
         "must be >= 0: the Beta alpha (0: off; MAE: 1.0)"),
        (0 <= args.mixup_switch_prob <= 1, "--mixup-switch-prob", "must lie in [0, 1]"),
        (0 <= args.reprob <= 1, "--reprob", "must lie in [0, 1]"),
        (args.num_heads is None or args.num_heads >= 1, "--num-heads", "must be >= 1"),
        (args.percent is None or 0 < args.percent <= 100, "--percent", "must lie in (0, 100] (per class)"),
        (args.percent is None or args.split_file is None, "--split-file", "cannot be combined with --percent (each "
                                                                          "chooses the training images)"),
        (not args.in_memory or args.aa == "none", "--in-memory", "needs --aa none: RandAugment runs on PIL images, "
                                                                 "not on batches on the device"),
        (not args.in_memory or not (args.percent or args.split_file), "--in-memory",
         "decodes the whole train split: not with --percent / --split-file")])
    if args.init is None:
        raise StopRun("--init: pass the weights to fine-tune (our encoder.pt, an official MAE / MoCo v3 or timm file), "
                      "or --init random for the random-init baseline")
    if args.eval_only and args.init == "random":
        raise StopRun("--eval-only --init random: evaluates a fine-tuned classifier; pass its file (best.pt, "
                      "encoder.pt of a finetune.py run, or MAE's mae_finetuned_vit_*.pth)")
    return args


def read_weights(path):
    """The state dict in a checkpoint file (inside "model" / "state_dict" when there), keys without "module."."""
    if not os.path.isfile(path):
        raise StopRun(f"--init {path}: not found; pass the path of a .pt/.pth file, or --init random")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: a checkpoint never runs code
    except Exception as e:  # not a PyTorch file, cut short, or a pickled object (never unpickled here)
        raise StopRun(f"--init {path}: cannot read {path} as a file of weights ({type(e).__name__}); pass a .pt/.pth "
                      f"of tensors") from None
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise StopRun(f"--init {path}: holds no weights (a {type(sd).__name__} without tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}


def load_encoder(model, weights, args, verbose):
    """--init: an encoder (anything vit.load_pretrained reads) under a new head; not an already fine-tuned model."""
    if "fc_norm.weight" in weights:
        raise StopRun(f"--init {args.init} is a fine-tuned classifier (fc_norm, a head of "
                      f"{len(weights.get('head.weight', ()))} classes, no encoder norm), not a pre-trained encoder; "
                      f"evaluate it with --eval-only, or fine-tune from the encoder it was made from")
    encoder = vit.VisionTransformer(img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                                    depth=model.depth, num_heads=model.blocks[0].attn.num_heads)
    try:
        skipped = vit.load_pretrained(encoder, weights, verbose=verbose)  # pos_embed resized when img_size differs
    except ValueError as e:  # another model size, not a ViT
        raise StopRun(f"--init {args.init}: {one_line(e)}") from None
    sd = {k: v for k, v in encoder.state_dict().items() if not (model.global_pool and k.startswith("norm."))}
    missing = model.load_state_dict(sd, strict=False).missing_keys
    assert set(missing) == {"head.weight", "head.bias", *(["fc_norm.weight", "fc_norm.bias"] * model.global_pool)}
    print0(f"--init {args.init}: encoder loaded, new head of {args.num_classes} classes"
           + (" (its own head dropped)" if any(k.startswith("head.") for k in skipped) else ""))


def load_classifier(model, weights, args):
    """--eval-only: a fine-tuned classifier (ours: best.pt / encoder.pt; MAE's mae_finetuned_vit_*.pth), as it is."""
    if weights.get("head.weight", torch.zeros(0)).ndim != 2:
        raise StopRun(f"--init {args.init} has no classification head (an encoder?); --eval-only evaluates a "
                      f"fine-tuned classifier: fine-tune it first (drop --eval-only)")
    if len(weights["head.weight"]) != args.num_classes:
        raise StopRun(f"--init {args.init} classifies {len(weights['head.weight'])} classes, --data {args.data} has "
                      f"{args.num_classes}; pass the data it was fine-tuned on")
    if "pos_embed" in weights and weights["pos_embed"].shape != model.pos_embed.shape:
        weights["pos_embed"] = vit.resize_pos_embed(weights["pos_embed"], model.patch_embed.num_patches)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise StopRun(f"--init {args.init} does not fit --model {args.model} "
                      f"({str(e).strip().splitlines()[-1].strip()}); pass the --model / --patch-size / --num-heads "
                      f"it was fine-tuned with") from None
    print0(f"--init {args.init}: classifier of {args.num_classes} classes loaded "
           f"({'CLS token' if args.cls_token else 'global pool + fc_norm'})")


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
