"""--in-memory: the augmentations draw their parameters as torchvision does and, with the parameters replayed,
compute what torchvision computes; an in-memory run resumes exactly; the decoded set is cached and checked; a set
that does not fit is one line."""
import math
import os

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import hybrid
import mae
import moco
from helpers import run_as_main, run_ddp


@pytest.fixture(scope="module")
def real(image_root):
    """32 real 32 x 32 images from the test folder as uint8 (B, 3, H, W)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(image_root, "train")) for f in fs)[::5][:32]
    return torch.stack([TF.pil_to_tensor(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [16, 32, 56])  # shrinking (antialiased), about the same size, enlarging
def test_resized_crop_draws_as_torchvision_and_resizes_as_pil(real, interpolation, size):
    """resized_crop draws RandomResizedCrop.get_params and then the flip for each image in turn; with those draws
    replayed, torchvision's resized_crop + hflip of the PIL image (the PIL path) is within 1.1 of 255 levels (PIL
    rounds each of its two passes to uint8; we keep floats)."""
    torch.manual_seed(1)
    out = mae.resized_crop(real, size, (0.08, 1.0), interpolation)
    torch.manual_seed(1)
    for b in range(len(real)):
        i, j, h, w = T.RandomResizedCrop.get_params(real[b], (0.08, 1.0), (3 / 4, 4 / 3))
        flip = torch.rand(1).item() < 0.5
        pil = TF.resized_crop(TF.to_pil_image(real[b]), i, j, h, w, [size, size], T.InterpolationMode(interpolation))
        ref = TF.pil_to_tensor(TF.hflip(pil) if flip else pil).float()
        assert (out[b] * 255 - ref).abs().max() < 1.1


def test_flip_jitter_grey_blur_solarize_rates():
    """Each random op fires at its probability (n = 4000: 4 standard errors are at most 0.032)."""
    torch.manual_seed(0)
    n, tol = 4000, 0.032
    cols = torch.arange(8, dtype=torch.uint8).repeat(n, 3, 8, 1) * 30  # columns that tell a flip apart
    out = mae.resized_crop(cols, 8, (1.0, 1.0), "bilinear")  # scale 1, square: the whole image, resized to itself
    same, flipped = (out == cols / 255).flatten(1).all(1), (out == cols.flip(-1) / 255).flatten(1).all(1)
    assert (same | flipped).all() and abs(flipped.float().mean() - 0.5) < tol
    x = torch.rand(n, 3, 16, 16)
    changed = lambda y: (y - x).flatten(1).abs().amax(1) > 1e-6  # noqa: E731
    assert abs(changed(mae.color_jitter(x.clone(), 0.4, 0.4, 0.2, 0.1, p=0.8)).float().mean() - 0.8) < tol
    grey = mae.random_grayscale(x, p=0.2)
    assert abs((grey[:, 0] == grey[:, 1]).flatten(1).all(1).float().mean() - 0.2) < tol
    assert abs(changed(mae.gaussian_blur(x, (0.1, 2.0), p=0.1)).float().mean() - 0.1) < tol
    assert abs(changed(mae.random_solarize(x, p=0.2)).float().mean() - 0.2) < tol


def test_color_jitter_equals_torchvision_ops_in_drawn_order(real):
    """With the draws replayed (on, factors, order), each image gets torchvision's tensor adjust_* in its order."""
    x = real.float() / 255
    torch.manual_seed(2)
    out = mae.color_jitter(x.clone(), 0.4, 0.4, 0.2, 0.1, p=0.8)
    torch.manual_seed(2)
    B = len(x)
    on = torch.rand(B) < 0.8
    factors = [torch.empty(B).uniform_(0.6, 1.4), torch.empty(B).uniform_(0.6, 1.4), torch.empty(B).uniform_(0.8, 1.2),
               torch.empty(B).uniform_(-0.1, 0.1)]
    order = torch.rand(B, 4).argsort(1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    assert on.any() and not on.all()
    for b in range(B):
        ref = x[b]
        for a in order[b].tolist() if on[b] else []:
            ref = ops[a](ref, float(factors[a][b]))
        assert (out[b] - ref).abs().max() < 1e-5


def test_blur_grey_solarize_equal_torchvision(real):
    x = real.float() / 255
    torch.manual_seed(3)
    out = mae.gaussian_blur(x, (0.1, 2.0), p=0.5)
    torch.manual_seed(3)
    s, on = torch.empty(len(x)).uniform_(0.1, 2.0), torch.rand(len(x)) < 0.5
    for b in range(len(x)):
        ref = TF.gaussian_blur(x[b], 2 * math.ceil(3 * float(s[b])) + 1, float(s[b])) if on[b] else x[b]
        assert (out[b] - ref).abs().max() < 1e-5
    assert torch.equal(mae.random_grayscale(x, p=1.0), TF.rgb_to_grayscale(x, 3))
    solar = torch.stack([TF.pil_to_tensor(TF.solarize(TF.to_pil_image(im), 128)) for im in real]) / 255
    assert (mae.random_solarize(x, p=1.0) - solar).abs().max() < 1e-6


def small_run(data, out, cache, script, *extra):
    heads = ["--moco-dim", "16", "--moco-mlp-dim", "32"]
    decoder = ["--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]
    own = {"moco": heads, "hybrid": heads + decoder, "mae": decoder}[script]
    return ["--data", str(data), "--data-root", str(cache), "--output-dir", str(out), "--model", "vit_mini",
            "--img-size", "32", "--patch-size", "8", "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1",
            "--blr", "1e-3", "--num-workers", "0", "--log-every", "1", "--in-memory", *own, *map(str, extra)]


@pytest.mark.parametrize("script", ["moco", "hybrid"])
def test_in_memory_run_resumes_exactly(script, image_root, tmp_path, capsys):
    """A run stopped mid-epoch (--max-steps 3 of 10) and resumed ends with the weights of one never stopped; the
    second run loads the decoded images from the cache; those equal what the PIL loader decodes."""
    torch.set_num_threads(1)
    module = {"moco": moco, "hybrid": hybrid}[script]
    run_as_main(f"{script}.py",
                small_run(image_root, tmp_path / "ref", tmp_path / "cache", script) + ["--num-workers", "2"])
    assert "160 images decoded, to be cached in" in capsys.readouterr().out  # decoded by 2 workers
    cut = small_run(image_root, tmp_path / "cut", tmp_path / "cache", script)
    run_as_main(f"{script}.py", cut + ["--max-steps", "3"])
    assert "--in-memory: 160 images loaded from" in capsys.readouterr().out
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    run_as_main(f"{script}.py", cut)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("ref", "cut"))
    assert a["step"] == b["step"] == 10
    for x, y in [(a["model"], b["model"]), (a["optimizer"]["state"], b["optimizer"]["state"])]:
        assert all(torch.equal(p, q) for p, q in zip(module.tensors(x), module.tensors(y)))
    [cached] = os.listdir(tmp_path / "cache" / "in_memory")
    images, labels = torch.load(tmp_path / "cache" / "in_memory" / cached, weights_only=True)
    folder = mae.build_dataset(type("A", (), {"data": str(image_root)})(), T.PILToTensor())
    assert images.shape == (len(folder), 3, 32, 32)
    assert all(torch.equal(images[k], folder[k][0]) and labels[k] == folder[k][1] for k in (0, 77, 159))


def _two_ranks(rank, world_size, argv, out):
    """mae.main on one rank, recording whether the cache file was there when this rank came to load or decode, how
    many images it decoded itself and the timeouts of the groups it made."""
    import contextlib
    import torch.distributed as dist
    seen, decoded, timeouts = [], [], []
    load_or_decode, tqdm, new_group = mae.load_or_decode, mae.tqdm, dist.new_group

    def spy(run, dataset, shape, path):
        seen.append(os.path.isfile(path))
        return load_or_decode(run, dataset, shape, path)

    def count(iterable, desc=None, *a, **kw):  # the decoding loop's progress bar counts what it decodes
        for item in tqdm(iterable, desc, *a, **kw):
            decoded.extend([1] if desc == "--in-memory: decoding" else [])
            yield item
    count.write = tqdm.write  # print0's

    def group(*a, **kw):
        timeouts.append(kw.get("timeout").total_seconds())
        return new_group(*a, **kw)
    mae.load_or_decode, mae.tqdm, dist.new_group = spy, count, group
    with open(f"{out}_{rank}.txt", "w") as f, contextlib.redirect_stdout(f):
        mae.main(argv)
        print(f"cache there: {seen}; decoded: {sum(decoded)}; group timeouts: {timeouts}")


def test_in_memory_two_processes_decode_once(image_root, tmp_path):
    """Under 2 processes rank 0 decodes and caches while rank 1 waits (in a group that waits up to a day: NCCL's
    default would give up after 10 minutes), then rank 1 loads rank 0's file; both train."""
    argv = small_run(image_root, tmp_path / "o", tmp_path / "cache", "mae") + ["--max-steps", "2"]
    run_ddp(_two_ranks, argv, str(tmp_path / "stdout"))
    logs = [(tmp_path / f"stdout_{r}.txt").read_text() for r in (0, 1)]
    assert "160 images decoded, to be cached in" in logs[0] and "cache there: [False]; decoded: 160;" in logs[0]
    assert "cache there: [True]; decoded: 0;" in logs[1]  # rank 1 came after rank 0 had written the file, and read it
    assert all("group timeouts: [86400.0]" in log for log in logs)
    assert len(os.listdir(tmp_path / "cache" / "in_memory")) == 1
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"] == 2


def one_error(args):
    """What `python mae.py ARGS` exits with, run in this process (no second torch import): one "error: ..." line."""
    message = run_as_main("mae.py", args)
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_in_memory_errors(image_root, tmp_path):
    """Too large to fit: one line with its size and the fix (nothing is allocated); images of mixed sizes; the flag's
    rule. The stale cache of another file list is not used (the key covers names, sizes and times)."""
    base = small_run(image_root, tmp_path / "o1", tmp_path / "cache", "mae")
    line = one_error(base + ["--in-memory-size", "40000"])
    assert "--in-memory: 160 images of 3x40000x40000 need 768.0 GB" in line and "smaller --in-memory-size" in line
    line = one_error([x for x in base if x != "--in-memory"] + ["--in-memory-size", "16"])
    assert line == "error: --in-memory-size 16: must be >= 1 and needs --in-memory"
    mixed = tmp_path / "mixed" / "train" / "a"
    mixed.mkdir(parents=True)
    for k, side in enumerate([32, 32, 24] * 11):
        Image.new("RGB", (side, side), (k, 0, 0)).save(mixed / f"{k:02d}.png")
    line = one_error(small_run(tmp_path / "mixed", tmp_path / "o2", tmp_path / "cache", "mae"))
    assert "image 2 of --data is 3x24x24, image 0 is 3x32x32; pass --in-memory-size S" in line
    later = tmp_path / "later" / "train" / "a"  # an odd size far from the first image
    later.mkdir(parents=True)
    for k in range(258):
        Image.new("RGB", (32, 32) if k < 256 else (24, 24), (k % 256, 0, 0)).save(later / f"{k:03d}.png")
    line = one_error(small_run(tmp_path / "later", tmp_path / "o3", tmp_path / "cache", "mae"))
    assert "image 256 of --data is 3x24x24, image 0 is 3x32x32; pass --in-memory-size S" in line
