"""mimco.py: both losses against slow formulas, the forward's wiring, a frozen teacher, DDP gradients with gathered
teacher features, a real-image run with an official-format MoCo v3 teacher that resumes exactly, one-line errors.
CPU, tiny ViTs."""
import argparse
import functools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mimco
import vit
from helpers import run_as_main, run_ddp



def tiny_mimco(seed=0, **kw):
    torch.manual_seed(seed)
    student = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)  # L = 16
    teacher = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
    return mimco.MimCo(student, teacher, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                       head_hidden_dim=64, **kw)


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 16, generator=g)  # images, mask noise


def slow_patch_loss(pred, target, removed, tau, negatives):
    """The patch-level InfoNCE from its definition, one removed patch at a time, in float64: for removed position i
    of image b, -log of the softmax entry of the teacher's patch (b, i) among the candidates: the removed patches of
    image b ("image") or of every image ("batch"), against the student's prediction at (b, i), cosine / tau."""
    p, t = F.normalize(pred.double(), dim=-1), F.normalize(target.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(len(p)):
        for i in removed[b]:
            cands = ([(b, j) for j in removed[b]] if negatives == "image"
                     else [(c, j) for c in range(len(p)) for j in removed[c]])
            logits = [float(p[b, i] @ t[c, j]) / tau for c, j in cands]
            total += -(logits[cands.index((b, i))] - math.log(sum(math.exp(x) for x in logits)))
            count += 1
    return total / count


def slow_image_loss(q, k, tau):
    """The image-level InfoNCE, image by image, in float64: -log softmax of cos(q_i, k_i) / tau among
    cos(q_i, k_j) / tau over all images j; the mean over i."""
    q, k = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / tau for j in range(len(k))]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(q)


def removed_positions(noise, mask_ratio):
    keep = int(noise.shape[1] * (1 - mask_ratio))
    return [sorted(row.argsort()[keep:].tolist()) for row in noise]  # the highest noise is removed


def test_losses_against_slow_formulas():
    g = torch.Generator().manual_seed(0)
    pred, target, noise = (torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g),
                           torch.rand(3, 16, generator=g))
    ids_masked = noise.argsort(1)[:, 4:]  # 12 removed per image
    removed = removed_positions(noise, 0.75)
    for negatives in ("image", "batch"):
        for tau in (0.2, 1.0):
            assert mimco.patch_nce(pred, target, ids_masked, tau, negatives).item() == pytest.approx(
                slow_patch_loss(pred, target, removed, tau, negatives), rel=1e-5)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for tau in (0.2, 0.5):
        assert mimco.image_nce(q, k, tau).item() == pytest.approx(slow_image_loss(q, k, tau), rel=1e-5)


@pytest.mark.parametrize("teacher_feature,negatives,weight", [("cls", "image", 1.0), ("mean", "batch", 0.5)])
def test_forward_wiring(teacher_feature, negatives, weight):
    """The forward's loss = slow formulas on features built from the definitions: the teacher on each full image alone,
    the student on the lowest-noise 25% of the patches only, the decoder's output at the removed positions."""
    model = tiny_mimco(teacher_feature=teacher_feature, patch_negatives=negatives, image_weight=weight)
    imgs, noise = batch(4)
    with torch.no_grad():
        loss, stats = model(imgs, noise)
        removed = removed_positions(noise, 0.75)
        ids_keep = torch.stack([row.argsort()[:4] for row in noise])
        t = torch.cat([model.teacher.forward_features(imgs[b:b + 1]) for b in range(4)])  # (4, 17, 48)
        latent = model.encoder.forward_features(imgs, ids_keep)  # (4, 5, 64)
        pred = model.forward_decoder(latent, noise.argsort(1).argsort(1))  # (4, 16, 48); ids_restore
        t_global = t[:, 0] if teacher_feature == "cls" else t[:, 1:].mean(1)
        patch = slow_patch_loss(pred, t[:, 1:], removed, 0.2, negatives)
        image = slow_image_loss(model.image_head(latent[:, 0]), t_global, 0.2)
    assert stats["loss_patch"].item() == pytest.approx(patch, rel=1e-4)
    assert stats["loss_image"].item() == pytest.approx(image, rel=1e-4)
    assert loss.item() == pytest.approx(patch + weight * image, rel=1e-4)
    # the removed patches' pixels reach the teacher only: changing them changes the targets, not the prediction
    imgs2 = imgs.clone()
    for b in range(4):
        for i in removed[b]:
            imgs2[b, :, (i // 4) * 8:(i // 4 + 1) * 8, (i % 4) * 8:(i % 4 + 1) * 8] = 0
    with torch.no_grad():
        assert torch.equal(model.encoder.forward_features(imgs2, ids_keep), latent)
        assert not torch.allclose(model(imgs2, noise)[1]["loss_patch"], stats["loss_patch"])


def test_teacher_frozen_in_eval_mode_and_only_the_student_trained_and_saved():
    """The teacher is a registered submodule (so .to() moves it) that is frozen, stays in eval mode through
    model.train(), is left out of build_optimizer, and is left out of state_dict() / load_state_dict()
    (checkpoint.pt)."""
    model = tiny_mimco()
    teacher = model.teacher
    assert dict(model.named_children())["teacher"] is teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = model.encoder.blocks[0].attn.qkv.weight.clone()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(k.startswith("teacher") for k in sd)  # not in checkpoint.pt
    assert {k.split(".")[0] for k in sd} >= {"encoder", "decoder_pred", "image_head", "mask_token"}
    assert all(not p.requires_grad for p in teacher.parameters())
    optimizer = mimco.build_optimizer(model, argparse.Namespace(lr=1e-2, weight_decay=0.05), torch.device("cpu"))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not {id(p) for p in teacher.parameters()} & in_optimizer  # not in the optimizer
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if p.requires_grad and n != "decoder_pos_embed"}
    model.eval()
    model.train()
    for step in range(3):
        imgs, noise = batch(4, seed=step)
        loss, _ = model(imgs, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert model.training and model.encoder.training and model.decoder_blocks.training
        assert not teacher.training and all(not m.training for m in teacher.modules())
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # bitwise unchanged
    assert not torch.equal(student_before, model.encoder.blocks[0].attn.qkv.weight)  # the student did train
    model.load_state_dict(sd)  # a student state dict loads strictly (as Run.resume does); the teacher keeps its weights
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, student_before)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(RuntimeError, match="Missing key"):  # still strict about the student
        model.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"})
    model.to(torch.float64)  # moving the model moves the teacher it calls
    assert teacher.blocks[0].attn.qkv.weight.dtype == torch.float64


# ------------------------------------------------------------------------------------ DDP: gradient with 2 processes

def _ddp_grads(rank, world_size, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo")
    model = tiny_mimco()  # the same seed on every rank
    imgs, noise = batch(8)
    half = slice(rank * 4, rank * 4 + 4)
    ddp = DDP(model)  # keep a reference: a temporary DDP is freed before backward, and its gradient hooks with it
    loss, stats = ddp(imgs[half], noise[half])
    loss.backward()
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, "stats": stats},
               os.path.join(out_dir, f"r{rank}.pt"))


def test_ddp_gradients_equal_single_process(tmp_path):
    """2 gloo processes x 4 images == 1 process x 8 images. Rank r's image loss is the mean over its 4 images of the
    CE against the teacher features of all 8 (gathered, labels offset by 4r); the mean over ranks, and DDP's gradient
    average, is then the single-process loss and gradient: the gathered features are the teacher's, with no gradient
    to lose. The patch loss (negatives within each image) is per image, equal counts: it averages the same way."""
    run_ddp(_ddp_grads, str(tmp_path))
    model = tiny_mimco()
    imgs, noise = batch(8)
    loss, stats = model(imgs, noise)
    loss.backward()
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    with torch.no_grad():  # each rank's image loss: its 4 rows of the global logits, labels offset by rank
        q = F.normalize(model.image_head(model.encoder.forward_features(imgs, noise.argsort(1)[:, :4])[:, 0]), dim=-1)
        k = F.normalize(model.teacher.forward_features(imgs)[:, 0], dim=-1)
        per_image = F.cross_entropy(q @ k.t() / 0.2, torch.arange(8), reduction="none")
    for r, res in enumerate((r0, r1)):
        assert res["stats"]["loss_image"].item() == pytest.approx(per_image[4 * r:4 * r + 4].mean().item(), rel=1e-5)
    for key in ("loss_patch", "loss_image"):
        assert ((r0["stats"][key] + r1["stats"][key]) / 2).item() == pytest.approx(stats[key].item(), rel=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(r0["grads"]) == trainable  # every student parameter gets a gradient (find_unused_parameters=False)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(r0["grads"][n], p.grad, atol=1e-6, rtol=1e-4), n
            assert torch.equal(r0["grads"][n], r1["grads"][n]), n


# ------------------------------------------------------------------------------------------- real images, resume

def save_official_moco_teacher(path, seed=5):
    """A vit_mini MoCo v3 teacher in the official format: {'state_dict': {'module.base_encoder.*', ...}}."""
    torch.manual_seed(seed)
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8, pos_embed_layout="moco")
    sd = {f"module.{part}.{k}": v for part in ("base_encoder", "momentum_encoder") for k, v in enc.state_dict().items()}
    sd["module.base_encoder.head.0.weight"] = torch.randn(16, 64)  # the projector: ignored
    sd["module.predictor.0.weight"] = torch.randn(16, 16)
    torch.save({"epoch": 300, "arch": "vit_tiny", "state_dict": sd}, path)
    return enc.state_dict()


def tiny_args(data, out, teacher, *extra):
    return ["--data", data, "--output-dir", str(out), "--teacher", str(teacher), "--teacher-model", "vit_mini",
            "--model", "vit_mini", "--img-size", "32", "--patch-size", "8", "--batch-size", "16", "--epochs", "2",
            "--warmup-epochs", "1", "--blr", "1e-3", "--decoder-embed-dim", "32", "--decoder-depth", "1",
            "--decoder-num-heads", "2", "--head-hidden-dim", "64", "--num-workers", "0", "--log-every", "3", *extra]


def test_real_images_run_and_exact_resume(image_root, tmp_path):
    torch.set_num_threads(1)
    teacher_sd = save_official_moco_teacher(tmp_path / "moco_v3.pth.tar")
    full = mimco.main(tiny_args(image_root, tmp_path / "a", tmp_path / "moco_v3.pth.tar"))  # 10 steps per epoch
    for f in ("checkpoint.pt", "encoder.pt", "args.json", "log.jsonl"):
        assert os.path.isfile(tmp_path / "a" / f), f
    assert all(torch.equal(teacher_sd[k], v) for k, v in full.teacher.state_dict().items())  # loaded, never changed
    assert not full.teacher.training
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["args"]["teacher"] == str(tmp_path / "moco_v3.pth.tar")
    assert not any("teacher" in k for k in ckpt["model"]) and any(k.startswith("encoder.") for k in ckpt["model"])
    logs = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert len(logs) == 8 and all(math.isfinite(x["loss_patch"]) and math.isfinite(x["loss_image"]) for x in logs)
    assert all(x["loss"] == pytest.approx(x["loss_patch"] + x["loss_image"], abs=1e-4) for x in logs)
    mini = functools.partial(vit.MODELS["vit_mini"], img_size=32, patch_size=8)
    enc, from_ckpt = mini(), mini()
    vit.load_pretrained(enc, str(tmp_path / "a" / "encoder.pt"), verbose=False)  # vit.py reads what mimco.py writes
    vit.load_pretrained(from_ckpt, str(tmp_path / "a" / "checkpoint.pt"), verbose=False)  # encoder.* (graft.py's way)
    for (n, a), b in zip(enc.state_dict().items(), from_ckpt.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, full.encoder.state_dict()[n]), n
    # it trained
    assert not torch.equal(enc.blocks[0].attn.qkv.weight, mimco.MimCo(mini(), mini()).encoder.blocks[0].attn.qkv.weight)
    # stopped in the middle of epoch 2 by --max-steps (which saves), then continued with the same command
    mimco.main(tiny_args(image_root, tmp_path / "b", tmp_path / "moco_v3.pth.tar", "--max-steps", "14"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 14
    resumed = mimco.main(tiny_args(image_root, tmp_path / "b", tmp_path / "moco_v3.pth.tar"))
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(mimco.StopRun, match="teacher-feature cls, not mean"):  # resumed with other teacher targets
        mimco.main(tiny_args(image_root, tmp_path / "b", tmp_path / "moco_v3.pth.tar", "--epochs", "3",
                             "--teacher-feature", "mean"))


def test_wrong_or_missing_teacher_one_line_errors(image_root, tmp_path):
    torch.manual_seed(0)
    small = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
    torch.save(small.state_dict(), tmp_path / "small.pt")  # not a vit_mini
    cases = [(tmp_path / "small.pt", "does not fit"), (tmp_path / "missing.pt", "no such file")]
    (tmp_path / "moco").mkdir()
    torch.save(vit.MODELS["vit_mini"](img_size=32, patch_size=8).state_dict(), tmp_path / "moco" / "encoder.pt")
    (tmp_path / "moco" / "args.json").write_text(json.dumps({"model": "vit_mini", "num_heads": 4}))  # moco.py's record
    cases.append((tmp_path / "moco" / "encoder.pt", "pass --teacher-num-heads 4"))
    for path, what in cases:
        with pytest.raises(mimco.StopRun, match=what) as e:
            mimco.main(tiny_args(image_root, tmp_path / "o", path))
        msg = str(e.value)
        assert "\n" not in msg and f"--teacher {path}" in msg and "--teacher-model" in msg, msg
    code = run_as_main("mimco.py", tiny_args(image_root, tmp_path / "o", tmp_path / "small.pt"))  # the command line
    assert isinstance(code, str) and "\n" not in code and code.startswith("error: --teacher"), code
