"""Few-shot evaluation of a frozen ViT encoder: logistic regression, k-NN and a linear probe on a few labels per class.

Layer Grafted's headline is label efficiency: ViT-B/16 with 1% of the ImageNet labels reaches 65.5% top-1, against about
51.1 for MAE and 63.4 for MoCo v3 (from the abstract: +14.4 over MIM, +2.1 over CL), by MSN's low-shot protocol: frozen
features, multinomial logistic regression (cyanure), SimCLR's 1% split, full val. This file checks it for any encoder
vit.load_pretrained reads (ours, official MAE / MoCo v3, timm). Sources: inria-thoth/cyanure (preprocess, l2 objective),
VITA-Group/layerGraftedPretraining_ICLR23 @ f1862e1 (main_lincls_sweep.py: inferFeature, logistic_reg).

Run (first the paper's row; 1percent.txt is SimCLR's imagenet_subsets list):
    python eval_fewshot.py --checkpoint mae_pretrain_vit_base.pth --data /imagenet --split-file 1percent.txt
    torchrun --nproc_per_node 8 eval_fewshot.py ... --percent 1,10 --seeds 0,1,2 --cache feats/   # extraction on 8 GPUs
    python eval_fewshot.py --checkpoint runs/mae_c10/encoder.pt --model vit_tiny --img-size 32 --patch-size 4 \
        --data cifar10 --shots 1,2,5,10 --protocol logreg,knn,linear --json c10.json
    python eval_fewshot.py --checkpoint random ...   # random init: the floor to beat (MoCo v3's ViT-S: --num-heads 12)

Protocols (--protocol): fit on a split of the train set, scored on all of val/; over --seeds, mean +- 95% t-interval.
  logreg  MSN / Layer Grafted: cyan.preprocess(normalize=True, centering=True, columns=False) (per row: train and val
          apart, as officially, is the same), cyanure's l2 multinomial logistic regression, lambd 2.5e-4 (sklearn's C =
          1/lambd = 4000, no intercept: tested), by full-batch fp32 L-BFGS to cyanure's duality-gap tol 1e-3.
  knn     DINO's weighted k-NN: the k = min(--knn-k 20, n_train) cosine-nearest train features vote with exp(sim/0.07).
  linear  MAE's linear-probe head, BatchNorm1d(affine=False, eps 1e-6) + Linear (trunc-normal std 0.01, bias 0), on the
          cached features; not MAE's LARS (its batch-scaled lr does not transfer to 10-image batches) but SGD momentum
          0.9, lr 0.1, no weight decay, per-step cosine to 0, 100 epochs of batches of min(256, n_train); split seed.
Features (Layer Grafted inferFeature): eval(), no_grad, fp32 (--amp bf16: faster, not official), the CLS token after the
final LayerNorm (--feature mean: the patch tokens' mean), no augmentation: Resize(img_size / 0.875, bilinear, as the
official code) + CenterCrop, ImageNet mean/std. Under torchrun rank r extracts images r, r+W, ..., gathered in order
without duplicates. Only images some split uses are extracted; --cache DIR keeps them. NaN or inf features stop the run.
Splits, per class, deterministic in the seed: --percent P (round(P% of each class), at least 1; SimCLR's lists, drawn
over the whole set, hold 12-13 per class at 1%), --shots K (MSN's 1/2/5 images per class), or --split-file (SimCLR: a
file name per line, class from its wnid prefix; Layer Grafted's `train/<wnid>/<file> <label>` too): one fixed split,
which only the linear probe repeats per seed (logreg and k-NN are deterministic).
Deviations from the official code, on purpose: no cyanure dependency (L-BFGS instead of its QNING/MISO solver; same
objective and stopping tolerance); no duplicate val images under DDP; no hyper-parameter is selected on val.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from tqdm import tqdm

import vit

# -------------------------------------------------------------------------------------------------- protocols
def preprocess(x):
    """cyanure.preprocess(X, centering=True, normalize=True, columns=False): per row, Matrix::center then normalize."""
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-10)


def logreg_accuracy(train_x, train_y, test_x, test_y, lambd=2.5e-4, max_iter=1000, tol=1e-3, device=None,
                    dtype=torch.float32, return_info=False):
    """Top-1 accuracy (fraction) of MSN / Layer Grafted's logistic regression. Objective (cyanure, no intercept):
        P(W) = (1/n) sum_i [logsumexp(W^T x_i) - (W^T x_i)_{y_i}] + (lambda/2) ||W||^2,   lambda = lambd / n
    Stops at relative duality gap (P - D) / P < tol, with the dual point p_i = softmax(W^T x_i) (Fenchel dual):
        D = (1/n) sum_i H(p_i) - ||X^T (P - Y)||^2 / (2 lambda n^2).
    return_info: also return {'iterations', 'rel_gap'}."""
    device = torch.device(device) if device is not None else train_x.device
    X, Xt = preprocess(train_x.to(device, dtype)), preprocess(test_x.to(device, dtype))
    y, yt = train_y.to(device).long(), test_y.to(device).long()
    lam = lambd / len(X)  # MSN / Layer Grafted: lambd /= len(features_train)
    n, num_classes, rows = len(X), int(max(y.max(), yt.max())) + 1, torch.arange(len(X), device=device)
    W = torch.zeros(X.shape[1], num_classes, device=device, dtype=dtype, requires_grad=True)  # (D, C)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=10, history_size=100, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W, y) + lam / 2 * W.pow(2).sum()
        loss.backward()
        return loss

    iters, rel_gap = 0, float("inf")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32's 10-bit mantissa would cost the duality gap its precision
    try:
        while iters < max_iter:
            chunk = opt.param_groups[0]["max_iter"] = min(10, max_iter - iters)  # check the gap every 10 iterations
            opt.param_groups[0]["max_eval"] = 4 * chunk  # line-search evaluations must not end the chunk early
            opt.step(closure)
            done = opt.state[W]["n_iter"]
            with torch.no_grad():  # relative duality gap, cyanure's stopping test
                logp = (X @ W).log_softmax(dim=1)  # (n, C)
                p = logp.exp()
                primal = -logp[rows, y].mean() + lam / 2 * W.pow(2).sum()
                entropy = -(p * logp).sum(dim=1).mean()
                p[rows, y] -= 1  # P - Y, the gradient of the loss w.r.t. the logits
                dual = entropy - (X.T @ p).pow(2).sum() / (2 * lam * n * n)
                rel_gap = abs(float(primal - dual)) / max(float(primal), 1e-12)
            stalled, iters = done - iters < chunk, done
            if rel_gap < tol or stalled:  # stalled: L-BFGS stopped early on its own gradient / change tolerance
                break
        if not math.isfinite(rel_gap):  # NaN or inf weights (a huge lambd), or an inf gap (a tiny one)
            raise StopRun(f"--lambd {lambd}: the logistic regression's duality gap is {rel_gap}; try MSN's 2.5e-4")
        acc = ((Xt @ W.detach()).argmax(dim=1) == yt).float().mean().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return (acc, {"iterations": iters, "rel_gap": rel_gap}) if return_info else acc


@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k=20, t=0.07, device=None, chunk=4096):
    """Top-1 accuracy (fraction) of DINO's weighted k-NN (eval_knn.py); k is capped at the number of train features."""
    device = torch.device(device) if device is not None else train_x.device
    X, y = F.normalize(train_x.to(device).float(), dim=1), train_y.to(device).long()
    num_classes, k = int(max(y.max(), test_y.max())) + 1, min(k, len(X))
    correct = 0
    for xt, yt in zip(test_x.split(chunk), test_y.split(chunk)):  # chunks: a (chunk, n_train) similarity at a time
        sim, idx = (F.normalize(xt.to(device).float(), dim=1) @ X.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(len(xt), num_classes, device=device)
        votes.scatter_add_(1, y[idx], ((sim - sim[:, :1]) / t).exp())  # (B, C): weights / the nearest one's (<= 1)
        correct += (votes.argmax(dim=1).cpu() == yt.cpu()).sum().item()
    return correct / len(test_x)


def linear_accuracy(train_x, train_y, test_x, test_y, epochs=100, lr=0.1, batch_size=256, seed=0, device=None):
    """Top-1 accuracy (fraction) of MAE's linear-probe head on fixed features, with our SGD recipe (see the top)."""
    device = torch.device(device) if device is not None else train_x.device
    X, y = train_x.to(device).float(), train_y.to(device).long()
    num_classes, n = int(max(y.max(), test_y.max())) + 1, len(X)
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(X.shape[1], num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=g)  # MAE main_linprobe.py
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(X.shape[1], affine=False, eps=1e-6), linear).to(device)  # MAE's BN0
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    batch_size = min(batch_size, n)
    steps = n // batch_size  # per epoch: drop the last, partial batch (a batch of 1 breaks BatchNorm)
    head.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i, b in enumerate(perm[:steps * batch_size].view(steps, batch_size)):
            opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + i) / (epochs * steps)))
            loss = F.cross_entropy(head(X[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    if not all(v.isfinite().all() for v in head.state_dict().values()):
        raise StopRun(f"--linear-lr {lr}: the linear probe diverged (NaN or inf weights); use a smaller --linear-lr")
    with torch.no_grad():
        pred = torch.cat([head(xt.to(device).float()).argmax(dim=1).cpu() for xt in test_x.split(8192)])
    return (pred == test_y.cpu()).float().mean().item()


# Student-t 0.975 quantiles for 1..30 degrees of freedom (a table: no scipy); beyond 30, Cornish-Fisher in mean_ci95
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci95(values):
    """(mean, half-width of the 95% Student-t interval); half-width None for a single value."""
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df, z = n - 1, 1.959964
    t = T975[df - 1] if df <= 30 else z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    return mean, t * sd / math.sqrt(n)


# -------------------------------------------------------------------------------------------- features and splits
def eval_transform(img_size):
    return T.Compose([T.Resize(int(img_size / 0.875)), T.CenterCrop(img_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # Layer Grafted: Resize(256) + CenterCrop(224)


@torch.no_grad()
def extract_dataset(model, dataset, device, indices=None, batch_size=256, num_workers=0, feature="cls", amp="bf16"):
    """Frozen features (N, D) float32 and labels (N,) of dataset[indices] (default: all), in order, on the CPU.
    Under torch.distributed each rank extracts every W-th image (batch_size is per rank, a rank may have none)."""
    indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    subset = torch.utils.data.Subset(dataset, indices[rank::world_size].tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    model.eval()
    x, y = [torch.zeros(0, model.embed_dim, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
    for imgs, labels in tqdm(loader, desc="features", leave=False, dynamic_ncols=True, disable=rank != 0):
        with torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                            enabled=device.type == "cuda" and amp != "none"):
            tokens = model.forward_features(imgs.to(device, non_blocking=True)).float()  # (B, 1+L, D), fp32 to pool
        x.append(tokens[:, 0] if feature == "cls" else tokens[:, 1:].mean(dim=1))  # (B, D)
        y.append(torch.as_tensor(labels).to(device).long())
    x, y = torch.cat(x), torch.cat(y)
    if world_size > 1:
        x, y = gather_in_order(x, len(indices), world_size), gather_in_order(y, len(indices), world_size)
    return x.cpu(), y.cpu()


def gather_in_order(x, n, world_size):
    """x holds items rank, rank+W, rank+2W, ... of a list of n; returns the whole list, in order, on every rank.
    all_gather wants one shape: pad each part to rank 0's count, ceil(n / W); the padding then comes last."""
    padded = torch.cat([x, x.new_zeros((math.ceil(n / world_size) - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n]  # row j of rank r is item j * W + r


def cached_features(model, dataset, indices, split, args, device):
    """Features of dataset[indices], in that order; with --cache, only images never extracted before are computed.
    The file's name hashes all the features depend on: the weights (path, size, mtime), encoder, input, image list."""
    path, have_idx, have_x = None, torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    if args.cache:
        files = [p[len(args.data):] for p, _ in dataset.samples] if hasattr(dataset, "samples") else [len(dataset)]
        c = args.checkpoint
        ckpt = c if c == "random" else [os.path.abspath(c), os.path.getsize(c), os.stat(c).st_mtime_ns]
        key = [ckpt, args.model, args.img_size, args.patch_size, args.num_heads, args.feature, args.amp,
               os.path.abspath(args.data), split, hashlib.sha1("\n".join(map(str, files)).encode()).hexdigest()]
        path = os.path.join(args.cache, f"{split}_{args.model}_{args.feature}_"
                                        f"{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.pt")
    if path and os.path.isfile(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            have_idx, have_x = cached["indices"], cached["features"]
        except Exception as e:  # cut short or not ours: the cache is only derived data, so extract again
            print0(f"note: --cache file {path} is unreadable ({type(e).__name__}); extracting its features again")
    missing = indices[~torch.isin(indices, have_idx)]
    print0(f"{split}: {len(indices)} images, {len(indices) - len(missing)} from the cache, {len(missing)} to extract")
    if len(missing):
        x, _ = extract_dataset(model, dataset, device, missing, args.batch_size // args.world_size, args.num_workers,
                               args.feature, args.amp)
        have_idx, have_x = torch.cat([have_idx, missing]), torch.cat([have_x.reshape(-1, x.shape[1]), x])
        if path and (not dist.is_initialized() or dist.get_rank() == 0):  # rank 0 writes the file
            try:
                torch.save({"indices": have_idx, "features": have_x}, path + ".tmp")
                os.replace(path + ".tmp", path)  # atomic, as save_checkpoint in the training scripts
            except (OSError, RuntimeError) as e:  # e.g. a full disk; the features are in memory, the cache is optional
                print0(f"note: --cache: could not write {path} ({one_line(e)}); going on without it")
    row = torch.full((len(dataset),), -1, dtype=torch.long)  # image index -> row of have_x
    row[have_idx] = torch.arange(len(have_idx))
    return have_x[row[indices]]


def targets_of(dataset):
    """Labels without loading images: ImageFolder / CIFAR .targets, STL10 .labels."""
    return torch.as_tensor(dataset.targets if hasattr(dataset, "targets") else dataset.labels).long()


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


# ------------------------------------------------------------------------------------------------------- main
def get_args(argv=None):
    p = argparse.ArgumentParser(description="Few-shot evaluation of a frozen ViT (Layer Grafted's 1% protocol, ...)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="any file vit.load_pretrained reads, or 'random': a random init")
    p.add_argument("--model", default="vit_base", choices=list(vit.MODELS), help="encoder size")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (Resize(img_size/0.875) + CenterCrop)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's, 16 or 14)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: the model's); MoCo v3 ViT-S needs 12")
    p.add_argument("--data", required=True, help="ROOT/{train,val}/<class>/* or cifar10|cifar100|stl10; scored on val")
    p.add_argument("--data-root", default="./data", help="download folder for --data cifar10|cifar100|stl10")
    p.add_argument("--feature", default="cls", choices=["cls", "mean"], help="final-norm CLS token or patch-token mean")
    p.add_argument("--percent", help="comma list of per-class percentages, e.g. 1,10 (1 if no split option is given)")
    p.add_argument("--shots", help="comma list of images per class, e.g. 1,2,5,13 (MSN)")
    p.add_argument("--split-file", action="append", help="SimCLR's 1percent.txt or Layer Grafted's list; repeatable")
    p.add_argument("--seeds", default="0,1,2", help="comma list of split seeds (mean +- 95%% CI)")
    p.add_argument("--protocol", default="logreg,knn", help="comma list of logreg (paper), knn, linear")
    p.add_argument("--lambd", type=float, default=2.5e-4, help="logreg L2 penalty / n_train (MSN); sklearn C = 1/lambd")
    p.add_argument("--max-iter", type=int, default=1000, help="logreg L-BFGS steps at most (stops at duality gap 1e-3)")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours (DINO: 20)")
    p.add_argument("--knn-t", type=float, default=0.07, help="k-NN temperature (DINO: 0.07)")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs over the split")
    p.add_argument("--linear-lr", type=float, default=0.1, help="probe SGD lr (not batch-scaled: BN0 normalizes)")
    p.add_argument("--linear-batch-size", type=int, default=256, help="linear probe batch (capped at n_train)")
    p.add_argument("--batch-size", type=int, default=256, help="GLOBAL feature-extraction batch, over all processes")
    p.add_argument("--num-workers", type=int, default=min(10, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"], help="autocast on CUDA (official: fp32)")
    p.add_argument("--cache", default=None, help="folder that keeps extracted features between runs")
    p.add_argument("--json", default=None, help="write the results, args, versions and device to this file")
    a, lists = p.parse_args(argv), {}
    world = int(os.environ.get("WORLD_SIZE", 1))
    a.percent = a.percent if a.percent or a.shots or a.split_file else "1"  # the paper's headline split size
    for key, kind in (("percent", float), ("shots", int), ("seeds", int), ("protocol", str)):  # comma lists
        with contextlib.suppress(ValueError):  # not a `kind`: stays None, and a rule below says so
            lists[key] = [kind(v.strip()) for v in (getattr(a, key) or "").split(",") if v.strip()]
    percent, shots, seeds, protocols = (lists.get(k) for k in ("percent", "shots", "seeds", "protocol"))
    rules = [(getattr(a, k) is None or getattr(a, k) >= low, k, f"must be >= {low}") for k, low in (("max_iter", 1),
             ("knn_k", 1), ("linear_epochs", 1), ("linear_batch_size", 2), ("batch_size", 1), ("num_workers", 0),
             ("img_size", 1), ("patch_size", 1), ("num_heads", 1))]
    rules += [(math.isfinite(getattr(a, k)) and getattr(a, k) > 0, k, "must be a positive number")
              for k in ("lambd", "knn_t", "linear_lr")]
    rules += [(protocols and set(protocols) <= {"logreg", "knn", "linear"}, "protocol", "takes logreg, knn, linear"),
              (percent is not None and all(0 < v <= 100 for v in percent), "percent", "takes numbers in (0, 100]"),
              (shots is not None and all(k >= 1 for k in shots), "shots", "takes integers >= 1"),
              (seeds and all(0 <= v < 2**63 for v in seeds), "seeds", "takes integers >= 0 and < 2**63"),
              (a.batch_size % world == 0, "batch_size", f"is global: divide it by the {world} processes"),
              (not a.patch_size or not a.img_size % a.patch_size, "patch_size", f"must divide --img-size {a.img_size}")]
    for ok, key, rule in rules:  # the first broken rule stops the run before anything is read or written
        if not ok:
            raise StopRun(f"--{key.replace('_', '-')} {getattr(a, key)}: {rule}")
    a.protocol, a.percent, a.shots, a.seeds = protocols, percent or None, shots or None, seeds
    return a


def make_splits(args, train_set, labels):
    """[(name, {seed: sorted train indices})]: one entry per --percent / --shots / --split-file value."""
    names = getattr(train_set, "classes", None)
    splits = [(f"{p:g}%", {s: sample_split(labels, s, percent=p) for s in args.seeds}) for p in args.percent or []]
    splits += [(f"{k}-shot", {s: sample_split(labels, s, shots=k, class_names=names) for s in args.seeds})
               for k in args.shots or []]
    for path in args.split_file or []:
        idx = read_split_file(path, train_set)
        splits.append((os.path.basename(path), {s: idx for s in args.seeds}))  # fixed split: seeds vary the probe only
    return splits


def build_encoder(args, verbose):
    """--model, random (seed 0: the same every time) or loaded from --checkpoint (else a one-line error)."""
    torch.manual_seed(0)
    kw = {k: getattr(args, k) for k in ("patch_size", "num_heads") if getattr(args, k)}
    try:  # vit.py asserts that the sizes divide; a checkpoint not found, unreadable, or of another model: ValueError
        model = vit.MODELS[args.model](img_size=args.img_size, **kw)
        if args.checkpoint != "random":
            vit.load_pretrained(model, args.checkpoint, verbose=verbose)
    except (AssertionError, ValueError) as e:
        raise StopRun(f"--checkpoint {args.checkpoint} --model {args.model}: {one_line(e)}") from None
    args.patch_size, args.num_heads = model.patch_size, model.blocks[0].attn.num_heads
    return model


def main(argv=None):
    args = get_args(argv)
    for flag, path in (("--cache", args.cache), ("--json", args.json and os.path.dirname(os.path.abspath(args.json)))):
        try:  # before any work: a folder under a file fails now (a full disk only when written: one line then too)
            os.makedirs(path or ".", exist_ok=True)
        except OSError as e:
            raise StopRun(f"{flag}: cannot make the folder {path} ({e.strerror or e}); pass another path") from None
    rank, world_size, device = setup_distributed()
    args.world_size, sha = world_size, git_sha()
    print0(f"eval_fewshot: torch {torch.__version__}, {world_size} process(es) on {device}, git {sha}")
    print0("args: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))

    # model and data: every input error before any long work
    model = build_encoder(args, verbose=rank == 0).to(device)
    train_set, val_set = eval_datasets(args)
    train_labels, val_labels = targets_of(train_set), targets_of(val_set)
    splits = make_splits(args, train_set, train_labels)

    # features: only the train images some split uses, every val image
    t0 = time.perf_counter()
    used = torch.cat([idx for _, per_seed in splits for idx in per_seed.values()]).unique()  # sorted
    used_x = cached_features(model, train_set, used, "train", args, device)
    val_x = cached_features(model, val_set, torch.arange(len(val_set)), "val", args, device)
    print0(f"features: {used_x.shape[1]}-d, {time.perf_counter() - t0:.1f} s")
    if not (used_x.isfinite().all() and val_x.isfinite().all()):  # an accuracy from NaN: a number nobody can trust
        raise StopRun(f"--checkpoint {args.checkpoint}: its features hold NaN or inf (weights of a diverged run, or an "
                      f"overflow under --amp {args.amp}); no accuracy is computed: pass another checkpoint")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()  # the classifiers run on rank 0 alone
        if rank != 0:
            return None

    # protocols: split x protocol, each over the seeds; a row of the report as each is done
    rows = []
    print0(f"\n{'protocol':<9} {'split':<16} {'n_train':>8} {'top-1 %':>8} {'+-95%':>7} {'seeds':>5} {'seconds':>8}")
    for split_name, per_seed in splits:
        fixed = len({tuple(idx.tolist()) for idx in per_seed.values()}) == 1
        for protocol in args.protocol:
            seeds = args.seeds[:1] if fixed and protocol != "linear" else args.seeds  # deterministic: once is enough
            accs, infos, t0 = [], [], time.perf_counter()
            for seed in seeds:
                tx, ty = used_x[torch.searchsorted(used, per_seed[seed])], train_labels[per_seed[seed]]  # used: sorted
                if protocol == "logreg":
                    acc, info = logreg_accuracy(tx, ty, val_x, val_labels, args.lambd, args.max_iter, device=device,
                                                return_info=True)
                    infos.append(info)
                elif protocol == "knn":
                    acc = knn_accuracy(tx, ty, val_x, val_labels, args.knn_k, args.knn_t, device=device)
                else:
                    acc = linear_accuracy(tx, ty, val_x, val_labels, args.linear_epochs, args.linear_lr,
                                          args.linear_batch_size, seed, device=device)
                accs.append(round(100 * acc, 4))
            mean, ci = mean_ci95(accs)
            rows.append({"protocol": protocol, "split": split_name, "n_train": len(per_seed[seeds[0]]),
                         "n_val": len(val_x), "seeds": seeds, "top1_per_seed": accs, "top1_mean": mean, "top1_ci95": ci,
                         "seconds": round(time.perf_counter() - t0, 2), **({"logreg": infos} if infos else {})})
            print0(f"{protocol:<9} {split_name:<16} {rows[-1]['n_train']:>8} {mean:>8.2f} "
                   f"{'n/a' if ci is None else f'{ci:.2f}':>7} {len(seeds):>5} {rows[-1]['seconds']:>8.1f}")
    command = sys.argv if argv is None else ["eval_fewshot.py", *map(str, argv)]
    result = {"rows": rows, "checkpoint": args.checkpoint, "command": command, "args": vars(args),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "git": sha},
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "world_size": world_size, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.checkpoint != "random":
        result.update(checkpoint_mtime=os.stat(args.checkpoint).st_mtime,
                      checkpoint_bytes=os.path.getsize(args.checkpoint))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            raise StopRun(f"--json {args.json}: cannot write it ({e.strerror or e}); the results are printed above")
        print0(f"wrote {args.json}")
    return result


def git_sha():
    with contextlib.suppress(Exception):  # the commit, for the record; None without git or outside a checkout
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None


# ------------------------------------------------------------------------------- inputs and their one-line errors
def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs one process on cuda:0 or the CPU (gloo for CPU)."""
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) \
        if "RANK" in os.environ else (0, 1, 0)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if "RANK" in os.environ and device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.backends.cudnn.benchmark = True
    return rank, world_size, device


def eval_datasets(args):
    """(train, val) by the training scripts' build_dataset, but stl10's train is its 5k labelled images only."""
    transform = eval_transform(args.img_size)
    val_set = build_dataset(args, transform, "val")  # stl10: downloads its one archive (all splits) if needed
    if args.data == "stl10":
        train_set = torchvision.datasets.STL10(args.data_root, "train", transform=transform)
    else:
        train_set = build_dataset(args, transform, "train")
    if getattr(train_set, "classes", None) != getattr(val_set, "classes", None):
        raise StopRun(f"--data {args.data}: train/ and val/ have different class folders; labels would not match")
    return train_set, val_set


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


# ======================== checked copy of mae.py's appendix (tests/test_shared_blocks.py): StopRun ... print0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(" ".join(str(x) for x in a), **kw)


if __name__ == "__main__":
    try:
        main()
    except StopRun as e:
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
        sys.exit("error: stopped by Ctrl-C before the results; the same command starts again (--cache keeps the "
                 "features it saved)")
