"""graft.py: the parameter groups of the graft (ViT-B / ViT-L, on the meta device), stage-1 weights in both encoders,
the lower group moving less (or not at all with --freeze-lower), the L1 pull against a slow formula, MAE -> graft on
real images with an exact resume, DDP with the frozen part and the L1 term, and one-line errors for missing weights."""
import copy
import functools
import json
import math
import os
import urllib.error

import pytest
import torch

import graft
import mae
import vit
from helpers import run_ddp


def tiny_args(data, out, mim, *extra):
    return ["--data", data, "--output-dir", str(out), "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
            "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--blr", "1e-3", "--moco-dim", "16",
            "--moco-mlp-dim", "32", "--num-workers", "0", "--log-every", "3", "--mim-checkpoint", str(mim), *extra]


@pytest.fixture(scope="module")
def mim_file(tmp_path_factory):
    """A stand-in for stage 1: a vit_mini (3 blocks of 64, 32 px, patch 8) in the official MAE file layout ({'model':
    encoder + decoder}), every weight perturbed so that none equals a fresh init (pos_embed included)."""
    torch.manual_seed(123)
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mim") / "mae_tiny.pth"
    torch.save({"model": {**enc.state_dict(), "mask_token": torch.zeros(1, 1, 8),
                          "decoder_pred.weight": torch.zeros(4, 8)}},
               path)
    return path, {k: v.clone() for k, v in enc.state_dict().items()}


def lower_name(name, graft_depth):
    """The graft written out by hand: the base encoder's cls_token, patch_embed, pos_embed and blocks < graft_depth."""
    n = name.removeprefix("base_encoder.")
    return name.startswith("base_encoder.") and (n.startswith(("cls_token", "pos_embed", "patch_embed"))
                                                 or n.startswith("blocks.") and int(n.split(".")[1]) < graft_depth)


@pytest.mark.parametrize("arch, depth, graft_depth", [("vit_base", 12, 8), ("vit_large", 24, 16)])
def test_param_groups_vit_b_and_l(arch, depth, graft_depth):
    with torch.device("meta"):  # the real sizes without allocating them
        model = graft.GraftedMoCo(vit.MODELS[arch])
        frozen = graft.GraftedMoCo(vit.MODELS[arch], freeze_lower=True)
    assert model.depth == depth and model.graft_depth == graft_depth
    groups = graft.param_groups(model, 0.1, 0.1)
    assert [g["name"] for g in groups] == ["lower", "lower no-wd", "upper", "upper no-wd"]
    where = {n: g for g in groups for n in g["names"]}
    assert len(where) == sum(len(g["names"]) for g in groups)  # each tensor in one group at most
    for n, p in model.named_parameters():
        if n.startswith("momentum_encoder.") or n.startswith("base_encoder.p"):  # EMA; patch_embed.proj, pos_embed
            assert not p.requires_grad and n not in where, n
            continue
        g = where[n]
        assert g["lr_scale"] == (0.1 if lower_name(n, graft_depth) else 1.0), n
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.1), n
        assert all(q is not p for h in groups if h is not g for q in h["params"])
    assert where["base_encoder.cls_token"]["name"] == "lower"  # (1, 1, D): decayed, as officially
    assert where[f"base_encoder.blocks.{graft_depth - 1}.mlp.fc2.weight"]["name"] == "lower"
    assert where[f"base_encoder.blocks.{graft_depth}.attn.qkv.weight"]["name"] == "upper"
    for n in ("base_encoder.norm.weight", "base_encoder.head.0.weight", "base_encoder.head.1.weight",
              "predictor.0.weight", "predictor.3.weight"):
        assert where[n]["name"].startswith("upper") and where[n]["lr_scale"] == 1.0, n
    assert graft.summarize(groups[0]["names"]) == f"blocks 0-{graft_depth - 1}, cls_token"
    assert graft.summarize(groups[2]["names"]) == f"blocks {graft_depth}-{depth - 1}, projector, predictor"
    assert graft.summarize(groups[3]["names"]) == f"blocks {graft_depth}-{depth - 1}, norm, projector, predictor"
    # --freeze-lower: the lower part is in no group, the upper groups are unchanged
    fgroups = graft.param_groups(frozen, 0.1, 0.1)
    assert [g["name"] for g in fgroups] == ["upper", "upper no-wd"]
    assert [g["names"] for g in fgroups] == [g["names"] for g in groups[2:]]
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if lower_name(n, graft_depth))


def relative_change(names, before, after):
    return (sum((after[n] - before[n]).norm() ** 2 for n in names) / sum(before[n].norm() ** 2 for n in names)) ** 0.5


def test_stage1_weights_in_both_encoders_then_lower_moves_less(image_root, mim_file, tmp_path):
    torch.set_num_threads(1)
    path, mim = mim_file
    init = graft.build_model(graft.get_args(tiny_args(image_root, tmp_path / "a", path)))  # the model main() trains
    for enc in (init.base_encoder, init.momentum_encoder):
        sd = enc.state_dict()
        for k, v in mim.items():  # every encoder weight, MAE's pos_embed included, in both encoders
            assert torch.equal(sd[k], v), k
    base_head, mom_head = init.base_encoder.head.state_dict(), init.momentum_encoder.head.state_dict()
    assert all(torch.equal(v, mom_head[k]) for k, v in base_head.items())  # the momentum projector: a copy
    w = init.base_encoder.head[0].weight  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= 64 ** -0.5 and math.isclose(w.std().item(), (3 * 64) ** -0.5, rel_tol=0.1)
    other_seed = graft.build_model(graft.get_args(tiny_args(image_root, tmp_path / "s", path, "--seed", "1")))
    assert not torch.equal(other_seed.predictor[0].weight, init.predictor[0].weight)  # random heads ...
    assert torch.equal(other_seed.base_encoder.blocks[1].mlp.fc1.weight, init.base_encoder.blocks[1].mlp.fc1.weight)

    before = {n: p.detach().clone() for n, p in init.named_parameters()}
    trained = graft.main(tiny_args(image_root, tmp_path / "b", path, "--max-steps", "3", "--warmup-epochs", "0"))
    after = {n: p.detach() for n, p in trained.named_parameters()}
    groups = {g["name"]: g["names"] for g in graft.param_groups(trained, 0.1, 0.1)}
    change = {name: relative_change(names, before, after) for name, names in groups.items()}
    assert all(c > 0 for c in change.values()), change  # every group trained
    assert change["lower"] < 0.3 * change["upper"] and change["lower no-wd"] < 0.3 * change["upper no-wd"], change
    frozen = [n for n, p in trained.base_encoder.named_parameters() if not p.requires_grad]
    assert frozen == ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for n in frozen:
        assert torch.equal(after["base_encoder." + n], before["base_encoder." + n]), n  # stays MIM's
    for n, p in trained.momentum_encoder.named_parameters():  # the momentum encoder moved too, except the frozen
        assert torch.equal(p, before["momentum_encoder." + n]) == (n in frozen), n


def test_freeze_lower(image_root, mim_file, tmp_path):
    torch.set_num_threads(1)
    path, mim = mim_file
    trained = graft.main(tiny_args(image_root, tmp_path, path, "--freeze-lower", "--max-steps", "3",
                                   "--warmup-epochs", "0", "--log-every", "1"))
    for enc in (trained.base_encoder, trained.momentum_encoder):
        sd = enc.state_dict()
        for k, v in mim.items():
            if trained.is_lower(k):  # embeddings and blocks 0-1 (graft depth 2 of 3), bit-identical in both encoders
                assert torch.equal(sd[k], v), k
        assert not torch.equal(sd["blocks.2.attn.qkv.weight"], mim["blocks.2.attn.qkv.weight"])  # the top trains
        assert not torch.equal(sd["norm.weight"], mim["norm.weight"])
    for mode in (True, False, True):  # the frozen part stays in eval mode whatever train() is asked
        trained.train(mode)
        assert trained.training == mode and trained.base_encoder.blocks[2].training == mode
        assert not any(m.training for m in trained.lower_modules())
        assert len(list(trained.lower_modules())) == 2 * (1 + 2)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [x["lr_lower"] for x in log] == [0.0] * 3 and all(x["lr_upper"] > 0 for x in log)


def slow_l1(model, mim, l1_depth):
    """sum over the base encoder's parameters with layer id <= l1_depth of sum_i |theta_i - theta_MIM_i|."""
    total = 0.0
    for n, p in model.base_encoder.named_parameters():
        if vit.layer_id(n, model.depth) <= l1_depth:
            total += sum(abs(a - b) for a, b in zip(p.detach().double().flatten().tolist(),
                                                    mim[n].double().flatten().tolist()))
    return total


def test_l1_term_against_slow_formula():
    torch.manual_seed(0)
    fn = functools.partial(vit.VisionTransformer, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    model = graft.GraftedMoCo(fn, dim=8, mlp_dim=16, graft_depth=3, l1_weight=0.5, l1_depth=2)
    mim = {k: v.clone() for k, v in model.base_encoder.state_dict().items()}
    model.set_l1_reference()  # right after the MIM weights are in: the L1 term is 0
    assert set(model.l1_ref) == {n for n, p in model.base_encoder.named_parameters()
                                 if p.requires_grad and vit.layer_id(n, 4) <= 2}  # cls_token, blocks 0-1
    no_l1 = copy.deepcopy(model)
    no_l1.l1_weight = 0.0
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    (loss, l1), (moco_loss, zero) = model(x1, x2, 0.99), no_l1(x1, x2, 0.99)
    assert l1 == 0 and zero == 0 and torch.equal(loss, moco_loss)
    with torch.no_grad():  # move every trained weight away from the MIM weights (frozen ones never move)
        for a, b in zip(model.base_encoder.parameters(), no_l1.base_encoder.parameters()):
            if a.requires_grad:
                noise = 0.01 * torch.randn_like(a)
                a.add_(noise), b.add_(noise)
    (loss, l1), (moco_loss, _) = model(x1, x2, 0.99), no_l1(x1, x2, 0.99)
    expected = slow_l1(model, mim, 2)
    assert math.isclose(l1.item(), expected, rel_tol=1e-5)
    assert math.isclose(loss.item(), moco_loss.item() + 0.5 * expected, rel_tol=1e-5)
    loss.backward(), moco_loss.backward()
    grads = dict(no_l1.base_encoder.named_parameters())
    for n, p in model.base_encoder.named_parameters():  # the L1 gradient: 0.5 * sign(theta - theta_MIM), ids <= 2
        if p.requires_grad:
            sign = (p.detach() - mim[n]).sign() if vit.layer_id(n, 4) <= 2 else torch.zeros_like(p)
            assert torch.allclose(p.grad - grads[n].grad, 0.5 * sign, atol=1e-6), n


def test_graft_is_moco_v3_underneath():
    """With the same weights, the same two views and the L1 term off, graft's loss, gradients and momentum update are
    moco.py's. Graft's update skips the frozen tensors (equal in both encoders), which moco.py's m t + (1 - m) t keeps
    equal only up to rounding; at m = 0.5 that is exact, so there everything must be bit-identical. And graft.py's MoCo
    is a checked copy of moco.py's."""
    import inspect
    import moco
    assert inspect.getsource(graft.MoCo) == inspect.getsource(moco.MoCo)
    fn = functools.partial(moco.moco_vit, vit.VisionTransformer, True, img_size=32, patch_size=8, embed_dim=64, depth=2,
                           num_heads=4)
    for m in (0.5, 0.99):
        torch.manual_seed(0)
        ref = moco.MoCo(fn, dim=16, mlp_dim=32, tau=0.2)
        with torch.no_grad():  # base and momentum weights differ, as after some training (frozen ones never move)
            for p in ref.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        torch.manual_seed(1)
        ours = graft.GraftedMoCo(fn, dim=16, mlp_dim=32, tau=0.2)
        ours.load_state_dict(ref.state_dict(), strict=True)
        assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
            [n for n, p in ref.named_parameters() if p.requires_grad]
        x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
        ref_loss = ref(x1, x2, m)
        loss, l1 = ours(x1, x2, m)
        assert l1 == 0 and abs(loss.item() / ref_loss.item() - 1) < 1e-6, (m, loss.item(), ref_loss.item())
        if m != 0.5:
            continue
        assert torch.equal(loss, ref_loss)
        ref_loss.backward()
        loss.backward()
        theirs = dict(ref.named_parameters())
        for n, p in ours.named_parameters():
            assert (p.grad is None and theirs[n].grad is None) or torch.equal(p.grad, theirs[n].grad), n
        for (n, a), b in zip(ref.momentum_encoder.state_dict().items(), ours.momentum_encoder.state_dict().values()):
            assert torch.equal(a, b), n  # momentum-updated weights and BN running statistics


def test_mae_then_graft_on_real_images_and_exact_resume(image_root, tmp_path):
    """Stage 1 by mae.py, stage 2 from its checkpoint.pt; with the L1 pull on, so a resumed run must also read its
    reference from the MIM file again (not from the checkpoint's trained weights) to end equal."""
    torch.set_num_threads(1)
    mae.main(["--data", image_root, "--output-dir", str(tmp_path / "mae"), "--model", "vit_mini", "--img-size", "32",
              "--patch-size", "8", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--blr", "1e-3",
              "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--num-workers", "0"])
    mim = tmp_path / "mae" / "checkpoint.pt"
    full = graft.main(tiny_args(image_root, tmp_path / "a", mim, "--l1-weight", "1e-3"))  # 10 steps per epoch
    for f in ("checkpoint.pt", "encoder.pt", "args.json", "log.jsonl"):
        assert os.path.isfile(tmp_path / "a" / f), f
    assert json.load(open(tmp_path / "a" / "args.json"))["graft_depth"] == 2  # the lower 2/3 of 3 blocks
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert log[-1]["step"] == 20 and all(math.isfinite(x["loss"]) and x["l1_dist"] > 0 for x in log)
    assert all(x["lr_upper"] > 0 and math.isclose(x["lr_lower"], 0.1 * x["lr_upper"]) for x in log)
    mae_enc = torch.load(tmp_path / "mae" / "encoder.pt", weights_only=True)["model"]
    assert torch.equal(full.base_encoder.patch_embed.proj.weight, mae_enc["patch_embed.proj.weight"])  # frozen MIM
    assert not torch.equal(full.base_encoder.blocks[0].attn.qkv.weight, mae_enc["blocks.0.attn.qkv.weight"])
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    assert vit.load_pretrained(enc, str(tmp_path / "a" / "encoder.pt"), verbose=False) == []  # no head in encoder.pt
    assert torch.equal(enc.blocks[2].mlp.fc2.weight, full.base_encoder.blocks[2].mlp.fc2.weight)
    # stopped in the middle of epoch 2 by --max-steps (which saves), then continued with the same command
    graft.main(tiny_args(image_root, tmp_path / "b", mim, "--l1-weight", "1e-3", "--max-steps", "15"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 15
    resumed = graft.main(tiny_args(image_root, tmp_path / "b", mim, "--l1-weight", "1e-3"))
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n  # weights, momentum weights and BN statistics


def _ddp_worker(rank, world_size, image_root, mim, out):
    model = graft.main(tiny_args(image_root, out, mim, "--freeze-lower", "--l1-weight", "1e-3", "--max-steps", "2"))
    torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_with_frozen_lower_part_and_l1(image_root, mim_file, tmp_path):
    """Under DDP without find_unused_parameters: the frozen part (set before wrapping) and the L1 term (inside the
    forward) train without a reduction error, and both ranks hold the same weights."""
    run_ddp(_ddp_worker, image_root, str(mim_file[0]), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    assert not torch.equal(r0["base_encoder.blocks.2.mlp.fc1.weight"], mim_file[1]["blocks.2.mlp.fc1.weight"])
    assert torch.equal(r0["base_encoder.blocks.1.mlp.fc1.weight"], mim_file[1]["blocks.1.mlp.fc1.weight"])


def test_missing_mim_weights_one_line_errors(image_root, mim_file, tmp_path, monkeypatch):
    def no_network(url, dst, *a, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # an empty cache
    base = ["--data", image_root, "--output-dir", str(tmp_path / "o"), "--num-workers", "0", "--batch-size", "16"]
    with pytest.raises(graft.StopRun) as e:
        graft.main(base)  # vit_base: MAE's release, not reachable
    msg = graft.one_line(e.value)
    assert msg == str(e.value) and "\n" not in msg
    assert graft.MAE_RELEASES["vit_base"] in msg and "--mim-checkpoint" in msg and "mae.py" in msg and "URLError" in msg
    with pytest.raises(graft.StopRun, match="vit_base and vit_large only; pass --mim-checkpoint"):
        graft.main(base + ["--model", "vit_tiny"])  # no release of that size
    with pytest.raises(graft.StopRun, match="--mim-checkpoint .*no such file"):
        graft.main(base + ["--model", "vit_tiny", "--mim-checkpoint", str(tmp_path / "missing.pt")])
    small = vit.vit_small(img_size=32, patch_size=8)  # stage 1 of another size
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    with pytest.raises(graft.StopRun, match="another model.*--model") as e:
        graft.main(tiny_args(image_root, tmp_path / "o", tmp_path / "small.pt"))
    assert "\n" not in str(e.value)
    with pytest.raises(graft.StopRun, match="--graft-depth 13 must lie in"):
        graft.main(tiny_args(image_root, tmp_path / "o", mim_file[0], "--graft-depth", "13"))

    # the cache: a file already there is used as is; a download lands there
    args = graft.get_args(["--data", "x", "--model", "vit_large"])
    cached = tmp_path / "hub" / "hub" / "checkpoints" / "mae_pretrain_vit_large.pth"
    os.makedirs(cached.parent, exist_ok=True), cached.write_bytes(b"weights")
    assert graft.mim_weights_path(args, local_main=True) == str(cached)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *a, **kw: open(dst, "wb").close())
    args.model = "vit_base"
    assert graft.mim_weights_path(args, local_main=True) == str(cached.parent / "mae_pretrain_vit_base.pth")
