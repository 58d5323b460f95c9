"""CL vs MIM analysis tools from "What Do Self-Supervised Vision Transformers Learn?" (Park et al., ICLR 2023).

Three per-block measurements on a fixed batch of images, for any encoder that vit.load_pretrained reads:
  - mean attention distance (pixels): how far each query looks. CL (MoCo v3) attends globally in later layers,
    MIM (MAE, SimMIM) stays local.
  - attention NMI: normalized mutual information between query and key positions. Low NMI = "attention collapse":
    every query attends to the same keys (CL in later layers).
  - Fourier Δlog-amplitude: high-frequency content of the token feature maps relative to the zero frequency.
    MIM keeps more high frequency (values closer to 0) than CL.
Facts from the official notebooks (naver-ai/cl-vs-mim @ eafe516): CLS row and column dropped and rows renormalized;
distance in pixels (patch size x grid distance); p(q) uniform; the Fourier value is the last point of the diagonal
from the centre of the shifted spectrum, minus the centre value, for the embedding and every block output.

Run (the paper used 64 Imagenette val images, 1/64 of each class):
    python analyze.py --data /imagenette --model vit_base --checkpoint mae=runs/mae/encoder.pt \\
        --checkpoint moco=runs/moco/encoder.pt --json analysis.json
"""
import argparse
import json
import math
import os
import sys

import torch
import torchvision.transforms as T

import vit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


@torch.no_grad()
def analyze(model, imgs):
    """Per-block measurements of one encoder on one batch: a dict of lists (one value per block, mean over heads)."""
    model.eval()
    _, attns, outs = model.forward_features(imgs, return_intermediates=True)
    embedding = torch.cat([model.cls_token.expand(imgs.shape[0], -1, -1), model.patch_embed(imgs)], 1) + model.pos_embed
    return {"attention_distance": [attention_distance(a, model.patch_size).mean().item() for a in attns],
            "attention_nmi": [attention_nmi(a).mean().item() for a in attns],
            "fourier_dlogamp": [fourier_delta_log_amplitude(z) for z in [embedding] + outs]}  # embedding, then blocks


def fixed_batch(root, img_size, num_images):
    """num_images from ROOT/val (else ROOT/train), spread evenly over the folder: the same images every run."""
    import torchvision.datasets as datasets
    folder = next((os.path.join(root, s) for s in ("val", "train") if os.path.isdir(os.path.join(root, s))), None)
    if folder is None:
        sys.exit(f"error: --data {root}: no val/ or train/ folder; expected ROOT/val/<class>/<image>")
    tf = T.Compose([T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(folder, transform=tf)
    idx = torch.linspace(0, len(ds) - 1, min(num_images, len(ds))).long().tolist()
    return torch.stack([ds[i][0] for i in idx])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="ImageNet-layout root; images are read from val/ (else train/)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="NAME=PATH (repeatable): any file vit.load_pretrained reads, or NAME=random")
    p.add_argument("--model", default="vit_base", choices=list(vit.MODELS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None, help="override, e.g. 12 for MoCo v3's ViT-S")
    p.add_argument("--num-images", type=int, default=64, help="paper: 64")
    p.add_argument("--json", default=None, help="write all numbers here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    imgs = fixed_batch(args.data, args.img_size, args.num_images).to(device)
    kw = {k: v for k, v in (("patch_size", args.patch_size), ("num_heads", args.num_heads)) if v}
    results = {}
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        path = path or name
        torch.manual_seed(0)
        model = vit.MODELS[args.model](img_size=args.img_size, **kw)
        if path != "random":
            try:
                vit.load_pretrained(model, path, verbose=False)
            except ValueError as e:
                sys.exit(f"error: --checkpoint {path}: {e}")
        results[name] = analyze(model.to(device), imgs)
    print(f"{len(imgs)} images from {args.data}, {args.model}; per block (attention) / embedding + blocks (fourier)")
    for metric in ("attention_distance", "attention_nmi", "fourier_dlogamp"):
        print(f"\n{metric}")
        for name, r in results.items():
            print(f"  {name:>12}: " + " ".join(f"{v:7.3f}" for v in r[metric]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
