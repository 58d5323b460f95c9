"""finetune.py: the classifier (logits) and its layer-wise lr decay groups equal the official MAE code's; the schedule;
MixUp / CutMix targets and label smoothing against slow formulas; a real CIFAR-10 run from mae.py's encoder that
learns; exact resume with the whole recipe on; DDP gradients and evaluation counts equal one process; one-line errors
for bad input."""
import json
import math
import os
import shutil
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F

import finetune
import mae
import vit
from helpers import free_port, run_ddp, run_as_main

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
# vit_mini at 32 px / patch 8 (17 tokens), a few milliseconds a step; the whole recipe unless a test turns parts off
TINY = ["--model", "vit_mini", "--img-size", "32", "--patch-size", "8", "--batch-size", "32", "--epochs", "2",
        "--warmup-epochs", "1", "--blr", "1e-3", "--num-workers", "0", "--log-every", "3"]


def ft_args(data, out, *extra, init="random"):
    return ["--data", str(data), "--output-dir", str(out), "--init", str(init), *TINY, *map(str, extra)]


def evals(out):
    """The per-epoch evaluation lines of log.jsonl, by step."""
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {d["step"]: d for d in lines if "val_top1" in d}


# ------------------------------------------------------------------------------ the recipe's parts, one by one

@pytest.mark.parametrize("name", ["vit_tiny", "vit_base", "vit_base_cls_token", "vit_large"])
def test_param_groups_equal_the_official_ones(name):
    """MAE's util/lr_decay.py param_groups_lrd on its models_vit classifier (fixtures/lr_decay_official.json, made by
    make_finetune_fixtures.py from the official code) and param_groups on ours: the same parameters (names, shapes:
    MAE's fine-tuned checkpoints load as they are), in the same groups, in the same order, with the same lr_scale
    and weight decay, exactly."""
    with open(os.path.join(FIX, "lr_decay_official.json")) as f:
        fx = json.load(f)
    official = fx["models"][name]
    with torch.device("meta"):  # the groups depend on names and shapes only
        model = vit.MODELS[name.replace("_cls_token", "")](cls=finetune.Classifier, num_classes=fx["num_classes"],
                                                           global_pool=official["global_pool"], drop_path_rate=0.1)
    assert [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad] == official["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    def ours(layer_decay):
        return [{"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
                 "params": [names[id(p)] for p in g["params"]]}
                for g in finetune.param_groups(model, fx["weight_decay"], layer_decay)]
    assert ours(official["layer_decay"]) == official["groups"]
    assert ours(official["layer_decay"] - 0.05) != official["groups"]  # the comparison sees a change of the decay
    scales = sorted({g["lr_scale"] for g in official["groups"]})
    assert len(scales) == official["depth"] + 2 and scales[-1] == 1.0  # embeddings, each block, the head's layer


def test_classifier_equals_the_official_one():
    """An official models_vit classifier (fixtures/finetune_official.pt: random float64 weights, global pool + fc_norm
    and CLS token) loads into finetune.Classifier strictly, names as they are (as MAE's mae_finetuned_vit_*.pth
    files do), and gives the official logits to float64 rounding."""
    fx = torch.load(os.path.join(FIX, "finetune_official.pt"), weights_only=True)
    cfg = fx["config"]
    for key, global_pool in (("global_pool", True), ("cls_token", False)):
        model = finetune.Classifier(num_classes=cfg["num_classes"], global_pool=global_pool, img_size=cfg["img_size"],
                                    patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                                    num_heads=cfg["num_heads"]).double().eval()
        model.load_state_dict(fx[key]["state_dict"], strict=True)
        with torch.no_grad():
            assert (model(fx["imgs"]) - fx[key]["logits"]).abs().max().item() < 1e-10, key


def test_lr_schedule_and_group_lrs():
    """lr_at_min = MAE util/lr_sched.py adjust_learning_rate (written out here), and set_lr gives each group lr x its
    lr_scale, as the official function does."""
    def official(epoch, lr, min_lr, warmup, epochs):
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
    args = type("A", (), {"lr": 2e-3, "min_lr": 1e-6, "warmup_epochs": 5, "epochs": 100})()
    spe = 1251
    for step in (0, 1, 3000, spe * 5, spe * 5 + 1, spe * 50 + 7, spe * 100 - 1):
        assert math.isclose(finetune.lr_at_min(step, spe, args), official(step / spe, 2e-3, 1e-6, 5, 100),
                            rel_tol=1e-12)
    assert math.isclose(finetune.lr_at_min(spe * 100, spe, args), 1e-6, rel_tol=1e-9)  # ends at min lr, not 0
    model = vit.MODELS["vit_mini"](cls=finetune.Classifier, num_classes=10, img_size=32, patch_size=8)
    optimizer = torch.optim.AdamW(finetune.param_groups(model, 0.05, 0.65), lr=1.0)
    finetune.set_lr(optimizer, 0.5)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.head.weight)] == 0.5 and lrs[id(model.fc_norm.bias)] == 0.5
    assert math.isclose(lrs[id(model.blocks[2].mlp.fc1.weight)], 0.5 * 0.65, rel_tol=1e-12)
    assert math.isclose(lrs[id(model.patch_embed.proj.weight)], 0.5 * 0.65 ** 4, rel_tol=1e-12)  # 3 blocks + 1
    assert math.isclose(lrs[id(model.pos_embed)], 0.5 * 0.65 ** 4, rel_tol=1e-12)  # trained, in layer 0


def mix_args(**kw):
    return type("A", (), {"mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5, "smoothing": 0.1, "num_classes": 10,
                          **kw})()


def test_mixup_cutmix_targets_and_label_smoothing():
    """Over 200 seeded batches: every target row sums to one; the targets equal two slow formulas (ours: smooth after
    mixing; timm's mixup_target: mix smoothed one-hots); each batch is either MixUp (images = lam x + (1 - lam) x of
    the neighbour) or CutMix (a box of the neighbour's pixels covering 1 - lam of the image), CutMix about half the
    time (switch prob 0.5); the loss is the soft-target cross-entropy."""
    args, K, e = mix_args(), 10, 0.1
    mix = finetune.mixup_cutmix(args)
    kinds = {"mixup": 0, "cutmix": 0}
    for seed in range(200):
        torch.manual_seed(seed)
        x, y = torch.randn(6, 3, 16, 16), torch.randperm(K)[:6]  # distinct labels: lam can be read from the targets
        imgs, t = finetune.soft_targets(x.clone(), y, mix, args)
        assert torch.allclose(t.sum(1), torch.ones(6), atol=1e-6)
        lam = float((t[0, y[0]] - e / K) / (1 - e))
        nb = y.roll(1, 0)  # torchvision pairs each image with the previous one
        ours = [[(1 - e) * (lam * (k == y[i]) + (1 - lam) * (k == nb[i])) + e / K for k in range(K)] for i in range(6)]
        smooth = lambda c, k: 1 - e + e / K if k == c else e / K  # noqa: E731
        timms = [[lam * smooth(y[i], k) + (1 - lam) * smooth(nb[i], k) for k in range(K)] for i in range(6)]
        assert torch.allclose(t, torch.tensor(ours), atol=1e-6) and torch.allclose(t, torch.tensor(timms), atol=1e-6)
        if torch.allclose(imgs, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5):
            kinds["mixup"] += 1
        else:
            pasted = (imgs == x.roll(1, 0)).all(1) & (imgs != x).any(1)  # (B, H, W): pixels from the neighbour
            rows, cols = pasted[0].any(1).nonzero().flatten(), pasted[0].any(0).nonzero().flatten()
            box = torch.zeros(16, 16, dtype=torch.bool)
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(pasted, box.expand(6, -1, -1))  # one rectangle, the same in every image
            assert math.isclose(box.float().mean().item(), 1 - lam, abs_tol=1e-6)  # lambda = the box's complement
            kinds["cutmix"] += 1
    assert 70 <= kinds["cutmix"] <= 130 and kinds["mixup"] + kinds["cutmix"] == 200, kinds
    logits = torch.randn(6, K)
    slow = -sum(t[i, k] * torch.log_softmax(logits[i], 0)[k] for i in range(6) for k in range(K)) / 6
    assert torch.allclose(finetune.soft_cross_entropy(logits, t), slow, atol=1e-6)
    # mixing off: smoothed one-hots, whose loss is PyTorch's label-smoothed cross-entropy (timm's LabelSmoothingCE)
    off = mix_args(mixup=0.0, cutmix=0.0)
    assert finetune.mixup_cutmix(off) is None
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, K, (6,))
    imgs, t = finetune.soft_targets(x, y, None, off)
    assert torch.equal(imgs, x) and torch.allclose(t, F.one_hot(y, K) * (1 - e) + e / K)
    assert torch.allclose(finetune.soft_cross_entropy(logits, t), F.cross_entropy(logits, y, label_smoothing=e))
    assert type(finetune.mixup_cutmix(mix_args(mixup=0.0))).__name__ == "CutMix"
    assert type(finetune.mixup_cutmix(mix_args(cutmix=0.0))).__name__ == "MixUp"


def test_eval_transform_is_the_official_one():
    """util/datasets.py: Resize(int(img / (224/256)), bicubic) up to 224 px, no enlargement above; then CenterCrop."""
    for img, resize in ((224, 256), (32, 36), (384, 384)):
        ops = finetune.eval_transform(type("A", (), {"img_size": img})()).transforms
        assert ops[0].size == resize and ops[0].interpolation.value == "bicubic" and ops[1].size == (img, img)


# ------------------------------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """100 train / 20 val CIFAR-10 images per class (real JPEGs from ../shared/data; generated ones on a clone
    without it), in the ImageNet layout."""
    import conftest
    dst = tmp_path_factory.mktemp("cifar_1k")
    archive = os.path.join(conftest.SHARED, "cifar10.tar.gz")
    if os.path.isfile(archive):
        r = subprocess.run(["tar", "-xzf", archive, "-C", str(dst), "--strip-components", "1", "--wildcards",
                            "cifar10/train/*/00[0-9][0-9].jpg", "cifar10/val/*/00[01][0-9].jpg"], capture_output=True)
        if r.returncode or sum(len(f) for _, _, f in os.walk(dst)) != 1200:  # no GNU tar: Python's, slower
            shutil.rmtree(dst)
            conftest._slice_of_cifar10(str(dst), 100, 20)
    else:
        conftest._generated(str(dst), 100, 20)
    return dst


@pytest.fixture(scope="module")
def mae_encoder(image_root, tmp_path_factory):
    """encoder.pt of a short mae.py run (5 steps): it checks the path from pre-training to fine-tuning (names,
    file), not the benefit of pre-training, which needs far longer runs."""
    out = tmp_path_factory.mktemp("mae")
    torch.set_num_threads(1)
    mae.main(["--data", image_root, "--output-dir", str(out), "--model", "vit_mini", "--img-size", "32",
              "--patch-size", "8", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--blr", "1.5e-3",
              "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--num-workers", "0"])
    return out / "encoder.pt"


def test_cifar10_run_from_mae_encoder_learns(cifar, mae_encoder, tmp_path):
    """310 steps of 16 real CIFAR-10 images (1000 train, 5 epochs) from mae.py's encoder: val top-1 on all 200 val
    images is clearly above chance (10%) and rises; best.pt is the best epoch and --eval-only reproduces its number.
    MixUp / CutMix / RandAugment / erasing / drop path are off here: they slow learning down far beyond a test's
    budget (the resume test below runs them all)."""
    torch.set_num_threads(1)
    out = tmp_path / "ft"
    finetune.main(ft_args(cifar, out, "--batch-size", "16", "--epochs", "5", "--blr", "1e-2", "--mixup", "0",
                          "--cutmix", "0", "--aa", "none", "--reprob", "0", "--drop-path", "0", "--log-every", "50",
                          init=mae_encoder))
    e = evals(out)
    top1 = [e[s]["val_top1"] for s in sorted(e)]
    assert sorted(e) == [62, 124, 186, 248, 310] and all(d["val_images"] == 200 for d in e.values())
    assert top1[-1] >= 20 and max(top1) >= 20 and top1[-1] > top1[0], top1
    assert all(d["val_top5"] >= d["val_top1"] for d in e.values())
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["val_top1"] == max(top1) and best["method"] == "finetune"
    stats = finetune.main(["--eval-only", "--data", str(cifar), "--init", str(out / "best.pt"), "--output-dir",
                           str(tmp_path / "eval"), *TINY])
    assert stats["val_top1"] == best["val_top1"] and stats["val_images"] == 200


def term_at(step):
    """From the given step on, the process sends itself SIGTERM in the middle of the step (as tests/test_faults.py)."""
    original, calls = finetune.set_lr, []
    def set_lr_then_term(optimizer, lr):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(optimizer, lr)
    return set_lr_then_term


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(image_root, tmp_path, monkeypatch):
    """The whole recipe (RandAugment, erasing, MixUp / CutMix, smoothing, drop path, layer decay): a run stopped by
    SIGTERM at the last step of epoch 1 (before its evaluation), resumed, stopped by --max-steps in epoch 2 and
    resumed again ends with the same weights, optimizer state, best.pt and evaluations as a run never stopped."""
    torch.set_num_threads(1)
    finetune.main(ft_args(image_root, tmp_path / "ref"))  # 160 images / 32 = 5 steps per epoch, 10 in all
    cut = ft_args(image_root, tmp_path / "cut")
    with monkeypatch.context() as m:
        m.setattr(finetune, "set_lr", term_at(5))
        with pytest.raises(finetune.StopRun, match="stopped by SIGTERM after step 5;"):
            finetune.main(cut)
    assert evals(tmp_path / "cut") == {}  # stopped before the epoch's evaluation
    finetune.main(cut + ["--max-steps", "7"])  # makes up epoch 1's evaluation first, then stops at step 7
    assert sorted(evals(tmp_path / "cut")) == [5, 7]
    finetune.main(cut)
    ref, got = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("ref", "cut"))
    assert ref["step"] == got["step"] == 10
    for a, b in ((ref["model"], got["model"]), (ref["optimizer"]["state"], got["optimizer"]["state"])):
        flat_a, flat_b = list(finetune.tensors(a)), list(finetune.tensors(b))
        assert len(flat_a) == len(flat_b) and all(torch.equal(p, q) for p, q in zip(flat_a, flat_b))
    for f in ("encoder.pt", "best.pt"):
        a, b = (torch.load(tmp_path / d / f, weights_only=True) for d in ("ref", "cut"))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    e_ref, e_cut = evals(tmp_path / "ref"), evals(tmp_path / "cut")
    assert sorted(e_ref) == [5, 10] and e_cut[5] == e_ref[5] and e_cut[10] == e_ref[10]
    init = vit.MODELS["vit_mini"](cls=finetune.Classifier, num_classes=10, img_size=32, patch_size=8).state_dict()
    assert not torch.equal(ref["model"]["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])  # it trained


# ------------------------------------------------------------------------------------------------------ DDP

def _ddp_worker(rank, world_size, out_dir, data, port2):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    # 1) one step's gradient under DDP, 4 of 8 images per rank; mixing off (a draw per rank), no drop path
    dist.init_process_group("gloo")
    args = finetune.get_args(ft_args(data, os.path.join(out_dir, "unused"), "--drop-path", "0"))
    _, val_set = finetune.build_datasets(args, train=False)  # 79 images: not divisible by the 2 ranks
    model = finetune.build_model(args, verbose=False)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))  # the same on every rank (same seed)
    half = slice(rank * 4, rank * 4 + 4)
    imgs, targets = finetune.soft_targets(x[half], y[half], None, args)
    ddp = DDP(model)
    finetune.soft_cross_entropy(ddp(imgs), targets).backward()
    stats = finetune.evaluate(model, val_set, args, torch.device("cpu"))  # the counts of both ranks, summed
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "stats": stats},
               os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()
    # 2) main() as under torchrun, the whole recipe, 2 steps: the ranks stay identical, val/ is counted once
    os.environ["MASTER_PORT"] = str(port2)
    trained = finetune.main(ft_args(data, os.path.join(out_dir, "run"), "--max-steps", "2"))
    torch.save(trained.state_dict(), os.path.join(out_dir, f"main{rank}.pt"))


def test_ddp_gradients_and_evaluation_equal_one_process(image_root, tmp_path):
    """2 gloo processes x 4 images == 1 process x 8: the loss is a per-image mean, so DDP's average of the ranks'
    gradients is the whole batch's. Evaluation under 2 processes counts each of 79 val images exactly once and
    equals one process's; main() keeps both ranks' weights identical and --eval-only of its result agrees."""
    data = tmp_path / "data"
    os.makedirs(data)
    os.symlink(os.path.join(image_root, "train"), data / "train")
    shutil.copytree(os.path.join(image_root, "val"), data / "val")
    first = sorted(os.listdir(data / "val"))[0]
    os.remove(data / "val" / first / sorted(os.listdir(data / "val" / first))[0])  # 80 -> 79 images
    run_ddp(_ddp_worker, str(tmp_path), str(data), free_port())
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    args = finetune.get_args(ft_args(data, tmp_path / "unused", "--drop-path", "0"))
    _, val_set = finetune.build_datasets(args, train=False)
    model = finetune.build_model(args, verbose=False)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    imgs, targets = finetune.soft_targets(x, y, None, args)
    finetune.soft_cross_entropy(model(imgs), targets).backward()
    assert set(r0["grads"]) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert r0["grads"][n] is not None, n  # every parameter gets a gradient (no find_unused_parameters)
        assert torch.allclose(r0["grads"][n], p.grad, atol=1e-7, rtol=1e-4), n
        assert torch.equal(r0["grads"][n], r1["grads"][n]), n
    one = finetune.evaluate(model, val_set, args, torch.device("cpu"))
    assert r0["stats"] == r1["stats"] and r0["stats"]["val_images"] == one["val_images"] == 79
    assert r0["stats"]["val_top1"] == one["val_top1"] and r0["stats"]["val_top5"] == one["val_top5"]
    assert math.isclose(r0["stats"]["val_loss"], one["val_loss"], abs_tol=1e-4)
    m0, m1 = (torch.load(tmp_path / f"main{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    logged = evals(tmp_path / "run")[2]
    assert logged["val_images"] == 79
    stats = finetune.main(["--eval-only", "--data", str(data), "--init", str(tmp_path / "run" / "encoder.pt"),
                           "--output-dir", str(tmp_path / "eval"), *TINY])
    assert stats["val_top1"] == logged["val_top1"] and stats["val_top5"] == logged["val_top5"]


# --------------------------------------------------------------------------------------- one-line errors

def test_bad_input_one_line_errors(image_root, tmp_path):
    """Each row: the command line a user would type, one line (sys.exit's string), no checkpoint left behind."""
    torch.set_num_threads(1)
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    import argparse
    torch.save(argparse.Namespace(weights=[1, 2]), tmp_path / "pickled.pt")  # weights_only refuses it
    small = vit.MODELS["vit_tiny"](img_size=32, patch_size=8)
    torch.save({"model": small.state_dict()}, tmp_path / "tiny_encoder.pt")
    encoder = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    torch.save({"model": encoder.state_dict()}, tmp_path / "encoder.pt")
    for classes in (10, 1000):
        clf = vit.MODELS["vit_mini"](cls=finetune.Classifier, num_classes=classes, img_size=32, patch_size=8)
        torch.save({"model": clf.state_dict()}, tmp_path / f"classifier{classes}.pt")
    os.makedirs(tmp_path / "no_val")
    os.symlink(os.path.join(image_root, "train"), tmp_path / "no_val" / "train")
    other = tmp_path / "other_classes"
    shutil.copytree(image_root, other)
    os.rename(other / "val" / sorted(os.listdir(other / "val"))[0], other / "val" / "zzz")
    rows = [
        (["--layer-decay", "0"], "--layer-decay 0.0: must lie in \\(0, 1\\]"),
        (["--layer-decay", "1.5"], "--layer-decay 1.5: must lie in"), (["--layer-decay", "nan"], "--layer-decay nan"),
        (["--mixup", "-1"], "--mixup -1.0: must be >= 0"), (["--cutmix", "-0.5"], "--cutmix -0.5: must be >= 0"),
        (["--smoothing", "1"], "--smoothing 1.0: must lie in \\[0, 1\\)"), (["--drop-path", "1"], "--drop-path 1.0"),
        (["--min-lr", "-1"], "--min-lr -1.0: must lie in \\[0, lr\\]"), (["--min-lr", "1"], "lr = .* = 0.000125"),
        (["--reprob", "2"], "--reprob 2.0: must lie in \\[0, 1\\]"), (["--mixup-switch-prob", "-0.1"], "--mixup-sw"),
        (["--percent", "0"], "--percent 0.0: must lie in \\(0, 100\\]"), (["--percent", "101"], "--percent 101.0"),
        (["--percent", "10", "--split-file", "x.txt"], "--split-file x.txt: cannot be combined with --percent"),
        (["--split-file", tmp_path / "missing.txt"], "--split-file .*missing.txt: no such file"),
        (["--in-memory"], "--in-memory True: needs --aa none"),
        (["--in-memory", "--aa", "none", "--percent", "10"], "--in-memory True: .*not with --percent"),
        (["--init", tmp_path / "missing.pt"], "--init .*missing.pt: not found"),
        (["--init", tmp_path / "corrupt.pt"], "cannot read .*corrupt.pt as a file of weights"),
        (["--init", tmp_path / "pickled.pt"], "cannot read .*pickled.pt as a file of weights"),
        (["--init", tmp_path / "tiny_encoder.pt"], "--init .*tiny_encoder.pt: checkpoint is for another model"),
        (["--init", tmp_path / "classifier10.pt"], "is a fine-tuned classifier .* evaluate it with --eval-only"),
        (["--eval-only", "--init", tmp_path / "encoder.pt"], "has no classification head .*drop --eval-only"),
        (["--eval-only", "--init", tmp_path / "classifier1000.pt"], "classifies 1000 classes, --data .* has 10"),
        (["--eval-only"], "--eval-only --init random: evaluates a fine-tuned classifier"),
        (["--data", tmp_path / "no_val"], "--data .*no_val: no 'val' folder inside"),
        (["--data", other], "train/ and val/ have different class folders"),
        (["--data", tmp_path / "nope"], "--data .*nope: no such folder"),
    ]
    for extra, message in rows:
        out = tmp_path / "o"
        code = run_as_main("finetune.py", ft_args(image_root, out) + [str(x) for x in extra])
        assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, (extra, code)
        assert __import__("re").search(message, code), (extra, code)
        assert not os.path.exists(out / "checkpoint.pt"), extra
    no_init = [a for a in ft_args(image_root, tmp_path / "o") if a != "random" and a != "--init"]
    assert run_as_main("finetune.py", no_init).startswith("error: --init: pass the weights to fine-tune")
