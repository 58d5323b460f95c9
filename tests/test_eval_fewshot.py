"""eval_fewshot.py: the classifiers on synthetic features (logistic regression against scikit-learn with the mapped
penalty, k-NN against a slow loop), the split samplers, DDP feature extraction without duplicates, the command line
end to end on real images with checkpoints written by mae.py, and one-line errors for bad input."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as datasets

import eval_fewshot as ef
import mae
import vit
from helpers import free_port, run_as_main, run_ddp


def clusters(n_train, n_test, num_classes=10, dim=64, spread=1.0, seed=0):
    """Gaussian clusters with a common offset (real features are not centred); spread < 1 makes them overlap."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=g) * spread
    def draw(n):
        y = torch.arange(num_classes).repeat_interleave(n)
        return means[y] + torch.randn(len(y), dim, generator=g) + 2.0, y
    return (*draw(n_train), *draw(n_test))


def test_separable_clusters_are_classified():
    x, y, xt, yt = clusters(10, 50, spread=1.0)
    assert ef.logreg_accuracy(x, y, xt, yt) >= 0.95
    assert ef.knn_accuracy(x, y, xt, yt) >= 0.95
    assert ef.linear_accuracy(x, y, xt, yt) >= 0.95


@pytest.mark.parametrize("lambd", [2.5e-4, 1.0])  # the paper's weak penalty, and one strong enough to change the answer
def test_logreg_matches_sklearn(lambd):
    """cyanure's (1/n) sum CE + (lambda/2)||W||^2 with lambda = lambd/n is sklearn's C sum CE + 1/2 ||W||^2 with
    C = 1/lambd, on the same (cyanure-preprocessed) features, no intercept."""
    from sklearn.linear_model import LogisticRegression
    x, y, xt, yt = clusters(30, 100, spread=0.3)  # overlapping: about 60-70% accuracy
    ours, info = ef.logreg_accuracy(x, y, xt, yt, lambd=lambd, return_info=True)
    clf = LogisticRegression(C=1 / lambd, fit_intercept=False, tol=1e-8, max_iter=10_000)
    clf.fit(ef.preprocess(x.double()).numpy(), y.numpy())
    ref = clf.score(ef.preprocess(xt.double()).numpy(), yt.numpy())
    assert 0.4 < ref < 0.9, ref  # the case is neither trivial nor hopeless
    assert abs(ours - ref) <= 0.005, (ours, ref)
    assert info["rel_gap"] < 1e-3 and info["iterations"] < 1000, info  # converged by cyanure's criterion


def test_preprocess_is_per_row_like_cyanure():
    x = torch.randn(6, 5) * 3 + 1
    p = ef.preprocess(x)
    assert torch.allclose(p.mean(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(p.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(ef.preprocess(x[:2]), p[:2])  # no statistic shared between rows: train and val alike


def test_knn_equals_slow_loop():
    x, y, xt, yt = clusters(4, 6, num_classes=3, dim=8, spread=0.5)
    k, t = 5, 0.07
    correct = 0
    for f, label in zip(xt, yt):  # DINO's vote, one test image at a time
        sims = sorted(((torch.dot(f / f.norm(), g / g.norm()).item(), int(c)) for g, c in zip(x, y)), reverse=True)[:k]
        votes = [sum(torch.exp(torch.tensor(s / t)).item() for s, cc in sims if cc == c) for c in range(3)]
        correct += int(max(range(3), key=lambda c: votes[c]) == label)
    assert ef.knn_accuracy(x, y, xt, yt, k=k, t=t) == correct / len(yt)
    # k larger than the train set is capped at its size, not an error
    assert ef.knn_accuracy(x[:3], y[:3], xt, yt, k=20, t=t) == ef.knn_accuracy(x[:3], y[:3], xt, yt, k=3, t=t)


def test_knn_small_temperature_is_the_nearest_neighbour():
    """exp(sim / t) overflows float32 once sim / t > 88 (t = 1e-3: 17% here, chance-like, from inf votes); the weights
    relative to the nearest neighbour give the same vote at any t, and t -> 0 is the 1-NN classifier."""
    x, y, xt, yt = clusters(10, 50, spread=0.5)
    one_nn = (y[(F.normalize(xt, dim=1) @ F.normalize(x, dim=1).T).argmax(dim=1)] == yt).float().mean().item()
    assert 0.6 < one_nn < 0.9, one_nn  # neither trivial nor hopeless
    for t in (1e-3, 1e-5):
        assert abs(ef.knn_accuracy(x, y, xt, yt, t=t) - one_nn) <= 0.004, t  # at most one image of 500 (a near-tie)


def test_diverged_probes_are_refused():
    """Weights gone NaN used to score class 0 for every image: 10% on 10 classes, reported as a result."""
    x, y, xt, yt = clusters(10, 20)
    with pytest.raises(ef.StopRun, match=r"--linear-lr 1e\+38: the linear probe diverged .*use a smaller --linear-lr"):
        ef.linear_accuracy(x, y, xt, yt, epochs=5, lr=1e38)
    for lambd, gap in ((1e30, "nan"), (1e-300, "inf")):  # NaN weights; an infinite duality gap (lambda n^2 = 0)
        message = f"--lambd {lambd}: the logistic regression's duality gap is {gap}; try MSN's 2.5e-4"
        with pytest.raises(ef.StopRun, match=re.escape(message)):
            ef.logreg_accuracy(x, y, xt, yt, lambd=lambd, max_iter=50)


def test_split_sampler_deterministic_and_balanced():
    labels = torch.cat([torch.full((20 + 7 * c,), c) for c in range(5)])[torch.randperm(5 * 20 + 7 * 10)]
    a, b, c = (ef.sample_split(labels, s, shots=3) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert labels[a].bincount().tolist() == [3] * 5 and len(a.unique()) == 15
    p = ef.sample_split(labels, 0, percent=10)
    assert labels[p].bincount().tolist() == [round(0.1 * (20 + 7 * c)) for c in range(5)]  # 2, 3, 3, 4, 5
    assert not torch.equal(p, ef.sample_split(labels, 1, percent=10))
    assert labels[ef.sample_split(labels, 0, percent=0.1)].bincount().tolist() == [1] * 5  # at least one per class
    with pytest.raises(ef.StopRun, match="class '0' has only 20 training images; use at most 20 shots"):
        ef.sample_split(labels, 0, shots=49)


def test_split_file_formats(tmp_path):
    """SimCLR lines (class from the wnid prefix), Layer Grafted lines (class from the folder), bare unique names."""
    for wnid in ("n01440764", "n01443537"):
        os.makedirs(tmp_path / "train" / wnid)
        for i in range(3):
            (tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(b"")  # only scanned, never decoded
    (tmp_path / "train" / "n01443537" / "extra.JPEG").write_bytes(b"")
    train = datasets.ImageFolder(str(tmp_path / "train"))  # sorted: n01440764_0..2, extra, n01443537_0..2
    (tmp_path / "split.txt").write_text("n01443537_2.JPEG\ntrain/n01440764/n01440764_1.JPEG 0\n\nextra.JPEG\n")
    assert ef.read_split_file(str(tmp_path / "split.txt"), train).tolist() == [1, 3, 6]
    (tmp_path / "bad.txt").write_text("n01443537_2.JPEG\nn01440764_9.JPEG\n")
    with pytest.raises(ef.StopRun, match="names 1 images that are not in .*first: n01440764_9.JPEG"):
        ef.read_split_file(str(tmp_path / "bad.txt"), train)


def test_mean_ci95_is_the_t_interval():
    from scipy import stats
    for vals in ([60.1, 61.3], [60.1, 61.3, 59.8], [float(v) for v in range(40)]):
        mean, half = ef.mean_ci95(vals)
        ref = stats.t.interval(0.95, len(vals) - 1, loc=mean, scale=stats.sem(vals))
        assert abs(mean + half - ref[1]) < 1e-3 * max(1, half), (vals, half, ref)
    assert ef.mean_ci95([65.5]) == (65.5, None)


def tiny_encoder():
    torch.manual_seed(0)
    return vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def tiny_images(n=7):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n))  # label = index


def _ddp_worker(rank, world_size, out, image_root, checkpoint, port2):
    """Both torchrun checks in one pair of processes: extract_dataset alone, then the whole script."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    model, data = tiny_encoder(), tiny_images()
    full = ef.extract_dataset(model, data, torch.device("cpu"), batch_size=2)
    part = ef.extract_dataset(model, data, torch.device("cpu"), indices=[6, 0, 3, 4, 5], batch_size=2, feature="mean")
    torch.save({"full": full, "part": part}, os.path.join(out, f"r{rank}.pt"))
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port2)  # a fresh port: re-using the first store's port can hang gloo's init
    ef.main(eval_args(image_root, checkpoint, "--shots", "3", "--seeds", "0,1", "--protocol", "logreg,knn",
                      "--json", os.path.join(out, "ddp.json")))


@pytest.fixture(scope="module")
def ddp_run(image_root, mae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ddp(_ddp_worker, str(out), image_root, str(mae_run / "encoder.pt"), free_port())
    return out


def test_ddp_extraction_equals_one_process_without_duplicates(ddp_run):
    """7 images over 2 gloo ranks (4 + 3; DistributedSampler would pad to 8), and 5 chosen ones (3 + 2)."""
    tmp_path = ddp_run
    model, data = tiny_encoder(), tiny_images()
    x, y = ef.extract_dataset(model, data, torch.device("cpu"), batch_size=7)
    xp, yp = ef.extract_dataset(model, data, torch.device("cpu"), indices=[6, 0, 3, 4, 5], feature="mean")
    assert x.shape == (7, 64) and xp.shape == (5, 64)
    for r in (0, 1):  # every rank ends with the whole list
        got = torch.load(tmp_path / f"r{r}.pt")
        assert got["full"][1].tolist() == list(range(7)) and got["part"][1].tolist() == [6, 0, 3, 4, 5]
        assert torch.allclose(got["full"][0], x, atol=1e-5) and torch.allclose(got["part"][0], xp, atol=1e-5)


@pytest.fixture(scope="module")
def mae_run(image_root, tmp_path_factory):
    """encoder.pt and checkpoint.pt of a 1-epoch vit_tiny MAE on the real-image folder."""
    out = tmp_path_factory.mktemp("mae")
    torch.set_num_threads(1)
    mae.main(["--data", image_root, "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8",
              "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--decoder-embed-dim", "32",
              "--decoder-depth", "1", "--decoder-num-heads", "2", "--num-workers", "0", "--output-dir", str(out)])
    return out


def eval_args(data, checkpoint, *extra):
    return ["--checkpoint", str(checkpoint), "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8",
            "--data", data, "--num-workers", "0", "--batch-size", "64", *extra]


def test_cli_end_to_end(image_root, mae_run, tmp_path, capsys):
    torch.set_num_threads(1)
    protocols = ["--shots", "2", "--seeds", "0,1", "--protocol", "logreg,knn,linear", "--cache", str(tmp_path / "c")]
    ef.main(eval_args(image_root, mae_run / "encoder.pt", *protocols, "--json", str(tmp_path / "enc.json")))
    res = json.loads((tmp_path / "enc.json").read_text())
    assert [(r["protocol"], r["split"]) for r in res["rows"]] == [("logreg", "2-shot"), ("knn", "2-shot"),
                                                                    ("linear", "2-shot")]
    for r in res["rows"]:
        assert r["n_train"] == 20 and r["n_val"] == 80 and r["seeds"] == [0, 1] and len(r["top1_per_seed"]) == 2
        assert r["top1_mean"] == pytest.approx(sum(r["top1_per_seed"]) / 2) and r["top1_ci95"] is not None
    # the numbers are the classifiers' on this encoder's features of the drawn splits, rebuilt here by hand
    enc = vit.vit_tiny(img_size=32, patch_size=8)
    vit.load_pretrained(enc, str(mae_run / "encoder.pt"), verbose=False)
    tf = ef.eval_transform(32)
    train = datasets.ImageFolder(os.path.join(image_root, "train"), tf)
    val = datasets.ImageFolder(os.path.join(image_root, "val"), tf)
    labels = ef.targets_of(train)
    draws = {s: ef.sample_split(labels, s, shots=2) for s in (0, 1)}
    assert not torch.equal(draws[0], draws[1])
    used = torch.cat(list(draws.values())).unique()  # extracted as main() does: the same images in the same batches
    used_x, _ = ef.extract_dataset(enc, train, torch.device("cpu"), used, batch_size=64)
    val_x, val_y = ef.extract_dataset(enc, val, torch.device("cpu"), batch_size=64)
    row = {int(i): j for j, i in enumerate(used)}
    for seed in (0, 1):
        tx = used_x[[row[int(i)] for i in draws[seed]]]
        knn = ef.knn_accuracy(tx, labels[draws[seed]], val_x, val_y)
        logreg = ef.logreg_accuracy(tx, labels[draws[seed]], val_x, val_y)
        assert res["rows"][1]["top1_per_seed"][seed] == round(100 * knn, 4)
        assert res["rows"][0]["top1_per_seed"][seed] == pytest.approx(100 * logreg, abs=1e-3)
    assert all(i["iterations"] >= 1 for i in res["rows"][0]["logreg"])
    assert res["checkpoint"].endswith("encoder.pt") and res["args"]["model"] == "vit_tiny"
    assert res["versions"]["torch"] == torch.__version__ and res["device"].startswith("cpu")
    assert res["command"] and res["world_size"] == 1 and res["checkpoint_bytes"] > 0

    # the full training checkpoint holds the same encoder: the same numbers (its own cache entry: another file)
    res2 = ef.main(eval_args(image_root, mae_run / "checkpoint.pt", *protocols))
    assert [r["top1_per_seed"] for r in res2["rows"]] == [r["top1_per_seed"] for r in res["rows"]]

    # a second protocol on cached features extracts nothing
    capsys.readouterr()
    knn10 = ef.main(eval_args(image_root, mae_run / "encoder.pt", "--percent", "10", "--seeds", "0",
                              "--protocol", "knn", "--cache", str(tmp_path / "c")))
    out = capsys.readouterr().out
    assert "val: 80 images, 80 from the cache, 0 to extract" in out and "0 to extract" in out.split("train:")[1]
    # a cache file cut short (a crash while writing it elsewhere): a note, extracted again, the same numbers
    for f in os.listdir(tmp_path / "c"):
        (tmp_path / "c" / f).write_bytes(b"cut short")
    again = ef.main(eval_args(image_root, mae_run / "encoder.pt", "--percent", "10", "--seeds", "0",
                              "--protocol", "knn", "--cache", str(tmp_path / "c")))
    out = capsys.readouterr().out
    assert "is unreadable (" in out and "val: 80 images, 0 from the cache, 80 to extract" in out
    assert again["rows"][0]["top1_per_seed"] == knn10["rows"][0]["top1_per_seed"]

    # random-init baseline
    base = ef.main(eval_args(image_root, "random", "--shots", "1", "--seeds", "0", "--protocol", "knn"))
    assert base["rows"][0]["n_train"] == 10 and "checkpoint_bytes" not in base


def test_torchrun_cli_equals_one_process(image_root, mae_run, ddp_run):
    """The whole script under 2 gloo processes (160 train / 80 val images split 80+80 / 40+40, 30 used train
    images 15+15): rank 0 reports the numbers of a single process."""
    tmp_path = ddp_run
    one = ef.main(eval_args(image_root, mae_run / "encoder.pt", "--shots", "3", "--seeds", "0,1", "--protocol",
                            "logreg,knn"))
    two = json.loads((tmp_path / "ddp.json").read_text())
    assert two["world_size"] == 2 and [r["n_val"] for r in two["rows"]] == [80, 80]
    for a, b in zip(one["rows"], two["rows"]):
        assert a["top1_per_seed"] == pytest.approx(b["top1_per_seed"], abs=1.5), (a, b)  # at most one image of 80


def test_bad_input_one_line_errors(image_root, mae_run, tmp_path):
    enc = mae_run / "encoder.pt"
    (tmp_path / "split.txt").write_text("train/airplane/not_there.jpg 0\n")
    with pytest.raises(ef.StopRun, match="names 1 images that are not in"):
        ef.main(eval_args(image_root, enc, "--split-file", str(tmp_path / "split.txt")))
    with pytest.raises(ef.StopRun, match="--shots 17: class .* has only 16 training images"):
        ef.main(eval_args(image_root, enc, "--shots", "2,17"))
    os.makedirs(tmp_path / "noval" / "val" / "airplane")  # val/ with a class folder but no image
    os.symlink(os.path.join(image_root, "train"), tmp_path / "noval" / "train")
    with pytest.raises(ef.StopRun, match="val holds no class folders with images"):
        ef.main(eval_args(str(tmp_path / "noval"), enc, "--shots", "1"))
    with pytest.raises(ef.StopRun, match="not found"):
        ef.main(eval_args(image_root, tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ef.StopRun, match="cannot read .*junk.pt as a file of weights"):
        ef.main(eval_args(image_root, tmp_path / "junk.pt"))


def test_cli_checkpoint_of_another_model_is_one_line(image_root, mae_run):
    code = run_as_main("eval_fewshot.py", [*eval_args(image_root, mae_run / "encoder.pt"), "--model", "vit_small"])
    assert isinstance(code, str) and "\n" not in code, code
    assert code.startswith("error: --checkpoint") and "another model" in code, code


# Flag values no evaluation can use: each stops in get_args, before anything is read, with the flag, its value and
# the rule. Before, --knn-t 0 / nan, --knn-k 0 and --lambd nan printed a top-1 of 10.00 (chance) and exited 0.
BAD_FLAGS = [
    (["--knn-t", "0"], "--knn-t 0.0: must be a positive number"),
    (["--knn-t", "nan"], "--knn-t nan: must be a positive number"),
    (["--knn-k", "0"], "--knn-k 0: must be >= 1"),
    (["--protocol", "logreg", "--lambd", "nan"], "--lambd nan: must be a positive number"),
    (["--lambd", "0"], "--lambd 0.0: must be a positive number"),
    (["--max-iter", "0"], "--max-iter 0: must be >= 1"),
    (["--linear-lr", "inf"], "--linear-lr inf: must be a positive number"),
    (["--linear-epochs", "0"], "--linear-epochs 0: must be >= 1"),
    (["--linear-batch-size", "1"], "--linear-batch-size 1: must be >= 2"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--num-workers", "-1"], "--num-workers -1: must be >= 0"),
    (["--img-size", "30", "--patch-size", "4"], "--patch-size 4: must divide --img-size 30"),
    (["--patch-size", "0"], "--patch-size 0: must be >= 1"),
    (["--num-heads", "0"], "--num-heads 0: must be >= 1"),
    (["--percent", "abc"], "--percent abc: takes numbers in (0, 100]"),
    (["--percent", "1,150"], "--percent 1,150: takes numbers in (0, 100]"),
    (["--shots", "2,x"], "--shots 2,x: takes integers >= 1"),
    (["--shots", "0"], "--shots 0: takes integers >= 1"),
    (["--seeds", "abc"], "--seeds abc: takes integers >= 0 and < 2**63"),
    (["--seeds", "1180591620717411303424"], "--seeds 1180591620717411303424: takes integers >= 0 and < 2**63"),
    (["--seeds", "-1"], "--seeds -1: takes integers >= 0 and < 2**63"),
    (["--seeds", ","], "--seeds ,: takes integers >= 0 and < 2**63"),
    (["--protocol", "knn,svm"], "--protocol knn,svm: takes logreg, knn, linear"),
]


def test_bad_flags_one_line_errors(monkeypatch):
    base = ["--checkpoint", "random", "--data", "unused"]
    for extra, message in BAD_FLAGS:
        with pytest.raises(ef.StopRun) as e:
            ef.get_args(base + extra)
        assert str(e.value) == message, (extra, str(e.value))
    monkeypatch.setenv("WORLD_SIZE", "3")  # under torchrun: --batch-size is global
    with pytest.raises(ef.StopRun, match="--batch-size 256: is global: divide it by the 3 processes"):
        ef.get_args(base)
    monkeypatch.delenv("WORLD_SIZE")
    args = ef.get_args([*base, "--seeds", " 0, 5 ", "--protocol", "knn, linear", "--shots", "1,2"])  # the good ones
    assert args.seeds == [0, 5] and args.protocol == ["knn", "linear"] and args.shots == [1, 2] and args.percent is None
    assert ef.get_args(base).percent == [1.0] and ef.get_args(base).seeds == [0, 1, 2]  # the defaults
    # through the script: one line, "error: ..."
    assert run_as_main("eval_fewshot.py", [*base, "--knn-t", "0"]) == "error: --knn-t 0.0: must be a positive number"
    assert run_as_main("eval_fewshot.py", [*base, "--percent", "abc"]) == \
        "error: --percent abc: takes numbers in (0, 100]"


def test_sizes_the_model_cannot_take_are_one_line(image_root):
    """--img-size 30 with the model's own patch size (16): vit.py's assertion, as one line."""
    with pytest.raises(ef.StopRun, match="--model vit_tiny: img_size 30 is not a multiple of patch_size 16"):
        ef.main(["--checkpoint", "random", "--model", "vit_tiny", "--img-size", "30", "--data", image_root])


def test_non_finite_features_report_no_accuracy(image_root, tmp_path):
    """An all-NaN checkpoint (a diverged run) used to give 10.00 (chance) and exit 0: now no number, one line."""
    enc = vit.vit_tiny(img_size=32, patch_size=8)
    torch.save({k: torch.full_like(v, math.nan) for k, v in enc.state_dict().items()}, tmp_path / "nan.pt")
    with pytest.raises(ef.StopRun, match=r"nan.pt: its features hold NaN or inf .*no accuracy is computed"):
        ef.main(eval_args(image_root, tmp_path / "nan.pt", "--shots", "1", "--seeds", "0", "--protocol", "knn",
                          "--json", str(tmp_path / "nan.json")))
    assert not (tmp_path / "nan.json").exists()


def test_output_paths_one_line_errors(image_root, tmp_path, monkeypatch, capsys):
    quick = ["--shots", "1", "--seeds", "0", "--protocol", "knn"]
    (tmp_path / "file").write_text("a file, not a folder")
    # a folder under a file: refused before the model, the images or any feature
    for flag in ("--cache", "--json"):
        with pytest.raises(ef.StopRun, match=f"^{flag}: cannot make the folder .*file.*; pass another path"):
            ef.main(eval_args(image_root, "random", *quick, flag, str(tmp_path / "file" / "x" / "y")))
    assert "features" not in capsys.readouterr().out
    # a full disk under --json (/dev/full): the results are printed, then one line instead of a traceback
    if os.path.exists("/dev/full"):
        with pytest.raises(ef.StopRun, match="--json /dev/full: cannot write it .*; the results are printed above"):
            ef.main(eval_args(image_root, "random", *quick, "--json", "/dev/full"))
        assert "knn       1-shot" in capsys.readouterr().out

    # a full disk under --cache: torch.save's RuntimeError (inline_container) is a note; the features are in memory
    def full(obj, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full)
    res = ef.main(eval_args(image_root, "random", *quick, "--cache", str(tmp_path / "c")))
    out = capsys.readouterr().out
    assert out.count("note: --cache: could not write") == 2 and "PytorchStreamWriter failed" in out  # train, val
    assert res["rows"][0]["protocol"] == "knn" and 0 <= res["rows"][0]["top1_mean"] <= 100
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".pt")]  # nothing half-written under the name


def test_ctrl_c_is_one_line(monkeypatch):
    def interrupted(**kw):
        raise KeyboardInterrupt
    monkeypatch.setitem(vit.MODELS, "vit_tiny", interrupted)  # Ctrl-C while the model is built
    try:
        code = run_as_main("eval_fewshot.py", ["--checkpoint", "random", "--model", "vit_tiny", "--data", "unused"])
    except KeyboardInterrupt:  # a traceback; raised on, it would also end pytest's session
        pytest.fail("Ctrl-C came out as a KeyboardInterrupt traceback, not one line")
    assert code.startswith("error: stopped by Ctrl-C") and "\n" not in code, code


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **kw):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises((ef.StopRun, SystemExit), match="could not download"):
        ef.main(["--checkpoint", "random", "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8",
                           "--data", "cifar10", "--data-root", str(tmp_path), "--shots", "1"])
