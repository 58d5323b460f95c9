"""micl.py: the loss against a slow formula from the paper, the view masks, the DDP gradient with and without
--gather, a real-image run with resume, and the non-finite-loss stop. CPU, tiny ViTs."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import micl
import vit
from helpers import free_port, run_ddp


TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}  # 64 patches


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return vit.VisionTransformer(**TINY)


def tiny_micl(seed=0, **kw):
    torch.manual_seed(seed)
    return micl.MiCL(**kw, **TINY)


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 64, generator=g)  # images, mask noise


def slow_loss(a, b, kappa, tau):
    """MiCL's loss, one image at a time, in float64: for each image i and each direction, the softmax over all
    images j of phi(cos(u_i, v_j)) / tau, minus the log of its entry j = i; the mean over i, then over directions."""
    a, b = a.double(), b.double()
    def direction(u, v):  # Python floats throughout: the result is a float, not a tensor
        total = 0.0
        for i in range(len(u)):
            cos = [float(u[i] @ v[j]) for j in range(len(v))]
            logits = [(1 + c) / 2 / (1 + kappa * (1 - c)) / tau for c in cos]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        return total / len(u)
    return 0.5 * (direction(a, b) + direction(b, a))


def test_loss_matches_slow_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=-1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(7, 16, generator=g), dim=-1)
    for kappa, tau in [(1 / 64, 0.07), (0.0, 0.2), (1.0, 0.5)]:
        assert micl.contrastive_loss(a, b, kappa, tau).item() == pytest.approx(slow_loss(a, b, kappa, tau), rel=1e-5)


def test_forward_is_two_views_through_the_encoder():
    """The model's loss = the slow loss on CLS features of each view encoded alone, image by image, by a plain
    vit.py encoder: the model is that encoder (its names, and its weights for the same seed)."""
    encoder = tiny_vit()
    model = tiny_micl(mask_ratio=0.9, kappa=1 / 64, tau=0.07)
    assert set(model.state_dict()) == set(encoder.state_dict())  # plain encoder names, no "encoder." prefix
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in model.state_dict().items())  # same init
    imgs, noise = batch(5)
    ids_a, ids_b = model.split_views(noise)
    with torch.no_grad():
        loss = model(imgs, noise)
        feats = [torch.cat([encoder.forward_features(imgs[i:i + 1], ids[i:i + 1])[:, 0] for i in range(5)])
                 for ids in (ids_a, ids_b)]
    a, b = (torch.nn.functional.normalize(f, dim=-1) for f in feats)
    assert loss.item() == pytest.approx(slow_loss(a, b, 1 / 64, 0.07), rel=1e-4)


@pytest.mark.parametrize("L,ratio,expected", [(64, 0.9, 6), (196, 0.9, 18), (196, 0.75, 48), (256, 0.9, 24),
                                              (16, 0.5, 8)])
def test_views_are_disjoint_halves_of_the_kept_patches(L, ratio, expected):
    model = micl.MiCL(mask_ratio=ratio, img_size=4 * int(math.sqrt(L)), patch_size=4, embed_dim=16, depth=1,
                      num_heads=2)
    noise = torch.rand(9, L, generator=torch.Generator().manual_seed(L))
    K = model.len_keep(L)
    assert K == int(L * (1 - ratio)) // 2 * 2 == expected and K % 2 == 0
    ids_a, ids_b = model.split_views(noise)
    assert ids_a.shape == ids_b.shape == (9, K // 2)
    kept = torch.argsort(noise, dim=1)[:, :K]  # the K lowest-noise patches
    for i in range(9):
        a, b = set(ids_a[i].tolist()), set(ids_b[i].tolist())
        assert len(a) == len(b) == K // 2 and not a & b
        assert a | b == set(kept[i].tolist())
    assert not torch.equal(ids_a.sort(1).values, ids_b.sort(1).values)


# ------------------------------------------------------------------------------------ DDP: gradient with 2 processes

def _ddp_grads(rank, world_size, out_dir, image_root, port2):
    dist.init_process_group("gloo")
    imgs, noise = batch(8)
    half = slice(4 * rank, 4 * rank + 4)  # this rank's local batch
    result = {}
    for gather in (True, False):
        model = DDP(tiny_micl(gather=gather))
        loss = model(imgs[half], noise[half])
        loss.backward()
        result[gather] = {"loss": loss.item(),
                          "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()
                                    if p.grad is not None}}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port2)  # a fresh port: re-using the first store's port can hang gloo's init
    # and main() itself under "torchrun" with --gather: 2 processes x 8 images, global negatives
    model = run_main(image_root, os.path.join(out_dir, "run"), "--gather", "--max-steps", "3", "--log-every", "1")
    torch.save(model.state_dict(), os.path.join(out_dir, f"run{rank}.pt"))


def single_process_grads(imgs, noise):
    model = tiny_micl()
    loss = model(imgs, noise)
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_ddp_gradients_with_and_without_gather(tmp_path, image_root):
    """2 gloo processes x 4 images against 1 process, with and without --gather; then main() under 2 processes."""
    run_ddp(_ddp_grads, str(tmp_path), image_root, free_port())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    imgs, noise = batch(8)
    global_loss, global_grads = single_process_grads(imgs, noise)
    halves = [single_process_grads(imgs[s], noise[s]) for s in (slice(0, 4), slice(4, 8))]
    every = {k for k, p in tiny_micl().named_parameters() if p.requires_grad}
    assert set(global_grads) == set(ranks[0][True]["grads"]) == set(ranks[0][False]["grads"]) == every

    # --gather: rank r's loss is the mean over its 4 images of the global-negatives loss, so the mean over ranks is
    # the global loss; the gathered gradients reach every rank, and DDP's average of the rank gradients is then the
    # gradient of that mean, i.e. exactly one process on the whole batch.
    assert (ranks[0][True]["loss"] + ranks[1][True]["loss"]) / 2 == pytest.approx(global_loss, rel=1e-5)
    for k, g in global_grads.items():
        torch.testing.assert_close(ranks[0][True]["grads"][k], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[1][True]["grads"][k], g, rtol=1e-4, atol=1e-6)

    # no --gather (the release): each rank is the loss of its own half alone; DDP averages the two halves.
    for r in range(2):
        assert ranks[r][False]["loss"] == pytest.approx(halves[r][0], rel=1e-5)
        assert ranks[r][False]["loss"] != pytest.approx(ranks[r][True]["loss"], rel=1e-3)  # fewer negatives
    for k in global_grads:
        torch.testing.assert_close(ranks[0][False]["grads"][k], (halves[0][1][k] + halves[1][1][k]) / 2,
                                   rtol=1e-4, atol=1e-6)

    # main() under 2 processes: 3 steps, the same weights on both ranks, a finite loss logged at every step
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3] and all(math.isfinite(e["loss"]) for e in log)
    run0, run1 = torch.load(tmp_path / "run0.pt"), torch.load(tmp_path / "run1.pt")
    assert all(torch.equal(run0[k], run1[k]) for k in run0)


# ------------------------------------------------------------------------------------ main(): real images, resume

def run_main(image_root, out, *extra):
    torch.set_num_threads(1)  # the tests share the CPU
    return micl.main(["--data", image_root, "--output-dir", str(out), "--model", "vit_mini", "--img-size", "32",
                      "--patch-size", "4", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1",
                      "--num-workers", "0", "--log-every", "5", "--blr", "1e-3", *extra])  # 64 patches: 3 per view


def test_main_runs_and_resumes_exactly(image_root, tmp_path):
    full = run_main(image_root, tmp_path / "full")  # 160 images / 16 = 10 steps per epoch
    for name in ("checkpoint.pt", "encoder.pt", "args.json", "log.jsonl"):
        assert (tmp_path / "full" / name).is_file()
    log = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert log[-1]["step"] == 20 and all(math.isfinite(e["loss"]) for e in log)
    assert json.load(open(tmp_path / "full" / "args.json"))["mask_ratio"] == 0.9
    enc = torch.load(tmp_path / "full" / "encoder.pt", weights_only=True)["model"]
    assert set(enc) == set(vit.MODELS["vit_mini"](img_size=32, patch_size=4).state_dict())
    vit.load_pretrained(vit.MODELS["vit_mini"](img_size=32, patch_size=4), str(tmp_path / "full" / "checkpoint.pt"))

    run_main(image_root, tmp_path / "cut", "--max-steps", "15")  # stopped (and saved) in the middle of epoch 2 ...
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 15
    resumed = run_main(image_root, tmp_path / "cut")  # ... continued from step 16
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(full.state_dict()["norm.weight"], torch.ones(64))  # it trained


def test_non_finite_loss_stops_the_run(image_root, tmp_path, monkeypatch):
    calls = []
    original = micl.contrastive_loss
    def poisoned(*a, **kw):  # the 3rd step's loss is NaN
        calls.append(1)
        return original(*a, **kw) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(micl, "contrastive_loss", poisoned)
    with pytest.raises(micl.StopRun, match=r"non-finite loss \(nan\) within steps 3-3"):
        run_main(image_root, tmp_path / "nan", "--log-every", "1")


def test_too_few_kept_patches_is_a_one_line_error(image_root, tmp_path):
    with pytest.raises(micl.StopRun, match="--mask-ratio 0.99 keeps 0 of 64 patches"):
        run_main(image_root, tmp_path, "--mask-ratio", "0.99")


def test_a_batch_without_negatives_is_a_one_line_error(image_root, tmp_path):
    with pytest.raises(micl.StopRun, match="--batch-size 1: on 1 process\\(es\\) leaves each image no negative"):
        run_main(image_root, tmp_path, "--batch-size", "1")
