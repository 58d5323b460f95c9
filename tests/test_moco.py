"""moco.py: equality with the official code, MoCo v3's init, the loss against a slow formula, the momentum update and
schedule, DDP (gathered keys, gradients), the two views, a real-image run that resumes exactly, and bad input."""
import argparse
import copy
import functools
import json
import math
import os

import pytest
import torch

import moco
import vit
from helpers import free_port, run_ddp

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny_moco(tau=0.2):
    fn = functools.partial(moco.moco_vit, vit.VisionTransformer, True, img_size=32, patch_size=8, embed_dim=64, depth=2,
                           num_heads=4)
    return moco.MoCo(fn, dim=16, mlp_dim=32, tau=tau)


def official_fixture():
    """The official MoCo_ViT (tiny, random weights) and one forward of it; see fixtures/make_fixtures.py."""
    paths = [os.path.join(FIX, f) for f in ("moco_official.pt", "moco_official_step.pt")]
    if not all(os.path.isfile(p) for p in paths):
        pytest.skip("tests/fixtures/moco_official*.pt missing: run tests/fixtures/make_fixtures.py")
    return {k: v for p in paths for k, v in torch.load(p, weights_only=True).items()}


def test_equals_official_code():
    """Official weights (with DDP's 'module.' names) load strictly; one train-mode forward gives the official
    queries, keys (after the momentum update), loss and momentum weights; eval-mode features match too. Both sides run
    in float64 (fixtures/make_fixtures.py): in float32 the two train-mode BatchNorms on 8 samples amplify kernel
    rounding to ~1e-5, which a torch release can move; in float64 the gap is ~1e-14, so 1e-10 leaves room only for
    rounding, not for a wrong formula."""
    fx = official_fixture()
    model = tiny_moco(fx["T"]).double()
    model.load_state_dict({k.removeprefix("module."): v for k, v in fx["state_dict"].items()}, strict=True)
    def gap(a, b):
        return (a.double() - b.double()).abs().max().item()
    with torch.no_grad():
        feats = copy.deepcopy(model.base_encoder).eval()(fx["x1"])
    assert gap(feats, fx["eval_features"]) < 1e-10
    qs, ks = [], []
    model.predictor.register_forward_hook(lambda mod, i, o: qs.append(o.detach()))
    model.momentum_encoder.register_forward_hook(lambda mod, i, o: ks.append(o.detach()))
    model.train()
    loss = model(fx["x1"], fx["x2"], fx["m"])
    # the loss is computed in float32 by design (contrastive_loss casts for autocast): float32 rounding, 1e-6 relative
    assert abs(loss.item() / fx["loss"].item() - 1) < 1e-6, (loss.item(), fx["loss"].item())
    for got, key in zip(qs + ks, ("q1", "q2", "k1", "k2")):
        assert gap(got, fx[key]) < 1e-10, key
    after = model.momentum_encoder.state_dict()
    assert set(after) == set(fx["momentum_state_dict_after"])  # weights and BN running statistics
    for k, v in fx["momentum_state_dict_after"].items():
        assert gap(after[k], v) < 1e-10, k
    pe = fx["pos_embed_moco_layout_64_4x4"]  # (1, 17, 64), from the official VisionTransformerMoCo
    assert torch.allclose(vit.sincos_pos_embed(64, 4, layout="moco")[None], pe, atol=1e-6)
    assert torch.allclose(tiny_moco().base_encoder.pos_embed, pe, atol=1e-6)  # moco_vit uses that layout


def test_init_and_structure():
    torch.manual_seed(0)
    model = tiny_moco()
    enc, D = model.base_encoder, 64
    qkv = enc.blocks[0].attn.qkv.weight  # (3D, D)
    assert qkv.abs().max() <= math.sqrt(6 / (D + D)) and qkv.abs().max() > 0.9 * math.sqrt(6 / (D + D))
    assert torch.equal(enc.blocks[0].attn.qkv.bias, torch.zeros(3 * D))
    fc1 = enc.blocks[0].mlp.fc1.weight  # xavier: bound sqrt(6 / (D + 4D))
    assert fc1.abs().max() <= math.sqrt(6 / (5 * D)) and fc1.abs().max() > 0.9 * math.sqrt(6 / (5 * D))
    w = enc.patch_embed.proj.weight  # (D, 3, 8, 8), bound sqrt(6 / (3 * 64 + D))
    assert w.abs().max() <= math.sqrt(6 / (192 + D)) and w.abs().max() > 0.9 * math.sqrt(6 / (192 + D))
    assert 0 < enc.cls_token.std() < 1e-5
    assert not w.requires_grad and not enc.patch_embed.proj.bias.requires_grad  # stop-grad conv1
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    for mlp, n in ((enc.head, 3), (model.predictor, 2)):  # official _build_mlp indexing, last BN without affine
        assert len(mlp) == 3 * n - 1 and all(mlp[3 * i].bias is None for i in range(n))
        assert mlp[-1].weight is None and mlp[1].weight is not None
    for (n, a), b in zip(model.base_encoder.named_parameters(), model.momentum_encoder.parameters()):
        assert torch.equal(a, b), n  # the momentum encoder starts as a copy, projector included
    no_freeze = moco.moco_vit(vit.VisionTransformer, False, img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=4)
    assert no_freeze.patch_embed.proj.weight.requires_grad


def slow_contrastive_loss(q, k, T):
    """MoCo v3 Eq. (1), one query at a time: -log( exp(q.k+ / T) / sum_j exp(q.k_j / T) ), q and k L2-normalized,
    the positive is the key of the same image; mean over queries, times 2T (official code)."""
    total = 0.0
    for i in range(len(q)):
        qi = q[i] / q[i].norm()
        sims = [float(qi @ (k[j] / k[j].norm())) / T for j in range(len(k))]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return 2 * T * total / len(q)


def test_contrastive_loss_against_slow_formula():
    torch.manual_seed(0)
    q, k = torch.randn(6, 16, dtype=torch.float64) * 3, torch.randn(6, 16, dtype=torch.float64)
    for T in (0.2, 1.0):
        assert math.isclose(moco.contrastive_loss(q, k, T).item(), slow_contrastive_loss(q, k, T), rel_tol=1e-5)
    assert torch.equal(moco.all_gather_nograd(k), k)  # no process group: the identity


def test_momentum_update_before_keys_and_schedule():
    torch.manual_seed(0)
    model = tiny_moco()
    with torch.no_grad():  # make base and momentum weights differ
        for p in model.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base = {n: p.clone() for n, p in model.base_encoder.named_parameters()}
    mom = {n: p.clone() for n, p in model.momentum_encoder.named_parameters()}
    pred = {n: p.clone() for n, p in model.predictor.named_parameters()}
    seen = {}  # the momentum weights when the momentum encoder first runs, i.e. when the keys are computed

    def grab(mod, inputs):
        seen.update({} if seen else {n: p.clone() for n, p in mod.named_parameters()})
    model.momentum_encoder.register_forward_pre_hook(grab)
    m = 0.9
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), m)
    assert any(n.startswith("head.") for n in seen)  # the projector is averaged too
    for n, p in model.momentum_encoder.named_parameters():
        expected = m * mom[n] + (1 - m) * base[n]
        assert torch.allclose(seen[n], expected, atol=1e-7), n  # updated before the keys
        assert torch.equal(p, seen[n]), n  # and only once
    for n, p in model.base_encoder.named_parameters():
        assert torch.equal(p, base[n]), n  # forward changes no trained weight
    for n, p in model.predictor.named_parameters():
        assert torch.equal(p, pred[n]), n

    args = argparse.Namespace(moco_m=0.99, epochs=10)
    assert moco.momentum_at(0, 5, args) == 0.99
    assert math.isclose(moco.momentum_at(50, 5, args), 1.0)  # the last step
    assert math.isclose(moco.momentum_at(25, 5, args), 0.995)  # half-way
    assert math.isclose(moco.momentum_at(7, 5, args), 1 - 0.5 * (1 + math.cos(math.pi * 1.4 / 10)) * 0.01)  # t = 1.4 ep
    ms = [moco.momentum_at(s, 5, args) for s in range(51)]
    assert all(a < b for a, b in zip(ms, ms[1:]))


def tiny_args(data, out, *extra):
    return ["--data", data, "--output-dir", str(out), "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
            "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--blr", "1e-3", "--moco-dim", "16",
            "--moco-mlp-dim", "32", "--num-workers", "0", "--log-every", "3", *extra]


def _ddp_worker(rank, world_size, out_dir, image_root, port2):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo")
    half = slice(rank * 4, rank * 4 + 4)
    # 1) the loss alone, on fixed tensors: each rank holds its 4 queries and keys; the keys are gathered
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)  # the same on every rank (same seed)
    q_local = q[half].clone().requires_grad_()
    loss = moco.contrastive_loss(q_local, k[half], 0.2)
    loss.backward()
    # 2) the whole model under DDP, in eval mode: BN then uses its running statistics, so every sample's output
    # depends on that sample alone (in train mode, CPU/gloo BN is per rank and the maths below would not hold)
    torch.manual_seed(0)
    model = tiny_moco().eval()
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    ddp = DDP(model)  # keep a reference: a DDP object collected before backward() would not all-reduce
    model_loss = ddp(x1[half], x2[half], 0.99)
    model_loss.backward()
    torch.save({"loss": loss.detach(), "q_grad": q_local.grad, "model_loss": model_loss.detach(),
                "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                "momentum": model.momentum_encoder.state_dict()}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()
    # 3) moco.main under torchrun-like env (per-rank BN on CPU): two steps; the ranks must stay in sync
    os.environ["MASTER_PORT"] = str(port2)
    trained = moco.main(tiny_args(image_root, os.path.join(out_dir, "run"), "--max-steps", "2"))
    torch.save({n: p.detach() for n, p in trained.named_parameters()}, os.path.join(out_dir, f"main{rank}.pt"))


def test_ddp_gathered_keys_and_gradients(image_root, tmp_path):
    """Rank r's loss is 2T/n * sum_{i in r} l_i with l_i a function of q_i and ALL keys (gathered); the one-process
    loss on the whole batch is 2T/N * sum_i l_i, N = world_size * n. Hence: the mean of the rank losses is the
    global loss; the gradient of rank r wrt its own q_i is (N/n) = world_size times the global one; and DDP's
    average of the per-rank parameter gradients is exactly the global gradient."""
    run_ddp(_ddp_worker, str(tmp_path), image_root, free_port())
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    q.requires_grad_()
    loss = moco.contrastive_loss(q, k, 0.2)
    loss.backward()
    assert torch.allclose((r[0]["loss"] + r[1]["loss"]) / 2, loss, atol=1e-6)
    assert torch.allclose(torch.cat([r[0]["q_grad"], r[1]["q_grad"]]), 2 * q.grad, atol=1e-7)

    torch.manual_seed(0)
    model = tiny_moco().eval()
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    model_loss = model(x1, x2, 0.99)
    model_loss.backward()
    assert torch.allclose((r[0]["model_loss"] + r[1]["model_loss"]) / 2, model_loss, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(r[0]["grads"]) == trainable and not any(n.startswith("momentum_encoder.") for n in trainable)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(r[0]["grads"][n], p.grad, atol=1e-6, rtol=1e-4), n
            assert torch.equal(r[0]["grads"][n], r[1]["grads"][n]), n
    for n, v in model.momentum_encoder.state_dict().items():
        assert torch.allclose(r[0]["momentum"][n].float(), v.float(), atol=1e-6), n

    m0, m1 = (torch.load(tmp_path / f"main{i}.pt", weights_only=True) for i in range(2))
    for n in m0:
        assert torch.equal(m0[n], m1[n]), n  # DDP kept the parameters of both ranks identical
    assert os.path.isfile(tmp_path / "run" / "encoder.pt")


def test_two_views(image_root):
    from PIL import Image
    cls = sorted(os.listdir(os.path.join(image_root, "train")))[0]
    folder = os.path.join(image_root, "train", cls)
    img = Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])).convert("RGB")
    views = moco.TwoViews(argparse.Namespace(img_size=32, crop_min=0.08))
    torch.manual_seed(0)
    v1, v2 = views(img)
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.allclose(v1, v2)
    torch.manual_seed(0)
    w1, w2 = views(img)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # torch RNG only: a seed reproduces the views
    torch.manual_seed(1)
    assert not torch.equal(views(img)[0], v1)
    torch.manual_seed(0)
    a = views.view1(img)
    torch.manual_seed(0)
    assert not torch.equal(a, views.view2(img))  # the same random draws, two different pipelines

    def blur_p(t):
        return [s.p for s in t.transforms if isinstance(s, torch.nn.Module) and hasattr(s, "transforms")
                and isinstance(s.transforms[0], moco.GaussianBlur)]
    solarize = [[s.p for s in t.transforms if isinstance(s, moco.T.RandomSolarize)] for t in (views.view1, views.view2)]
    assert blur_p(views.view1) == [1.0] and blur_p(views.view2) == [0.1] and solarize == [[], [0.2]]
    torch.manual_seed(1)
    blurred = moco.GaussianBlur()(img)
    torch.manual_seed(1)
    assert blurred.size == img.size and blurred.tobytes() == moco.GaussianBlur()(img).tobytes()  # seeded
    assert blurred.tobytes() != img.tobytes()


def test_real_images_run_and_exact_resume(image_root, tmp_path):
    torch.set_num_threads(1)
    full = moco.main(tiny_args(image_root, tmp_path / "a"))  # 160 images / 16 = 10 steps per epoch
    for f in ("checkpoint.pt", "encoder.pt", "args.json", "log.jsonl"):
        assert os.path.isfile(tmp_path / "a" / f), f
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["method"] == "moco" and set(ckpt) >= {"model", "optimizer", "scaler", "args"}
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert log[-1]["step"] == 20 and all(math.isfinite(x["loss"]) for x in log)
    assert 0.99 < log[0]["m"] < log[-1]["m"] < 1.0  # m at steps 2 and 19 of 20
    enc_sd = torch.load(tmp_path / "a" / "encoder.pt", weights_only=True)["model"]
    assert not any(k.startswith("head.") for k in enc_sd)  # the base encoder without its projector
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    vit.load_pretrained(enc, str(tmp_path / "a" / "encoder.pt"), verbose=False)  # vit.py reads what moco.py writes
    assert torch.equal(enc.blocks[0].attn.qkv.weight, full.base_encoder.blocks[0].attn.qkv.weight)
    torch.manual_seed(0)  # the same init as main's (--seed 0): the patch projection stayed frozen, the rest trained
    fresh = moco.MoCo(functools.partial(moco.moco_vit, vit.MODELS["vit_mini"], True, img_size=32, patch_size=8),
                      16, 32, 0.2)
    assert torch.equal(fresh.base_encoder.patch_embed.proj.weight, full.base_encoder.patch_embed.proj.weight)
    assert not torch.equal(fresh.base_encoder.blocks[0].attn.qkv.weight, full.base_encoder.blocks[0].attn.qkv.weight)
    # stopped in the middle of epoch 2 by --max-steps (which saves), then continued with the same command
    moco.main(tiny_args(image_root, tmp_path / "b", "--max-steps", "15"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 15
    resumed = moco.main(tiny_args(image_root, tmp_path / "b"))
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n  # weights, momentum weights and BN statistics


def test_init_from_official_checkpoint_and_encoder(tmp_path):
    fx = official_fixture()
    model = tiny_moco().double()  # a full official state (DDP 'module.' names): everything is restored
    assert moco.load_init(model, os.path.join(FIX, "moco_official.pt"), verbose=False).startswith("full")
    for k, v in model.state_dict().items():
        assert torch.equal(v, fx["state_dict"]["module." + k].to(v.dtype)), k
    model = tiny_moco()
    src = tiny_moco()  # an encoder-only file goes into both encoders
    torch.save({k: v for k, v in src.base_encoder.state_dict().items() if not k.startswith("head.")}, tmp_path / "e.pt")
    moco.load_init(model, str(tmp_path / "e.pt"), verbose=False)
    for k, v in src.base_encoder.state_dict().items():
        if not k.startswith("head."):
            assert (torch.equal(model.base_encoder.state_dict()[k], v)
                    and torch.equal(model.momentum_encoder.state_dict()[k], v)), k


def test_bad_input_one_line_errors(image_root, tmp_path):
    with pytest.raises(moco.StopRun, match="BatchNorm .* needs 2 or more"):  # one image per process breaks BN
        moco.main(tiny_args(image_root, tmp_path / "o", "--batch-size", "1"))
    with pytest.raises(moco.StopRun, match="not divisible by num_heads 5"):
        moco.main(tiny_args(image_root, tmp_path / "o", "--num-heads", "5"))
    with pytest.raises(moco.StopRun, match="moco-m"):
        moco.main(tiny_args(image_root, tmp_path / "o", "--moco-m", "1.5"))
    with pytest.raises(moco.StopRun, match="--init .*no such file"):
        moco.main(tiny_args(image_root, tmp_path / "o", "--init", str(tmp_path / "missing.pt")))
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 7)}}, tmp_path / "other.pt")
    with pytest.raises(moco.StopRun, match="another model"):
        moco.main(tiny_args(image_root, tmp_path / "o", "--init", str(tmp_path / "other.pt")))


def test_contrastive_logits_stay_fp32_under_autocast():
    """.float() alone does not stop autocast from running the logits matmul in bf16; the losses switch it off."""
    import graft
    import mimco
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    for fn in (moco.contrastive_loss, graft.contrastive_loss, mimco.image_nce):
        ref = fn(q, k, 0.2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fn(q, k, 0.2), ref), fn.__module__
    pred, target, ids = torch.randn(2, 16, 16), torch.randn(2, 16, 16), torch.rand(2, 16).argsort(1)[:, :12]
    ref = mimco.patch_nce(pred, target, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mimco.patch_nce(pred, target, ids), ref)
