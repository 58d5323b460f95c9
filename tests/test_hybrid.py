"""hybrid.py: (1 - lam) MAE + lam MoCo v3 on one shared encoder. Its two parts equal mae.py's and moco.py's on the
same weights and images (so lam = 0 is MAE, lam = 1 is MoCo v3), the gradients combine as the weighted sum, and a
whole run on real images writes an encoder vit.py reads and a checkpoint with both heads. Resume, signals and bad
input: tests/test_faults.py, which runs every training script."""
import os

import pytest
import torch

import hybrid
import mae
import moco
import vit
from helpers import run_as_main

KW = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75, dim=16, mlp_dim=32, tau=0.2)


def encoder_fn():
    return vit.MODELS["vit_mini"](img_size=32, patch_size=8)


def build(lam, seed=0):
    torch.manual_seed(seed)
    return hybrid.Hybrid(encoder_fn, lam=lam, **KW).double()


def batch(seed=1, B=6):
    g = torch.Generator().manual_seed(seed)
    x_mim, x1, x2 = (torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(3))
    return x_mim, x1, x2, torch.rand(B, 16, generator=g, dtype=torch.float64)


def mae_with_the_same_weights(h):
    m = vit.MODELS["vit_mini"](cls=mae.MaskedAutoencoder, img_size=32, patch_size=8, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2).double()
    sd = h.state_dict()
    encoder = {k.removeprefix("moco.base_encoder."): v for k, v in sd.items()
               if k.startswith("moco.base_encoder.") and ".head." not in k}
    m.load_state_dict({**encoder, **{k: v for k, v in sd.items() if k.startswith(("decoder_", "mask_token"))}})
    return m


def moco_with_the_same_weights(h):
    m = moco.MoCo(encoder_fn, 16, 32, 0.2).double()
    m.load_state_dict({k.removeprefix("moco."): v for k, v in h.state_dict().items() if k.startswith("moco.")})
    return m


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
def test_both_parts_equal_mae_and_moco_on_the_same_weights(lam):
    h = build(lam)
    x_mim, x1, x2, noise = batch()
    ref_mae, ref_moco = mae_with_the_same_weights(h), moco_with_the_same_weights(h)  # before the momentum update
    loss, loss_mim, loss_cl = h(x_mim, x1, x2, 0.99, noise)
    assert torch.equal(loss_mim, ref_mae(x_mim, 0.75, noise)[0])
    assert torch.equal(loss_cl, ref_moco(x1, x2, 0.99))
    assert torch.equal(loss, (1 - lam) * loss_mim + lam * loss_cl)  # lam 0: MAE's loss, lam 1: MoCo v3's
    for (k, a), (_, b) in zip(h.moco.momentum_encoder.state_dict().items(),
                              ref_moco.momentum_encoder.state_dict().items()):
        assert torch.equal(a, b), k  # the same momentum update


def test_gradients_are_the_weighted_sum_and_mae_alone_at_lam_0():
    x_mim, x1, x2, noise = batch()
    grads = {}
    for lam in (0.0, 0.3, 1.0):
        h = build(lam)
        h(x_mim, x1, x2, 0.99, noise)[0].backward()
        grads[lam] = {n: p.grad.clone() for n, p in h.encoder.named_parameters() if p.grad is not None}
    for n, g in grads[0.3].items():  # the shared encoder: 0.7 x the MIM gradient + 0.3 x the CL gradient (whose
        assert torch.allclose(g, 0.7 * grads[0.0][n] + 0.3 * grads[1.0][n], rtol=1e-5, atol=1e-6), n  # logits are fp32)
    ref = mae_with_the_same_weights(build(0.0))
    ref(x_mim, 0.75, noise)[0].backward()
    for n, p in ref.named_parameters():
        if n in grads[0.0] and p.grad is not None:
            assert torch.allclose(grads[0.0][n], p.grad, atol=1e-12), n
    assert (grads[0.0]["blocks.0.attn.qkv.weight"].abs().sum() > 0
            and grads[1.0]["blocks.0.attn.qkv.weight"].abs().sum() > 0)


def test_run_on_real_images_writes_encoder_and_both_heads(image_root, tmp_path):
    torch.set_num_threads(1)
    argv = ["--data", image_root, "--output-dir", tmp_path, "--model", "vit_mini", "--img-size", "32", "--patch-size",
            "8", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--blr", "1e-3", "--num-workers", "0",
            "--log-every", "5", "--moco-dim", "16", "--moco-mlp-dim", "32", "--decoder-embed-dim", "32",
            "--decoder-depth", "1", "--decoder-num-heads", "2", "--lam", "0.5"]
    assert run_as_main("hybrid.py", argv) is None
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "hybrid" and ckpt["step"] == 5
    keys = set(ckpt["model"])
    assert {"decoder_pred.weight", "mask_token", "moco.predictor.0.weight",
            "moco.momentum_encoder.head.0.weight"} <= keys
    enc = encoder_fn()
    assert vit.load_pretrained(enc, str(tmp_path / "encoder.pt"), verbose=False) == []  # no projector in encoder.pt
    assert torch.equal(enc.blocks[2].mlp.fc2.weight, ckpt["model"]["moco.base_encoder.blocks.2.mlp.fc2.weight"])
    assert not torch.equal(enc.blocks[0].attn.qkv.weight, encoder_fn().blocks[0].attn.qkv.weight)  # it trained
    log = open(tmp_path / "log.jsonl").read()
    assert '"loss_mim"' in log and '"loss_cl"' in log
    # --init of a hybrid checkpoint.pt restores every weight; of an encoder file, the encoder into both MoCo encoders
    h = build(0.2).float()
    hybrid.load_init(h, str(tmp_path / "checkpoint.pt"), verbose=False)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in h.state_dict().items())
    h = build(0.2).float()
    hybrid.load_init(h, str(tmp_path / "encoder.pt"), verbose=False)
    for e in (h.moco.base_encoder, h.moco.momentum_encoder):
        assert torch.equal(e.blocks[1].attn.proj.weight, enc.blocks[1].attn.proj.weight)
