"""analyze.py: the three CL-vs-MIM measurements against slow formulas and known cases, and the CLI end to end."""
import json
import math

import numpy as np
import pytest
import torch

import analyze
import vit


def random_attention(B=2, H=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, 1 + L, 1 + L, generator=g).mul(3).softmax(-1)


def test_attention_distance_slow_formula():
    attn = random_attention()
    B, H, N, _ = attn.shape
    grid, p = 4, 16
    expected = torch.zeros(H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            a = attn[b, h, 1:, 1:].double()
            a = a / a.sum(-1, keepdim=True)
            for q in range(N - 1):
                for k in range(N - 1):
                    d = p * math.hypot(q // grid - k // grid, q % grid - k % grid)
                    expected[h] += a[q, k] * d / ((N - 1) * B)
    assert torch.allclose(analyze.attention_distance(attn, p).double(), expected, atol=1e-4)
    eye = torch.eye(17).expand(1, 2, 17, 17)  # each patch attends only to itself
    assert torch.allclose(analyze.attention_distance(eye, 16), torch.zeros(2), atol=1e-6)


def test_attention_nmi_slow_formula_and_limits():
    attn = random_attention(B=1, H=2)
    for h in range(2):
        a = attn[0, h, 1:, 1:].double()
        a = a / a.sum(-1, keepdim=True)
        L = a.shape[0]
        pk = a.mean(0)
        mi = sum(a[q, k] / L * math.log(a[q, k] / pk[k]) for q in range(L) for k in range(L))
        hk = -sum(pk[k] * math.log(pk[k]) for k in range(L))
        assert abs(analyze.attention_nmi(attn)[h].item() - mi / math.sqrt(math.log(L) * hk)) < 1e-4
    uniform = torch.full((1, 1, 17, 17), 1 / 17)  # every query attends the same way: collapse, NMI 0
    assert analyze.attention_nmi(uniform).item() < 1e-6
    eye = torch.eye(17).expand(1, 1, 17, 17)  # every query attends a different key: NMI 1
    assert abs(analyze.attention_nmi(eye).item() - 1) < 1e-4


def test_fourier_against_numpy_and_limits():
    torch.manual_seed(0)
    z = torch.randn(2, 1 + 64, 5)
    spec = np.log(np.abs(np.fft.fft2(z[:, 1:].numpy().astype(np.float64).transpose(0, 2, 1).reshape(2, 5, 8, 8))) + 1e-6)
    spec = np.fft.fftshift(spec, axes=(2, 3)).mean(axis=(0, 1))
    diag = np.diagonal(spec)[4:]
    assert abs(analyze.fourier_delta_log_amplitude(z) - (diag[-1] - diag[0])) < 1e-6
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.stack([torch.cos(2 * math.pi * (r + c) / 16) + 2] * 5, dim=-1).reshape(1, 64, 5)
    smooth = torch.cat([torch.zeros(1, 1, 5), smooth], 1)
    assert analyze.fourier_delta_log_amplitude(smooth) < analyze.fourier_delta_log_amplitude(z) - 3  # low-pass vs white


def test_cli_end_to_end(image_root, tmp_path):
    enc = vit.vit_tiny(img_size=32, patch_size=8)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    out = tmp_path / "a.json"
    res = analyze.main(["--data", image_root, "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8",
                        "--num-images", "12", "--checkpoint", f"ours={tmp_path / 'encoder.pt'}",
                        "--checkpoint", "rand=random", "--json", str(out)])
    saved = json.load(open(out))["results"]
    assert saved == json.loads(json.dumps(res)) and set(saved) == {"ours", "rand"}
    # the CLI's numbers are the measurements of each encoder on 12 val images spread evenly over the folder
    torch.manual_seed(0)
    rand = vit.vit_tiny(img_size=32, patch_size=8)  # --checkpoint random is the seed-0 init
    imgs = analyze.fixed_batch(image_root, 32, 12)
    assert len(imgs) == 12 and not torch.equal(imgs[0], imgs[-1])
    for name, model in (("ours", enc), ("rand", rand)):
        direct = analyze.analyze(model, imgs)
        assert len(direct["attention_distance"]) == 12 and len(direct["fourier_dlogamp"]) == 13
        for metric, values in direct.items():
            assert res[name][metric] == pytest.approx(values, abs=1e-6), (name, metric)
    assert res["ours"]["attention_distance"] != pytest.approx(res["rand"]["attention_distance"], abs=1e-3)
