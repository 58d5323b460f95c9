"""mae.py: equality with the official code, masking invariants, the loss against a slow formula, DDP gradients,
a real-image run that resumes exactly, and one-line errors for bad input."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mae
import vit
from helpers import run_ddp

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mae(norm_pix_loss=True, patch_size=8):
    return mae.MaskedAutoencoder(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                                 norm_pix_loss=norm_pix_loss, img_size=32, patch_size=patch_size, embed_dim=64,
                                 depth=2, num_heads=4)


def test_equals_official_code():
    """Official MAE weights (tiny, random) give the official loss, prediction and mask through mae.py. Both sides run
    in float64 (see fixtures/make_fixtures.py), so the tolerance is float64 rounding, not a torch release's kernels."""
    fx = torch.load(os.path.join(FIX, "mae_official.pt"), weights_only=True)
    for norm_pix, key in ((True, "loss"), (False, "loss_no_norm_pix")):
        model = tiny_mae(norm_pix).double()
        model.load_state_dict(fx["state_dict"], strict=True)  # official names, decoder included, as is
        loss, pred, mask = model(fx["imgs"], fx["mask_ratio"], noise=fx["noise"])
        # the loss itself is computed in float32 by design (mae.py casts for autocast): float32 rounding, 1e-6 relative
        assert abs(loss.item() / fx[key].item() - 1) < 1e-6, (loss.item(), fx[key].item())
        if norm_pix:
            assert (pred - fx["pred"]).abs().max().item() < 1e-10
            assert torch.equal(mask, fx["mask"])


def test_the_mae_is_its_encoder_plus_a_decoder():
    """Its encoder part is a plain vit.py encoder: the same names, the same features, no wrapper prefix."""
    model = tiny_mae()
    encoder = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    assert set(model.encoder_state_dict()) == set(encoder.state_dict())
    encoder.load_state_dict(model.encoder_state_dict(), strict=True)
    x, ids = torch.randn(2, 3, 32, 32), torch.rand(2, 16).argsort(1)[:, :4]
    assert torch.equal(model.forward_features(x, ids), encoder.forward_features(x, ids))
    assert set(model.state_dict()) - set(encoder.state_dict()) == {
        "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
        "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
        *[f"decoder_blocks.{i}.{k}" for i in range(2) for k in vit.Block(32, 4).state_dict()]}


def test_masking_invariants():
    model = tiny_mae(patch_size=4)  # L = 64
    noise = torch.rand(5, 64)
    ids_keep, ids_restore, mask = model.random_masking(noise, 0.75)
    assert ids_keep.shape == (5, 16)  # int(64 * 0.25)
    assert torch.equal(mask.sum(1), torch.full((5,), 48.0))
    ids_shuffle = noise.argsort(1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(64).expand(5, -1))  # inverse
    for b in range(5):
        assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
        assert set(ids_keep[b].tolist()) == set(noise[b].argsort()[:16].tolist())  # the lowest noise is kept


def slow_mae_loss(imgs, pred, mask, p, norm_pix):
    """MAE Sec. 3, written patch by patch: MSE between predicted and (normalized) pixels, averaged over the
    removed patches only. Patch pixels are ordered (row, col, channel), the official patchify order."""
    B, _, H, W = imgs.shape
    total, count = 0.0, 0
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                idx = i * (W // p) + j
                if mask[b, idx] == 0:
                    continue
                target = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    target = (target - target.mean()) / (target.var(unbiased=True) + 1e-6).sqrt()
                total += ((pred[b, idx] - target) ** 2).mean()
                count += 1
    return total / count


def test_loss_against_slow_formula():
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 32, 32)
    for norm_pix in (True, False):
        model = tiny_mae(norm_pix)
        loss, pred, mask = model(imgs, 0.75)
        assert torch.allclose(loss, slow_mae_loss(imgs, pred, mask, 8, norm_pix), atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def _ddp_grads(rank, world_size, out_dir, image_root):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    try:  # first main() under "torchrun" with a global batch that 2 processes cannot split; it leaves its group up
        mae.main(tiny_args(image_root, os.path.join(out_dir, "run"), "--batch-size", "15"))
        error = None
    except mae.StopRun as e:
        error = str(e)
    with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
        f.write(repr(error))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = tiny_mae()
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 16)  # the same on every rank (same seed)
    half = slice(rank * 4, rank * 4 + 4)
    ddp = DDP(model)
    loss, _, _ = ddp(imgs[half], 0.75, noise[half])
    loss.backward()
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
               os.path.join(out_dir, f"g{rank}.pt"))


def test_ddp_gradients_equal_single_process(tmp_path, image_root):
    """2 gloo processes x 4 images == 1 process x 8 images: every sample masks the same count, so the mean of the
    per-rank losses is the global loss, and DDP's gradient average is the global gradient. The same two processes
    first check that main() refuses a global batch they cannot split evenly."""
    run_ddp(_ddp_grads, str(tmp_path), image_root)
    for r in (0, 1):
        error = (tmp_path / f"error{r}.txt").read_text()
        assert "--batch-size 15 is global and must be divisible by the 2 processes; use e.g. 14" in error, error
    torch.manual_seed(0)
    model = tiny_mae()
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 16)
    model(imgs, 0.75, noise)[0].backward()
    g0, g1 = torch.load(tmp_path / "g0.pt"), torch.load(tmp_path / "g1.pt")
    assert set(g0) == {n for n, p in model.named_parameters() if p.requires_grad}  # every parameter gets a gradient
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(g0[n], p.grad, atol=1e-6, rtol=1e-4), n
            assert torch.equal(g0[n], g1[n]), n


def tiny_args(data, out, *extra):
    return ["--data", data, "--output-dir", str(out), "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
            "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0", "--blr", "1e-3", "--decoder-embed-dim", "32",
            "--decoder-depth", "1", "--decoder-num-heads", "2", "--num-workers", "0", "--log-every", "3", *extra]


def test_real_images_run_and_exact_resume(image_root, tmp_path):
    torch.set_num_threads(1)
    full = mae.main(tiny_args(image_root, tmp_path / "a"))  # 160 images / 16 = 10 steps per epoch
    for f in ("checkpoint.pt", "encoder.pt", "args.json", "log.jsonl", "recon_0002.png"):
        assert os.path.isfile(tmp_path / "a" / f), f
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["method"] == "mae" and set(ckpt) >= {"model", "optimizer", "scaler", "args"}
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    vit.load_pretrained(enc, str(tmp_path / "a" / "encoder.pt"), verbose=False)  # vit.py reads what mae.py writes
    # stopped in the middle of epoch 2 by --max-steps (which saves), then continued with the same command
    mae.main(tiny_args(image_root, tmp_path / "b", "--max-steps", "14"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 14
    resumed = mae.main(tiny_args(image_root, tmp_path / "b"))
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    first = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], vit.MODELS["vit_mini"](img_size=32, patch_size=8)
                           .state_dict()["blocks.0.attn.qkv.weight"])  # it trained


def test_nonfinite_loss_stops_and_keeps_checkpoint(image_root, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    mae.main(tiny_args(image_root, tmp_path, "--epochs", "1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    forward_loss = mae.MaskedAutoencoder.forward_loss
    calls = []
    def diverging(self, *a):  # the loss turns NaN at the 5th step of the resumed run
        calls.append(1)
        return forward_loss(self, *a) * (float("nan") if len(calls) >= 5 else 1.0)
    monkeypatch.setattr(mae.MaskedAutoencoder, "forward_loss", diverging)
    with pytest.raises(mae.StopRun, match=r"non-finite loss \(nan\) within steps 13-15"):  # log every 3 steps
        mae.main(tiny_args(image_root, tmp_path, "--epochs", "3"))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_another_recipe(image_root, tmp_path):
    mae.main(tiny_args(image_root, tmp_path, "--epochs", "1"))
    with pytest.raises(mae.StopRun, match="--decoder-depth 1, not 2"):  # same shapes would not catch it all
        mae.main(tiny_args(image_root, tmp_path, "--epochs", "2", "--decoder-depth", "2"))
    with pytest.raises(mae.StopRun, match="--blr 0.001, not 0.002"):
        mae.main(tiny_args(image_root, tmp_path, "--epochs", "2", "--blr", "2e-3"))
    assert mae.main(tiny_args(image_root, tmp_path, "--epochs", "2", "--num-workers", "1", "--log-every", "5"))


def test_bad_input_one_line_errors(image_root, tmp_path):
    with pytest.raises(mae.StopRun, match="no such folder"):
        mae.main(tiny_args(str(tmp_path / "nope"), tmp_path / "o"))
    os.makedirs(tmp_path / "flat")
    with pytest.raises(mae.StopRun, match="no 'train' folder"):
        mae.main(tiny_args(str(tmp_path / "flat"), tmp_path / "o"))
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(mae.StopRun, match="no class folders"):
        mae.main(tiny_args(str(tmp_path / "empty"), tmp_path / "o"))
    bad = tmp_path / "bad"
    shutil.copytree(image_root, bad)
    first_class = sorted(os.listdir(bad / "train"))[0]
    (bad / "train" / first_class / "0000_broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(mae.StopRun, match="cannot read image .*0000_broken.jpg"):
        mae.main(tiny_args(str(bad), tmp_path / "o2", "--max-steps", "20"))
    mae.main(tiny_args(image_root, tmp_path / "o3", "--epochs", "1"))  # writes checkpoint.pt of a patch-8 model
    with pytest.raises(mae.StopRun, match="patch-size"):  # a checkpoint of another model in --output-dir
        mae.main(tiny_args(image_root, tmp_path / "o3", "--epochs", "2") + ["--patch-size", "4"])


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "mae.py"), "--data", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --data"), r.stderr



def test_init_with_a_decoder_of_another_size_is_one_line(tmp_path, image_root):
    """--init with an MAE file whose decoder is wider than --decoder-embed-dim: one line naming the flags."""
    wide = vit.MODELS["vit_mini"](cls=mae.MaskedAutoencoder, img_size=32, patch_size=8, decoder_embed_dim=48,
                                  decoder_depth=1, decoder_num_heads=2)  # tiny_args: --decoder-embed-dim 32
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(mae.StopRun, match="its decoder does not fit .*--decoder-"):
        mae.main(tiny_args(image_root, tmp_path / "o", "--init", str(tmp_path / "wide.pth")))


def test_reconstruction_uses_only_what_the_encoder_sees(tmp_path):
    """Changing the pixels of the removed patches changes the original column only: the reconstruction is the
    prediction (from visible patches) un-normalized with visible-patch statistics, plus the visible patches."""
    torch.manual_seed(0)
    model = vit.MODELS["vit_mini"](cls=mae.MaskedAutoencoder, img_size=32, patch_size=8, decoder_embed_dim=32,
                                   decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 3, 32, 32)
    rows = mae.reconstruction_rows(model, imgs, 0.75)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    _, _, mask = mae.MaskedAutoencoder.random_masking(noise, 0.75)
    removed = model.unpatchify(mask[:, :, None].expand(-1, -1, 8 * 8 * 3)).bool()
    other = torch.where(removed, imgs * 5 + 3, imgs)  # the removed patches' pixels (and statistics) changed
    rows2 = mae.reconstruction_rows(model, other, 0.75)
    assert not torch.allclose(rows[:, 0], rows2[:, 0]) and torch.allclose(rows[:, 1:], rows2[:, 1:], atol=1e-5)
    mae.reconstruction_grid(model, imgs, str(tmp_path / "r.png"), 0.75)
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size == (3 * 33 * 3 + 3, 2 * 33 * 3 + 3 + 14)  # enlarged x3, labelled
