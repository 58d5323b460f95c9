"""CL vs MIM analysis tools from "What Do Self-Supervised Vision Transformers Learn?" (Park et al., ICLR 2023).

Several encoders side by side (any file vit.load_pretrained reads, or `random`), every measurement as numbers (a
table, and --out DIR/analysis.json) and as one picture per analysis (--out DIR/*.png, the models overlaid):
  - mean attention distance (pixels), per block: how far each query looks. Park et al. report that CL (MoCo v3)
    attends globally in later blocks and MIM (MAE, SimMIM) stays local.                      attention_distance.png
  - attention NMI, per block: normalized mutual information between query and key positions. Low NMI = "attention
    collapse": every query attends to the same keys (Park et al.: CL in later blocks).        attention_nmi.png
  - Fourier Δlog-amplitude, for the embedding and every block: high-frequency content of the token feature maps
    relative to the zero frequency (closer to 0 = more; Park et al.: MIM keeps more than CL).          fourier.png
  - attention maps (Park et al. Fig. 2): in one block (--attn-block, default the last), the attention of a few query
    patches (--queries) over one image, mean over heads. Park et al.: CL maps look alike whatever the query
    (collapse), MIM maps stay around the query.                                              attention_maps.png
  - per-block k-NN probes (their Fig. 10 reports MoCo rising to the last block, SimMIM peaking near block 8): the
    weighted k-NN of eval_fewshot.py on each block's features, bank from ROOT/train, scored on ROOT/val.  probes_knn.png
  - linear CKA (Kornblith et al. 2019) between every block of one model and every block of another, on the same val
    images, for every pair of models (one model: itself), as heat maps.                                  cka.png
  - gradient conflict (--conflict NAME=PATH: hybrid.py checkpoints, or random), for Layer Grafted's claim that the
    naive joint loss has "conflicting gradient directions - more severe as the layers go deeper". Per layer of the
    shared encoder, cos(grad L_MIM, grad L_CL) on --conflict-batches batches of hybrid.py's own training views, one
    value per batch, as a distribution per layer (single process; train-mode BN, momentum 1: our choices). conflict.png
Facts from the official notebooks (naver-ai/cl-vs-mim @ eafe516): CLS row and column dropped and rows renormalized;
distance in pixels (patch size x grid distance); p(q) uniform; the Fourier value is the last point of the diagonal
from the centre of the shifted spectrum, minus the centre value, for the embedding and every block output. The
attention notebook uses 60 Imagenette val images (the first 6 of each class); the Fourier notebook the first 16.

What we use: --num-images 60 images spread evenly over ROOT/val (else ROOT/train) in ImageFolder order, so about the
same number per class and the same images every run; Fourier on 16 of them, again spread evenly (--fourier-images).
Block features for the probes and CKA: each block's output through the model's final LayerNorm (for the last block
that is eval_fewshot.py's feature; our resize is bicubic, its bilinear), then the mean of the patch tokens
(--probe-feature mean) or the CLS token; the probes use --probe-train images of ROOT/train and --probe-val of
ROOT/val, seeded subsets (--seed), and CKA uses the same val features. Blocks are numbered from 1 (the paper's
"block 8"), 0 is the patch embedding. Every input is checked before any work (one-line errors, --out included), and
a NaN or inf anywhere (weights, features, a measurement) stops the run: no table or picture shows one.
`random` is the seed-0 init, the same random encoder as eval_fewshot.py --checkpoint random.

Run (pip install matplotlib for the pictures; without it only the JSON is written):
    python analyze.py --data /imagenette --model vit_base --checkpoint mae=runs/mae/encoder.pt \\
        --checkpoint moco=runs/moco/encoder.pt --checkpoint random=random --out analysis/
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from tqdm import tqdm

import vit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ------------------------------------------------------------------------------------------------- measurements

def _patch_attention(attn, eps):
    """(B, H, 1+L, 1+L) -> (B, H, L, L): drop the CLS row and column, renormalize each query's row."""
    a = attn[:, :, 1:, 1:].double() + eps
    return a / a.sum(dim=-1, keepdim=True)


def attention_distance(attn, patch_size):
    """Mean attention distance per head, (H,), in pixels: mean over queries and images of sum_k a(q,k) d(q,k)."""
    a = _patch_attention(attn, 1e-32)
    grid = int(math.sqrt(a.shape[-1]))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # (L, 2)
    d = patch_size * torch.cdist(pos, pos)  # (L, L) pixel distance between patch centres
    return (a * d).sum(-1).mean(dim=(0, 2)).float()  # (B, H, L) -> (H,)


def attention_nmi(attn):
    """Normalized mutual information between query and key positions per head, (H,), averaged over images.
    p(q) = 1/L, p(k|q) = a(q,k), p(k) = sum_q p(q) a(q,k); NMI = I(q;k) / sqrt(H(q) H(k))."""
    a = _patch_attention(attn, 1e-8)  # (B, H, L, L)
    L = a.shape[-1]
    p_k = a.mean(dim=2, keepdim=True)  # (B, H, 1, L)
    mi = (a * (a / p_k).log()).sum(dim=(-2, -1)) / L  # sum_q p(q) sum_k a log(a / p(k))
    h_q = math.log(L)
    h_k = -(p_k * p_k.log()).sum(dim=(-2, -1))
    return (mi / (h_q * h_k).sqrt()).mean(dim=0).float()  # (H,)


def fourier_delta_log_amplitude(tokens):
    """(B, 1+L, C) tokens -> Δlog-amplitude at the highest frequency on the diagonal of the shifted 2-D spectrum,
    relative to the zero frequency (a negative number; closer to 0 = more high-frequency content)."""
    z = tokens[:, 1:].double()
    B, L, C = z.shape
    h = int(math.sqrt(L))
    z = z.transpose(1, 2).reshape(B, C, h, h)
    amp = torch.fft.fft2(z).abs().add(1e-6).log()
    amp = torch.roll(amp, shifts=(h // 2, h // 2), dims=(2, 3)).mean(dim=(0, 1))  # fftshift; mean over images, channels
    diag = amp.diagonal()[h // 2:]  # centre (zero frequency) to corner (highest frequency)
    return float(diag[-1] - diag[0])


def attention_maps(attn, queries):
    """(B, H, 1+L, 1+L) attention and [(row, col)] query patches -> (B, Q, g, g): where each query looks on the
    g x g patch grid. CLS dropped and rows renormalized as for the distance (the notebook's Fig. 2 cell), then the mean
    over heads (the notebook shows head 0; the mean shows every head at once). Each map sums to one."""
    a = _patch_attention(attn, 1e-32)  # (B, H, L, L)
    g = int(math.sqrt(a.shape[-1]))
    rows = [r * g + c for r, c in queries]  # token index of each query patch, row-major as in vit.PatchEmbed
    return a[:, :, rows].mean(dim=1).reshape(a.shape[0], len(queries), g, g).float()


def linear_cka(x, y):
    """Linear CKA (Kornblith et al., ICML 2019) of features x (n, d1) and y (n, d2) of the same n images:
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features. 1 when y = x up to an orthogonal map and a
    scale; near 0 for unrelated features (about d/n for independent noise: use n well above d)."""
    x = x.double() - x.double().mean(dim=0)  # centring: CKA compares the features' variation, not their mean
    y = y.double() - y.double().mean(dim=0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


# checked copy of eval_fewshot.py (tests/test_shared_blocks.py)
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


@torch.no_grad()
def analyze(model, imgs, num_fourier=None):
    """Per-block measurements of one encoder on one batch: a dict of lists (one value per block, mean over heads).
    The Fourier value uses num_fourier of the images (default all), spread evenly over the batch."""
    model.eval()
    _, attns, outs = model.forward_features(imgs, return_intermediates=True)
    embedding = torch.cat([model.cls_token.expand(imgs.shape[0], -1, -1), model.patch_embed(imgs)], 1) + model.pos_embed
    f = spread(len(imgs), num_fourier or len(imgs))
    return {"attention_distance": [attention_distance(a, model.patch_size).mean().item() for a in attns],
            "attention_nmi": [attention_nmi(a).mean().item() for a in attns],
            "fourier_dlogamp": [fourier_delta_log_amplitude(z[f]) for z in [embedding] + outs]}  # embedding, blocks


@torch.no_grad()
def attention_maps_of(model, img, block, queries):
    """(Q, g, g): the attention maps of the query patches on one image (C, H, W) in `block` (1 = the first)."""
    model.eval()
    _, attns, _ = model.forward_features(img[None], return_intermediates=True)
    return attention_maps(attns[block - 1], queries)[0]


@torch.no_grad()
def block_features(model, dataset, device, batch_size=64, feature="mean", desc="features"):
    """Per-block features of every image of `dataset`: a list of depth tensors (N, D) on the CPU, and the labels (N,).
    Each block's output goes through the model's final norm, as the last one does in forward_features, so that blocks
    are compared on one scale; then the mean of the patch tokens (feature="mean") or the CLS token ("cls")."""
    model.eval()
    # num_workers=0: few images, and an unreadable one exits with its name instead of a worker's traceback
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=False, num_workers=0)
    feats, labels = [[] for _ in model.blocks], []
    for imgs, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        _, _, outs = model.forward_features(imgs.to(device), return_intermediates=True)
        for i, z in enumerate(outs):  # (B, 1+L, D) per block
            z = model.norm(z).float()
            feats[i].append((z[:, 1:].mean(dim=1) if feature == "mean" else z[:, 0]).cpu())
        labels.append(torch.as_tensor(y))
    return [torch.cat(f) for f in feats], torch.cat(labels)


def cka_matrix(feats_a, feats_b):
    """[[CKA(block i of A, block j of B)]]: rows are A's blocks, columns B's."""
    return [[linear_cka(x, y) for y in feats_b] for x in feats_a]

# ------------------------------------------------------------------------------------------------------- images

def fail(message):
    """Bad input: one line naming the problem and the fix, no traceback."""
    sys.exit(f"error: {message}")


# checked copy of mae.py (tests/test_shared_blocks.py): StopRun, one_line, pil_loader
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


def eval_transform(img_size):
    resize = T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_folder(root, split, img_size, why):
    """ROOT/<split> as an ImageFolder, or a one-line error saying what is missing."""
    import torchvision.datasets as datasets
    folder = os.path.join(root, split)
    if not os.path.isdir(root):
        fail(f"--data {root}: no such folder; pass an ImageNet-layout root (ROOT/val/<class>/<image>)")
    if not os.path.isdir(folder):
        fail(f"--data {root}: no '{split}' folder inside ({why}); expected ROOT/{split}/<class>/<image>")
    try:
        return datasets.ImageFolder(folder, transform=eval_transform(img_size), loader=pil_loader)
    except FileNotFoundError as e:
        fail(f"--data {root}: {folder} holds no class folders with images ({e}); expected ROOT/{split}/<class>/<image>")


def spread(n_total, n):
    """min(n, n_total) indices spread evenly over range(n_total), first and last included."""
    return torch.linspace(0, n_total - 1, min(n, n_total)).long().tolist()


def seeded_subset(n_total, n, seed):
    """min(n, n_total) sorted indices drawn without replacement, the same for the same seed."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()


def fixed_batch(root, img_size, num_images):
    """num_images from ROOT/val (else ROOT/train), spread evenly over the folder: the same images every run.
    Returns the batch (N, 3, img_size, img_size) and the images' paths relative to ROOT."""
    split = "val" if os.path.isdir(os.path.join(root, "val")) else "train"
    ds = image_folder(root, split, img_size, "the analysis images come from val/, else train/")
    idx = spread(len(ds), num_images)
    return torch.stack([ds[i][0] for i in idx]), [os.path.relpath(ds.samples[i][0], root) for i in idx]


def probe_sets(root, img_size, n_train, n_val, seed):
    """Seeded subsets of ROOT/train (the k-NN bank) and ROOT/val (scored), with the same classes."""
    why = "the per-block probes need labelled train/ and val/"
    train, val = image_folder(root, "train", img_size, why), image_folder(root, "val", img_size, why)
    if train.classes != val.classes:
        fail(f"--data {root}: train/ and val/ have different class folders ({len(train.classes)} vs "
             f"{len(val.classes)}); the probes need the same classes in both")
    ti, vi = seeded_subset(len(train), n_train, seed), seeded_subset(len(val), n_val, seed)
    sub = torch.utils.data.Subset
    return sub(train, ti), sub(val, vi), [os.path.relpath(train.samples[i][0], root) for i in ti], \
        [os.path.relpath(val.samples[i][0], root) for i in vi]

# ----------------------------------------------------------------------------------------------------- pictures

# Each picture's title says what was measured, on what; a paper's finding, where quoted, is labelled as the paper's:
# these data may or may not show it.
CURVES = {  # JSON key -> file, what was measured, what Park et al. report, y label, x of the first value
    "attention_distance": ("attention_distance.png", "Mean attention distance per block (mean over heads and queries)",
                           "CL global in later blocks, MIM local", "distance (pixels)", 1),
    "attention_nmi": ("attention_nmi.png", "Attention NMI per block, query vs key position (low: all queries alike)",
                      "low NMI (collapse) for CL in later blocks", "NMI", 1),
    "fourier_dlogamp": ("fourier.png", "Fourier Δlog-amplitude at the highest frequency (nearer 0: more of it)",
                        "MIM keeps more high frequency than CL", "Δ log amplitude", 0),
}


def draw_curve(path, series, title, paper, ylabel, first_x, xlabel="block"):
    """One line per model: x = block, y = the measurement; the title says what was measured, then `paper`'s claim."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for name, ys in series.items():
        ax.plot(range(first_x, first_x + len(ys)), ys, marker="o", label=name)
    ax.set_title(f"{title}\n{paper}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(first_x, first_x + max(len(ys) for ys in series.values())))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def draw_attention_maps(path, img, maps, queries, patch_size, block):
    """Rows = models, columns = the image and one map per query; each query patch is framed in its colour."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    colours = ["red", "cyan", "yellow", "lime", "magenta", "orange", "white", "blue"]
    pixels = (img.cpu() * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None])
    pixels = pixels.clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3) for imshow
    fig = Figure(figsize=(2.2 * (1 + len(queries)), 2.3 * len(maps) + 0.6), dpi=120)
    axes = fig.subplots(len(maps), 1 + len(queries), squeeze=False)
    for row, (name, m) in zip(axes, maps.items()):
        row[0].imshow(pixels)
        row[0].set_ylabel(name, fontsize=11)
        for q, (r, c) in enumerate(queries):
            colour = colours[q % len(colours)]
            row[0].add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                       fill=False, edgecolor=colour, linewidth=1.5))
            # one colour scale per model, from 0: a flat map must look flat, not stretched to full contrast
            row[1 + q].imshow(np.asarray(m[q]), cmap="inferno", vmin=0, vmax=float(np.max(m)))
            row[1 + q].add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=1.5))
            if row is axes[0]:
                row[1 + q].set_title(f"query ({r}, {c})", fontsize=9, color="black")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=9)
    fig.suptitle(f"Attention of each query patch in block {block} of one image, mean over heads\n"
                 "Park et al. report: CL maps alike for every query (collapse), MIM maps local around it", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def draw_cka(path, pairs):
    """One heat map per pair of models: blocks of A (rows) vs blocks of B (columns), CKA from 0 to 1."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * len(pairs) + 0.8, 4.0), dpi=120)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        m = np.asarray(pair["matrix"])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", origin="lower",
                       extent=(0.5, m.shape[1] + 0.5, 0.5, m.shape[0] + 0.5))
        ax.set_xlabel(f"{pair['b']}: block")
        ax.set_ylabel(f"{pair['a']}: block")
        ax.set_title(f"{pair['a']} vs {pair['b']}", fontsize=10)
        ax.set_xticks(range(1, m.shape[1] + 1))
        ax.set_yticks(range(1, m.shape[0] + 1))
    fig.colorbar(im, ax=list(axes), label="linear CKA (1 = same up to rotation and scale)")
    fig.savefig(path)


def draw_pictures(out, report, img, patch_size):
    """Every PNG into `out`; returns their names."""
    results, written = report["results"], []
    for key, (fname, title, paper, ylabel, first_x) in CURVES.items():
        n = len(report["images"]["fourier" if key == "fourier_dlogamp" else "analysis"])
        xlabel = "block (0 = patch embedding)" if first_x == 0 else "block"
        draw_curve(os.path.join(out, fname), {name: r[key] for name, r in results.items()}, f"{title}, {n} images",
                   f"Park et al. report: {paper}", ylabel, first_x, xlabel)
        written.append(fname)
    a = report["attention_maps"]
    maps = {name: r["attention_maps"] for name, r in results.items()}
    draw_attention_maps(os.path.join(out, "attention_maps.png"), img, maps, a["queries"], patch_size, a["block"])
    p = report["probes"]
    draw_curve(os.path.join(out, "probes_knn.png"), p["top1"], f"k-NN top-1 of each block ({p['n_train']} train, "
               f"{p['n_val']} val images)", "Park et al. report (Fig. 10): MoCo rises to the last block, SimMIM "
               "peaks near block 8", "top-1 (%)", 1)
    draw_cka(os.path.join(out, "cka.png"), report["cka"]["pairs"])
    written += ["attention_maps.png", "probes_knn.png", "cka.png"]
    if report["conflict"]:
        draw_conflict(os.path.join(out, "conflict.png"), report["conflict"])
        written.append("conflict.png")
    return written

# ------------------------------------------------------------------------------------------ gradient conflict

def encoder_groups(encoder):
    """The shared encoder's trainable parameters per layer: "embed" (patch projection, tokens), blocks 1..N, "norm"."""
    embed = ("patch_embed", "cls_token", "pos_embed")
    groups = {"embed": [p for n, p in encoder.named_parameters() if n.startswith(embed)]}
    groups.update({str(i): list(b.parameters()) for i, b in enumerate(encoder.blocks, 1)})
    groups["norm"] = list(encoder.norm.parameters())
    return {k: [p for p in ps if p.requires_grad] for k, ps in groups.items()}


def grad_cosines(loss_a, loss_b, groups):
    """Per group of parameters, the cosine between the gradients of two losses (each group's gradients flattened
    into one vector): 1 = they pull the same way, -1 = opposite ways, 0 = unrelated."""
    params = [p for ps in groups.values() for p in ps]
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in (loss_a, loss_b)]
    out, i = {}, 0
    for name, ps in groups.items():
        a, b = (torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                           for g, p in zip(gs[i:i + len(ps)], ps)]) for gs in grads)
        out[name] = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
        i += len(ps)
    return out


def load_hybrid(args, name, path):
    """--conflict NAME=PATH: hybrid.py's checkpoint.pt (it keeps both heads), or `random`: a hybrid.py model at init
    of --model's size. Returns (model, its args)."""
    import hybrid
    if path == "random":
        hargs = hybrid.get_args(["--data", args.data, "--model", args.model, "--img-size", str(args.img_size),
                                 *(["--patch-size", str(args.patch_size)] if args.patch_size else [])])
        return hybrid.build_model(hargs, verbose=False), hargs
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["method"] == "hybrid" and "optimizer" in ckpt
    except Exception:
        fail(f"--conflict {name}={path}: not a hybrid.py checkpoint.pt (the MIM and CL heads are needed); pass "
             f"OUTPUT_DIR/checkpoint.pt of a hybrid.py run, or random")
    hargs = argparse.Namespace(**{**ckpt["args"], "init": None, "data": args.data})  # the data may have moved
    model = hybrid.build_model(hargs, verbose=False)
    model.load_state_dict(ckpt["model"])
    if not finite_weights(model):
        fail(f"--conflict {name}={path}: its weights hold NaN or inf (a diverged run?); pass another checkpoint")
    return model, hargs


def gradient_conflict(model, hargs, device, batches, batch_size, seed=0):
    """The MIM and CL losses of a hybrid model on `batches` batches of its own training views (ROOT/train, a seeded
    draw), and per batch and layer the cosine of their gradients w.r.t. the shared encoder. Our choices, since Layer
    Grafted does not publish its own: per batch (not per sample), BatchNorm in train mode as in training, momentum 1
    (the momentum encoder stays as it is), one process."""
    import hybrid
    dataset = hybrid.build_dataset(hargs, hybrid.ThreeViews(hargs))
    views = hybrid.Seeded(dataset)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[:batches * batch_size].tolist()
    seeds = torch.randint(2**62, (len(order),), generator=g).tolist()
    model.to(device).train()
    torch.manual_seed(seed)  # the masks
    groups, per_batch = encoder_groups(model.encoder), []
    for b in tqdm(range(0, len(order), batch_size), "gradient conflict", leave=False):
        items = [views[(i, s)][0] for i, s in zip(order[b:b + batch_size], seeds[b:b + batch_size])]
        x_mim, x1, x2 = (torch.stack([views_of_one[v] for views_of_one in items]).to(device) for v in range(3))
        _, loss_mim, loss_cl = model(x_mim, x1, x2, 1.0)
        per_batch.append(list(grad_cosines(loss_mim, loss_cl, groups).values()))
    model.cpu()
    return {"layers": list(groups), "cosine_per_batch": per_batch, "lam": hargs.lam, "batches": len(per_batch),
            "batch_size": batch_size}


def draw_conflict(path, conflict):
    """Per layer, the distribution over batches of cos(grad L_MIM, grad L_CL): one box per model and layer."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 4.2), dpi=120)
    ax = fig.subplots()
    names = list(conflict)
    layers = conflict[names[0]]["layers"]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        data = np.asarray(conflict[name]["cosine_per_batch"])  # (batches, layers)
        pos = np.arange(len(layers)) + (k - (len(names) - 1) / 2) * width
        box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{k}")
        ax.plot([], [], color=f"C{k}", linewidth=6, label=f"{name} (lam {conflict[name]['lam']})")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer of the shared encoder (embed, blocks, final norm)")
    ax.set_ylabel("cos(grad MIM, grad CL)")
    runs = ", ".join(sorted({f"{c['batches']} x {c['batch_size']} images" for c in conflict.values()}))
    ax.set_title(f"cos(grad MIM, grad CL) of the joint loss per layer, one value per batch ({runs})\n"
                 "Layer Grafted reports: more conflict (lower cosine) as the layers go deeper", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------------------------------------- main

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except None: the help itself says what happens then."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="ImageNet-layout root: the images from val/ (else train/), the "
                   "probes from train/ (bank) and val/ (scored)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="repeatable, one per encoder: NAME labels it in the tables and pictures, PATH is any file "
                   "vit.load_pretrained reads (ours, official MAE / MoCo v3, timm) or 'random' (the seed-0 init)")
    p.add_argument("--model", default="vit_base", choices=list(vit.MODELS), help="encoder size, the same for all")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (Resize(img_size/0.875) + CenterCrop)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's, 16 or 14)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: the model's); official "
                   "MoCo v3 ViT-S needs 12, and the weights cannot tell")
    p.add_argument("--num-images", type=int, default=60, help="images for attention distance, NMI and the maps, "
                   "spread evenly over the folder (paper notebook: 60 Imagenette val images, 6 per class)")
    p.add_argument("--fourier-images", type=int, default=16, help="how many of those for the Fourier analysis, "
                   "spread evenly (paper notebook: 16)")
    p.add_argument("--attn-block", type=int, default=None, help="block of the attention maps, 1 = the first "
                   "(default: the last; the paper's Fig. 2 notebook shows block 11 of 12)")
    p.add_argument("--queries", nargs="+", default=None, metavar="ROW,COL", help="query patches of the attention "
                   "maps, 0-based positions on the patch grid (default: 4 spread over the grid, at 1/4 and 3/4)")
    p.add_argument("--attn-image", type=int, default=0, help="which of the --num-images images the maps show")
    p.add_argument("--probe-train", type=int, default=2000, help="train/ images in the k-NN bank (a seeded subset)")
    p.add_argument("--probe-val", type=int, default=1000, help="val/ images the probes score and CKA compares "
                   "(a seeded subset)")
    p.add_argument("--probe-feature", default="mean", choices=["mean", "cls"], help="per-block feature after the "
                   "final norm: the mean of the patch tokens, or the CLS token")
    p.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours (DINO, eval_fewshot.py: 20; t = 0.07)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe subsets")
    p.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch for the probes")
    p.add_argument("--conflict", action="append", default=[], metavar="NAME=PATH", help="repeatable: a hybrid.py "
                   "checkpoint.pt (or NAME=random); per layer, the cosine between the gradients of its MIM and CL "
                   "losses")
    p.add_argument("--conflict-batches", type=int, default=16, help="batches of hybrid.py's training views, one "
                   "cosine each")
    p.add_argument("--conflict-batch-size", type=int, default=32, help="images per batch of the gradient conflict")
    p.add_argument("--out", default=None, help="folder for analysis.json (every number, versions, device, args) and "
                   "one PNG per analysis; without it only the tables are printed")
    return p


def parse_checkpoints(specs, flag="--checkpoint"):
    """['NAME=PATH', ...] -> {name: path}, in order, with one-line errors for bad syntax and duplicate names."""
    checkpoints = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name.strip() or not path.strip():
            fail(f"{flag} {spec}: expected NAME=PATH, e.g. mae=runs/mae/encoder.pt or rand=random")
        if name in checkpoints:
            fail(f"{flag} {spec}: the name '{name}' is used twice; give each encoder its own NAME")
        checkpoints[name] = path
    return checkpoints


def parse_queries(queries, grid):
    """['ROW,COL', ...] (default 4 spread over the grid) -> [(row, col)], each inside the grid."""
    if queries is None:
        lo, hi = grid // 4, (3 * grid) // 4
        return [(lo, lo), (lo, hi), (hi, lo), (hi, hi)]
    parsed = []
    for q in queries:
        try:
            r, c = (int(v) for v in q.split(","))
        except ValueError:
            fail(f"--queries {q}: expected ROW,COL, e.g. --queries 3,3 3,10")
        if not (0 <= r < grid and 0 <= c < grid):
            fail(f"--queries {q} is outside the {grid}x{grid} patch grid; rows and columns go from 0 to {grid - 1}")
        parsed.append((r, c))
    return parsed


def check_numbers(args):
    for flag in ("num_images", "fourier_images", "probe_train", "probe_val", "knn_k", "batch_size", "img_size",
                 "conflict_batches", "conflict_batch_size"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    for flag in ("patch_size", "num_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.attn_image < args.num_images:
        fail(f"--attn-image {args.attn_image}: must be one of the --num-images images, 0 to {args.num_images - 1}")
    if not 0 <= args.seed < 2**63:
        fail(f"--seed {args.seed}: must be >= 0 and < 2**63")


def check_out(out):
    """--out before any work, not after it: the folder is made and a test file written (and removed), so a folder
    under a file, a read-only one or a full disk stops the run in one line."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as f:
            f.write(bytes(65536))
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e.strerror or e}); pass another folder")


def non_finite(obj, where):
    """Where the first NaN or inf is in nested dicts and lists of numbers (e.g. 'results.mae.attention_nmi[3]'),
    else None: no table or picture shows a number that is not one."""
    if isinstance(obj, dict):
        return next((w for k, v in obj.items() if (w := non_finite(v, f"{where}.{k}"))), None)
    if isinstance(obj, (list, tuple)):
        return next((w for i, v in enumerate(obj) if (w := non_finite(v, f"{where}[{i}]"))), None)
    return where if isinstance(obj, float) and not math.isfinite(obj) else None


def finite_weights(model):
    return all(v.isfinite().all() for v in model.state_dict().values() if v.is_floating_point())


def build_encoder(args, name, path):
    kw = {k: getattr(args, k) for k in ("patch_size", "num_heads") if getattr(args, k)}
    torch.manual_seed(0)  # 'random': the same random encoder every time, and the same as eval_fewshot.py's
    try:
        model = vit.MODELS[args.model](img_size=args.img_size, **kw)
    except AssertionError as e:  # vit.py checks the divisibility of the sizes
        fail(f"--model {args.model} --img-size {args.img_size}: {e}")
    if path != "random":
        try:
            vit.load_pretrained(model, path, verbose=False)
        except ValueError as e:
            fail(f"--checkpoint {name}={path}: {e}")
    if not finite_weights(model):
        fail(f"--checkpoint {name}={path}: its weights hold NaN or inf (a diverged run?); pass another checkpoint")
    return model


def print_tables(report):
    results = report["results"]
    width = max(12, *(len(n) for n in results))
    rows = [(k, k) for k in CURVES] + [("probe k-NN top-1 %", None)]
    for title, key in rows:
        print(f"\n{title}" + (" (embedding, then blocks)" if key == "fourier_dlogamp" else " (per block)"))
        for name in results:
            values = results[name][key] if key else report["probes"]["top1"][name]
            print(f"  {name:>{width}}: " + " ".join(f"{v:7.3f}" for v in values))
    for pair in report["cka"]["pairs"]:
        print(f"\nlinear CKA, rows: {pair['a']} blocks, columns: {pair['b']} blocks")
        for i, row in enumerate(pair["matrix"], 1):
            print(f"  {i:>3}: " + " ".join(f"{v:5.2f}" for v in row))


def main(argv=None):
    try:
        return run(argv)
    except StopRun as e:  # an unreadable image (pil_loader), also from inside a DataLoader worker
        fail(one_line(e))
    except KeyboardInterrupt:
        fail("stopped by Ctrl-C before the analysis was complete: no analysis.json; the same command starts again")


def run(argv=None):
    args = get_parser().parse_args(argv)
    check_numbers(args)
    checkpoints = parse_checkpoints(args.checkpoint)
    if args.out:
        check_out(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # every input error before any long work: the models, the images, the query patches
    models = {name: build_encoder(args, name, path) for name, path in checkpoints.items()}
    first = next(iter(models.values()))
    grid, depth = first.patch_embed.grid_size, len(first.blocks)
    hybrids = {name: load_hybrid(args, name, path)
               for name, path in parse_checkpoints(args.conflict, "--conflict").items()}
    queries = parse_queries(args.queries, grid)
    block = depth if args.attn_block is None else args.attn_block
    if not 1 <= block <= depth:
        fail(f"--attn-block {block}: {args.model} has blocks 1 to {depth}")
    imgs, paths = fixed_batch(args.data, args.img_size, args.num_images)
    train_set, val_set, train_paths, val_paths = probe_sets(args.data, args.img_size, args.probe_train,
                                                            args.probe_val, args.seed)
    print(f"analyze: {len(models)} encoder(s), {args.model} on {device}; {len(imgs)} images (Fourier "
          f"{min(args.fourier_images, len(imgs))}), probes {len(train_set)} train / {len(val_set)} val")

    # per model: the attention and Fourier measurements, the maps, the per-block features and their k-NN probes
    results, top1, val_feats = {}, {}, {}
    for name, model in models.items():
        model.to(device)
        results[name] = analyze(model, imgs.to(device), args.fourier_images)
        results[name]["attention_maps"] = attention_maps_of(model, imgs[args.attn_image].to(device), block,
                                                            queries).tolist()
        train_x, train_y = block_features(model, train_set, device, args.batch_size, args.probe_feature,
                                          f"{name} train")
        val_x, val_y = block_features(model, val_set, device, args.batch_size, args.probe_feature, f"{name} val")
        if not all(x.isfinite().all() for x in train_x + val_x):  # a k-NN of NaN features scores a chance-like number
            fail(f"--checkpoint {name}={checkpoints[name]}: its block features hold NaN or inf (the encoder "
                 f"overflows); nothing of it is reported: pass another checkpoint")
        top1[name] = [100 * knn_accuracy(tx, train_y, vx, val_y, args.knn_k) for tx, vx in zip(train_x, val_x)]
        val_feats[name] = val_x
        model.cpu()

    # CKA on the same val features: every pair of models, or a lone model against itself
    names = list(models)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] or [(names[0], names[0])]
    cka = {"features": f"{args.probe_feature} of each block's output after the final norm, {len(val_set)} val images",
           "pairs": [{"a": a, "b": b, "matrix": cka_matrix(val_feats[a], val_feats[b])} for a, b in pairs]}

    conflict = {}
    for name, (model, hargs) in hybrids.items():
        conflict[name] = gradient_conflict(model, hargs, device, args.conflict_batches, args.conflict_batch_size)

    report = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "numpy": np.__version__},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "args": vars(args), "command": sys.argv if argv is None else ["analyze.py", *map(str, argv)],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoints": checkpoints,
        "images": {"analysis": paths, "fourier": [paths[i] for i in spread(len(paths), args.fourier_images)],
                   "probe_train": train_paths, "probe_val": val_paths},
        "attention_maps": {"block": block, "queries": [list(q) for q in queries], "image": paths[args.attn_image],
                           "grid": grid, "heads": "mean"},
        "results": results,
        "probes": {"protocol": f"weighted k-NN (eval_fewshot.knn_accuracy), k={args.knn_k}, t=0.07",
                   "feature": args.probe_feature, "n_train": len(train_set), "n_val": len(val_set), "top1": top1},
        "cka": cka,
        "conflict": conflict,
    }
    bad = non_finite({k: report[k] for k in ("results", "probes", "cka", "conflict")}, "analysis")
    if bad:  # e.g. CKA of a block whose features do not vary over the images (0 / 0)
        fail(f"{bad} is NaN or inf, so no table or picture is made; check that encoder (constant or overflowing "
             f"features?)")
    print_tables(report)
    if args.out:
        try:
            write_out(args.out, report, imgs[args.attn_image], first.patch_size)
        except OSError as e:  # a disk that filled up during the run: --out was writable at the start
            fail(f"--out {args.out}: writing the results failed ({e.strerror or e}); the tables above hold the numbers")
    return report


def write_out(out, report, img, patch_size):
    """analysis.json and the pictures (when matplotlib is installed) into `out`."""
    try:
        import matplotlib  # only the pictures need it: without it the numbers are still written
    except ImportError:
        matplotlib = None
    report["versions"]["matplotlib"], pictures = None, None
    if matplotlib is not None:
        report["versions"]["matplotlib"] = matplotlib.__version__
        pictures = draw_pictures(out, report, img, patch_size)
    report["pictures"] = pictures
    path = os.path.join(out, "analysis.json")
    with open(path + ".tmp", "w") as f:  # then renamed: a full disk leaves no analysis.json cut short
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    if pictures is None:
        print(f"\nwrote {out}/analysis.json; no pictures: matplotlib is not installed (pip install matplotlib)")
    else:
        print(f"\nwrote {out}/analysis.json and " + ", ".join(pictures))


if __name__ == "__main__":
    main()
