"""Training trajectories equal the official code's (issue #26): mae.py, moco.py, finetune.py and graft.py each run
their own main() for 9 optimizer steps (3 epochs of 3 steps: 2 warm-up epochs from lr 0, then the cosine), on the
batches, masks, views, MixUp / CutMix and drop-path draws that the official training loops used in
fixtures/make_trajectory_fixtures.py, from the same start weights. Per step the loss, the lr of every trainable
parameter (layer-wise scales and lr groups included) and MoCo's momentum must match, and at the end every weight
(momentum encoders and BatchNorm statistics included); the graft parameter groups of ViT-B / ViT-L must equal the
release's param_groups_lrd_moco (fixtures/graft_groups_official.json).

The test swaps only main()'s inputs, at the points where they enter: each batch that Run.batches yields is the
fixture's (the --data folder only sets the number of images, hence 3 steps per epoch), build_model's model is cast to
float64 (a pre-hook casts its inputs, e.g. MAE's picture and finetune's evaluation images) and its weights set to the
fixture maker's start_value (the graft's encoders come from a MIM file of those values, as the official run's
--graft_pretrained), and each random draw is the official one, supplied where the script draws it. Everything else
(optimizer, schedules, set_lr, the step, the momentum update, logging, saving, evaluation) is main()'s.

Tolerances. The official loops ran in float64 and so does our side, except where a script computes in float32 on
purpose, for the deviation 'bf16 autocast by default' of each docstring: mae.py's forward_loss, moco.py's and
graft.py's contrastive_loss, finetune.py's one-hot targets and soft_cross_entropy. (graft.py's L1 distance was float32
too and differed from the release's: fixed, see test_graft_trajectory_l1_on_blocks.) That rounding (~6e-8 relative)
enters every gradient, so the weights are
compared to float32's 1e-6 (measured: <= 2.1e-8) and the losses, float32 numbers, to 1e-6 relative (measured
<= 2.5e-7; Layer Grafted: 1e-5, see there). The lrs and momenta are float64 on both sides: 1e-12 relative (the
fractional epoch is epoch + i / n officially and step / n here; measured <= 2.2e-16)."""
import functools
import importlib.util
import json
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import finetune
import graft
import mae
import moco
import vit

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
_spec = importlib.util.spec_from_file_location("make_trajectory_fixtures",
                                               os.path.join(FIX, "make_trajectory_fixtures.py"))
maker = importlib.util.module_from_spec(_spec)  # start_value, pixels, graft_mim_file: the fixture maker's own
_spec.loader.exec_module(maker)

WEIGHTS = 1e-6  # absolute, every weight and buffer: 'bf16 autocast by default' makes the losses float32 (above)
LOSS = 1e-6  # relative, per step: the loss is a float32 number, for the same deviation
EXACT = 1e-12  # relative: lrs and momenta, float64 on both sides


def vit_trajectory(cls=vit.VisionTransformer, **kw):  # the fixtures' size: width 32, 2 heads, depth 2 (graft: 3)
    return cls(**{"embed_dim": 32, "depth": 2, "num_heads": 2, **kw})


@pytest.fixture(autouse=True)
def trajectory_models(monkeypatch):
    monkeypatch.setitem(vit.MODELS, "vit_trajectory", vit_trajectory)
    monkeypatch.setitem(vit.MODELS, "vit_trajectory3", functools.partial(vit_trajectory, depth=3))


def fixture(name):
    return torch.load(os.path.join(FIX, name), weights_only=True)


def image_folder(root, n_train, classes):
    """An ImageNet-layout folder, n_train training images in `classes` class folders and a val image of each class
    (at least 4): its size sets the steps per epoch (n_train / batch); its pixels are never trained on."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", max(4, classes))):
        for i in range(n):
            os.makedirs(os.path.join(root, split, f"class{i % classes}"), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                os.path.join(root, split, f"class{i % classes}", f"{i}.png"))
    return str(root)


def common_argv(tmp_path, fx, classes=2):
    c = fx["config"]
    data = image_folder(tmp_path / "data", fx["steps_per_epoch"] * c["batch_size"], classes)
    return ["--data", data, "--output-dir", str(tmp_path / "out"), "--img-size", "32", "--patch-size", "8",
            "--batch-size", str(c["batch_size"]), "--epochs", str(fx["epochs"]), "--warmup-epochs",
            str(fx["warmup_epochs"]), "--weight-decay", str(c["weight_decay"]), "--num-workers", "0", "--amp", "none",
            "--log-every", "1", "--save-every-minutes", "0"]


def as_float64(module, args):  # the model is float64: so are its inputs (MAE's picture, finetune's evaluation)
    return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def trace(monkeypatch, script, fx, batch_of, start=lambda name: True):
    """Make script.main() train on the fixture: each batch is batch_of(step); build_model's model is cast to float64
    and its parameters whose name `start` accepts are set to start_value. Returns a dict that fills while main()
    runs: the steps, their loss (end_step's), the lr of every trainable parameter (after each set_lr), the start
    weights."""
    rec = {"step": [], "loss": [], "param_lr": [], "model": None, "start": None}
    batches, end_step, build_model, set_lr = script.Run.batches, script.Run.end_step, script.build_model, script.set_lr

    def fixture_batches(self, loader, epoch):
        for _ in batches(self, loader, epoch):
            rec["step"].append(self.step)
            yield batch_of(self.step)

    def traced_end_step(self, loss, **logged):
        rec["loss"].append(loss.item())
        return end_step(self, loss, **logged)

    def start_model(args, verbose=True):
        model = build_model(args, verbose=verbose).double()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if start(n):
                    p.copy_(maker.start_value(n, tuple(p.shape)))
        model.register_forward_pre_hook(as_float64)
        rec["model"], rec["start"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def traced_set_lr(optimizer, lr):
        out = set_lr(optimizer, lr)
        names = {id(p): n for n, p in rec["model"].named_parameters()}
        rec["param_lr"].append({names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]})
        return out
    monkeypatch.setattr(script.Run, "batches", fixture_batches)
    monkeypatch.setattr(script.Run, "end_step", traced_end_step)
    monkeypatch.setattr(script, "build_model", start_model)
    monkeypatch.setattr(script, "set_lr", traced_set_lr)
    return rec


def traced_momentum(monkeypatch, script):
    """The momentum main() computes at each step (script.momentum_at), recorded."""
    ms, momentum_at = [], script.momentum_at
    monkeypatch.setattr(script, "momentum_at", lambda *a: ms.append(momentum_at(*a)) or ms[-1])
    return ms


def close(ours, official, rel, what, abs_tol=0.0):
    assert len(ours) == len(official), what
    for step, (a, b) in enumerate(zip(ours, official)):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol), f"{what} at step {step}: {a} vs official {b}"


def check_steps_and_lrs(rec, fx):
    """9 steps, in order, across the two epoch boundaries; every trainable parameter at the official lr each step."""
    assert rec["step"] == list(range(len(fx["loss"])))
    assert len(rec["param_lr"]) == len(rec["step"])
    for step, lrs in enumerate(rec["param_lr"]):
        assert sorted(lrs) == sorted(fx["param_names"]), step  # the same trainable parameters, no more, no fewer
        close([lrs[n] for n in fx["param_names"]], fx["param_lr"][step].tolist(), EXACT, f"lrs (step {step})")


def check_weights(model, final, tol=WEIGHTS, keys=lambda name: True):
    """Every tensor of the fixture (weights and buffers) within tol of ours; the fixture holds exactly our tensors
    whose name `keys` accepts."""
    ours = model.state_dict()
    assert set(final) == {k for k in ours if keys(k)}
    gaps = {k: (ours[k].double() - v.double()).abs().max().item() for k, v in final.items()}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < tol, f"{worst}: {gaps[worst]:.3g} (tolerance {tol})"


def check_trained(rec, model, tol=WEIGHTS):
    """The comparison sees training: most trainable tensors (9 in 10) moved by over 100 x the tolerance. (Not all:
    a bias that the next BatchNorm or softmax makes gradient-free moves by weight decay alone, or not at all: the
    final norm.bias before MoCo's projector, the key part of qkv.bias.)"""
    moved = {n: (p.detach() - rec["start"][n]).abs().max().item() for n, p in model.named_parameters()
             if p.requires_grad}
    assert sum(m > 100 * tol for m in moved.values()) > 0.9 * len(moved), sorted(moved.items(), key=lambda x: x[1])[:5]


# ------------------------------------------------------------------------------------------------------ MAE

def test_mae_trajectory(tmp_path, monkeypatch):
    """MAE pre-training, norm-pix loss, mask ratio 0.75, AdamW(0.9, 0.95) with weight decay on the >= 2-D tensors,
    against main_pretrain.py + engine_pretrain.py; the masks are the official run's noise, given to forward."""
    fx = fixture("trajectory_mae.pt")
    c = fx["config"]
    rec = trace(monkeypatch, mae, fx, lambda step: (maker.pixels(fx["images"][fx["order"][step]]),
                                                    torch.zeros(c["batch_size"], dtype=torch.long)))
    forward, noised = mae.MaskedAutoencoder.forward, []

    def official_mask(self, imgs, mask_ratio=0.75, noise=None):
        if noise is None:  # a training step (the reconstruction picture passes its own noise)
            noised.append(rec["step"][-1])
            noise = fx["noise"][rec["step"][-1]]
        return forward(self, imgs, mask_ratio, noise)
    monkeypatch.setattr(mae.MaskedAutoencoder, "forward", official_mask)
    model = mae.main(common_argv(tmp_path, fx) + [
        "--model", "vit_trajectory", "--blr", str(c["blr"]), "--mask-ratio", str(c["mask_ratio"]),
        "--decoder-embed-dim", str(c["decoder_embed_dim"]), "--decoder-depth", str(c["decoder_depth"]),
        "--decoder-num-heads", str(c["decoder_num_heads"])])
    assert noised == rec["step"]  # one official mask per training step
    check_steps_and_lrs(rec, fx)
    close(rec["loss"], fx["loss"].tolist(), LOSS, "loss")
    check_weights(model, fx["final"])
    check_trained(rec, model)


# ------------------------------------------------------------------------------------------------------ MoCo v3

def two_views(fx):
    def views(step):
        v = maker.pixels(fx["views"][fx["order"][step]])  # (B, 2, 3, 32, 32)
        return [v[:, 0], v[:, 1]], torch.zeros(len(v), dtype=torch.long)
    return views


def test_moco_trajectory(tmp_path, monkeypatch):
    """MoCo v3: both views through the base encoder, momentum update then keys, symmetric InfoNCE (tau 0.2), momentum
    on the cosine from 0.9, AdamW on every trainable parameter, against main_moco.py's main_worker + train(); the
    momentum encoder (start: base + small offsets) and the heads' BatchNorm statistics at the end too."""
    fx = fixture("trajectory_moco.pt")
    c = fx["config"]
    rec = trace(monkeypatch, moco, fx, two_views(fx))
    ms = traced_momentum(monkeypatch, moco)
    model = moco.main(common_argv(tmp_path, fx) + [
        "--model", "vit_trajectory", "--blr", str(c["blr"]), "--moco-dim", str(c["moco_dim"]),
        "--moco-mlp-dim", str(c["moco_mlp_dim"]), "--moco-t", str(c["moco_t"]), "--moco-m", str(c["moco_m"])])
    check_steps_and_lrs(rec, fx)
    close(ms, fx["m"].tolist(), EXACT, "momentum")
    close(rec["loss"], fx["loss"].tolist(), LOSS, "loss")
    check_weights(model, {**fx["final"], **fixture("trajectory_moco_momentum.pt")["final"]})
    check_trained(rec, model)


# ------------------------------------------------------------------------------------------------- fine-tuning

class OfficialLambda:
    """Stands in for the Beta distribution torchvision's MixUp / CutMix sample lambda from (_dist.sample(()))."""
    def __init__(self, lam):
        self.lam = lam

    def sample(self, shape=()):
        return torch.tensor(self.lam, dtype=torch.float64)


def test_finetune_trajectory(tmp_path, monkeypatch):
    """MAE fine-tuning with MixUp 0.8 / CutMix 1.0 (switch 0.5), label smoothing 0.1, drop path 0.1, layer decay
    0.65, min lr, against main_finetune.py + engine_finetune.py (timm 0.3.2's Mixup, SoftTargetCrossEntropy); an
    evaluation of val/ after every epoch on both sides. The draws are timm's own (seed 4: 5 CutMix batches, 4 boxes
    clipped by the border, 3 of odd side, and 4 MixUp), fed to finetune's torchvision MixUp / CutMix: lambda, the
    CutMix box centre (column, then row, as torchvision draws them) and the choice between the two. Batch 2, where
    timm's pairs (image i with B-1-i) are torchvision's (i with i-1): the deliberate deviation 'MixUp / CutMix are
    torchvision.transforms.v2's' then changes nothing, box included (torchvision's box is timm 0.3.2's, which the
    official code pins; the docstring's one-pixel difference is to timm 1.0's, for odd sides). Drop path: the
    official per-sample masks, 2 a step (block 1's attention and MLP branches), where vit.drop_path draws them."""
    fx = fixture("trajectory_finetune.pt")
    c = fx["config"]
    rec = trace(monkeypatch, finetune, fx, lambda step: (maker.pixels(fx["images"][fx["order"][step]]),
                                                         fx["labels"][fx["order"][step]]))
    mixup_cutmix, mixed = finetune.mixup_cutmix, []

    def official_draws(args):
        real = mixup_cutmix(args)  # finetune's own transform; only its random draws are the official ones
        def mix(imgs, labels):
            d = fx["mix"][rec["step"][-1]]
            mixed.append(d)
            real.p = [float(isinstance(t, v2.CutMix) == d["cutmix"]) for t in real.transforms]
            for t in real.transforms:
                t._dist = OfficialLambda(d["lam"])
            centre = iter([d["cx"], d["cy"]])
            with mock.patch.object(torch, "randint", lambda high, size: torch.tensor([next(centre)])):
                return real(imgs, labels)
        return mix
    monkeypatch.setattr(finetune, "mixup_cutmix", official_draws)
    forward = finetune.Classifier.forward

    def official_drop_path(self, x):
        if not self.training:
            return forward(self, x)
        masks = iter(fx["drop_masks"][rec["step"][-1]])
        def bernoulli_(t, p):
            assert math.isclose(p, 1 - c["drop_path"]), p  # block 1 of 2: the full rate
            return t.copy_(next(masks).reshape(t.shape))
        with mock.patch.object(torch.Tensor, "bernoulli_", bernoulli_):
            out = forward(self, x)
        assert next(masks, None) is None  # both masks used
        return out
    monkeypatch.setattr(finetune.Classifier, "forward", official_drop_path)
    model = finetune.main(common_argv(tmp_path, fx, classes=c["num_classes"]) + [
        "--init", "random", "--model", "vit_trajectory", "--blr", str(c["blr"]), "--layer-decay", str(c["layer_decay"]),
        "--min-lr", str(c["min_lr"]), "--drop-path", str(c["drop_path"]), "--smoothing", str(c["smoothing"]),
        "--mixup", str(c["mixup"]), "--cutmix", str(c["cutmix"]), "--mixup-switch-prob", str(c["mixup_switch_prob"])])
    assert mixed == fx["mix"]  # one official draw per step
    check_steps_and_lrs(rec, fx)
    close(rec["loss"], fx["loss"].tolist(), LOSS, "loss")
    check_weights(model, fx["final"])
    check_trained(rec, model)


# ------------------------------------------------------------------------------------------------ Layer Grafted

def graft_main(tmp_path, monkeypatch, fx):
    """graft.main() on the fixture's run: the MIM file both sides start from; the heads and predictor at their
    start values (the encoders keep the MIM weights). Returns (model, rec, momenta, l1 distances)."""
    c = fx["config"]
    rec = trace(monkeypatch, graft, fx, two_views(fx), start=lambda n: n.startswith(
        ("base_encoder.head.", "momentum_encoder.head.", "predictor.")))
    ms, l1, end_step = traced_momentum(monkeypatch, graft), [], graft.Run.end_step
    monkeypatch.setattr(graft.Run, "end_step", lambda self, loss, **logged: l1.append(logged["l1_dist"].item())
                        or end_step(self, loss, **logged))
    maker.graft_mim_file(tmp_path / "mim.pth", c["depth"])
    upper = c["lr"] * c["batch_size"] / 256 * float(c["lr_layer_wise"].split(",")[-1])  # 9.375e-4
    lower = float(c["lr_layer_wise"].split(",")[0]) / float(c["lr_layer_wise"].split(",")[-1])  # 0.1
    model = graft.main(common_argv(tmp_path, fx) + [
        "--model", "vit_trajectory3", "--mim-checkpoint", str(tmp_path / "mim.pth"),
        "--blr", str(upper * 256 / c["batch_size"]), "--lower-lr-ratio", str(lower),
        "--l1-weight", str(c["l1_dist_w"]), "--l1-depth", str(c["l1_dist_to_block"]),
        "--moco-dim", str(c["moco_dim"]), "--moco-mlp-dim", str(c["moco_mlp_dim"]), "--moco-t", str(c["moco_t"]),
        "--moco-m", str(c["moco_m"])])
    return model, rec, ms, l1


def test_graft_trajectory(tmp_path, monkeypatch):
    """Layer Grafted stage 2 against the release's main_pretrain.py main_worker + train() WITH ONE LINE RESTORED: the
    released loop never calls scaler.step(optimizer) (only the momentum update moves weights; graft.py's first
    deviation), so the fixture maker inserts that line after the backward. Both encoders from the MIM file, the
    release's three lr groups --lr_layer_wise 1.5e-5,1.5e-5,1.5e-4 (embeddings and blocks 0-1 at 1/10 of the rest:
    graft.py's lower group at --lower-lr-ratio 0.1), weight decay on >= 2-D tensors only, and its L1 pull (weight
    0.1) on layer ids <= 0: the cls_token (patch embedding and pos_embed are frozen; without the pull our cls_token
    ends 2.4e-5 away, the loss 7e-4 relative). The loss: 1e-5 relative
    (measured 1.2e-6 at step 8, MoCo's 2.5e-7, while every weight agrees to 2e-8: a float32 number ('bf16 autocast
    by default') of weights whose last bits pass through the 4-sample BatchNorms of the heads)."""
    fx = fixture("trajectory_graft.pt")
    model, rec, ms, l1 = graft_main(tmp_path, monkeypatch, fx)
    check_steps_and_lrs(rec, fx)
    peak = fx["param_lr"][6].tolist()  # step 6: the peak lr; the release's three groups are two lrs, 1/10 apart
    assert sorted({round(x / max(peak), 9) for x in peak}) == [0.1, 1.0]
    close(ms, fx["m"].tolist(), EXACT, "momentum")
    official_loss = fx["loss"] + fx["config"]["l1_dist_w"] * fx["l1"]  # ours includes the L1 term
    close(rec["loss"], official_loss.tolist(), 1e-5, "loss")
    # graft.py sums float32 differences (the bug of test_graft_trajectory_l1_on_blocks, harmless here: the signs are
    # right): each of the 32 cls_token terms is off by up to two float32 roundings of |theta| < 0.1 (6e-9 each)
    close(l1, fx["l1"].tolist(), 0.0, "L1 distance", abs_tol=1e-6)
    assert fx["l1"][0] == fx["l1"][1] == 0 < fx["l1"][2]  # step 0 has lr 0: the first move is at step 1
    # the momentum update skips what the base encoder never trains (graft.py's deviation): bit-identical there,
    # the release's m t + (1 - m) t rounds in the last bit, far inside the tolerance
    check_weights(model, {**fx["final"], **fixture("trajectory_graft_momentum.pt")["final"]})
    check_trained(rec, model)


def key_biases(depth, width, to_block):
    """The key part of qkv.bias of the blocks under the L1 term: (name, slice) of both encoders."""
    return [(f"{enc}.blocks.{b}.attn.qkv.bias", slice(width, 2 * width)) for enc in ("base_encoder", "momentum_encoder")
            for b in range(min(depth, to_block))]


def test_graft_trajectory_l1_on_blocks(tmp_path, monkeypatch):
    """As test_graft_trajectory with the L1 pull on blocks 0-1 too (--l1_dist_to_block 2; the paper's ViT-L: 12 of
    24 blocks). The key bias (the middle third of qkv.bias) has no gradient from the loss (a softmax is invariant to
    a shift of its logits), so under the L1 pull alone its first move is the sign of rounding noise, which differs
    between any two implementations (the release's attention is matmul + softmax, ours scaled_dot_product_attention),
    and from then on the walk is the mirror image: |theta - theta_MIM| must match there, to float64 rounding.
    This test found a bug: l1_distance summed |theta.float() - ref.float()|, so in float64 a weight within float32
    resolution of its MIM value got subgradient 0 where the release's torch.norm(p=1) gives +-1 (the key biases
    stayed put; the release moves them 1.27e-5). It now sums in the weights' dtype."""
    fx = fixture("trajectory_graft_l1_blocks.pt")
    c = fx["config"]
    model, rec, ms, l1 = graft_main(tmp_path, monkeypatch, fx)
    check_steps_and_lrs(rec, fx)
    close(ms, fx["m"].tolist(), EXACT, "momentum")
    close(l1, fx["l1"].tolist(), LOSS, "L1 distance")
    close(rec["loss"], (fx["loss"] + c["l1_dist_w"] * fx["l1"]).tolist(), 1e-5, "loss")
    mim = torch.load(tmp_path / "mim.pth", weights_only=True)["model"]
    keys = [(n, s) for n, s in key_biases(c["depth"], maker.WIDTH, c["l1_dist_to_block"]) if n in fx["final"]]
    ours = model.state_dict()
    for name, s in keys:
        ref = mim[name.split(".", 1)[1]][s]
        gap = ((ours[name][s] - ref).abs() - (fx["final"][name][s] - ref).abs()).abs().max().item()
        assert gap < 1e-10, f"{name} |theta - theta_MIM|: {gap:.3g}"
    final = {k: v.clone() for k, v in fx["final"].items()}
    for name, s in keys:  # the rest of qkv.bias as usual
        final[name][s] = ours[name][s]
    check_weights(model, final, keys=lambda k: not k.startswith("momentum_encoder."))  # stored: base, predictor


# ------------------------------------------------------------------------------------------------ graft groups

@pytest.mark.parametrize("arch", ["vit_base", "vit_large"])
def test_graft_groups_equal_the_releases(arch):
    """The release's utils_mae/lr_decay.py param_groups_lrd_moco on its MoCo_ViT with the paper's --lr_layer_wise
    1.5e-5,1.5e-5,1.5e-4 and weight decay 0.1 (fixtures/graft_groups_official.json) and graft.param_groups with
    --lower-lr-ratio 0.1: the same trainable parameters (names, shapes, order), and each one's lr relative to the
    upper group's and its weight decay equal. The release's 25 / 49 groups (a layer x decay each) are our 4."""
    with open(os.path.join(FIX, "graft_groups_official.json")) as f:
        fx = json.load(f)
    official = fx["models"][arch]
    with torch.device("meta"):
        model = graft.GraftedMoCo(vit.MODELS[arch])
    assert model.depth == official["depth"]
    assert [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad] == official["params"]
    top = max(g["lr_scale"] for g in official["groups"])
    want = {n: (g["lr_scale"] / top, g["weight_decay"]) for g in official["groups"] for n in g["params"]}
    assert sorted({round(s, 12) for s, _ in want.values()}) == [0.1, 1.0]  # the three groups are two lrs

    def ours(lower_lr_ratio):
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr_scale"], g["weight_decay"])
                for g in graft.param_groups(model, fx["weight_decay"], lower_lr_ratio) for p in g["params"]}
    got = ours(0.1)
    assert set(got) == set(want)
    for n, (scale, wd) in want.items():
        assert math.isclose(got[n][0], scale, rel_tol=1e-12) and got[n][1] == wd, (n, got[n], (scale, wd))
    assert any(not math.isclose(ours(0.2)[n][0], s, rel_tol=1e-12) for n, (s, _) in want.items())  # it can fail
