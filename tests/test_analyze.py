"""analyze.py: the measurements against slow formulas and known cases, k-NN against eval_fewshot, the CLI end to end
on real images, and its one-line errors."""
import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import analyze
import eval_fewshot
import vit


def random_attention(B=2, H=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, 1 + L, 1 + L, generator=g).mul(3).softmax(-1)


def test_attention_distance_slow_formula():
    attn = random_attention()
    B, H, N, _ = attn.shape
    grid, p = 4, 16
    expected = torch.zeros(H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            a = attn[b, h, 1:, 1:].double()
            a = a / a.sum(-1, keepdim=True)
            for q in range(N - 1):
                for k in range(N - 1):
                    d = p * math.hypot(q // grid - k // grid, q % grid - k % grid)
                    expected[h] += a[q, k] * d / ((N - 1) * B)
    assert torch.allclose(analyze.attention_distance(attn, p).double(), expected, atol=1e-4)
    eye = torch.eye(17).expand(1, 2, 17, 17)  # each patch attends only to itself
    assert torch.allclose(analyze.attention_distance(eye, 16), torch.zeros(2), atol=1e-6)


def test_attention_nmi_slow_formula_and_limits():
    attn = random_attention(B=1, H=2)
    for h in range(2):
        a = attn[0, h, 1:, 1:].double()
        a = a / a.sum(-1, keepdim=True)
        L = a.shape[0]
        pk = a.mean(0)
        mi = sum(a[q, k] / L * math.log(a[q, k] / pk[k]) for q in range(L) for k in range(L))
        hk = -sum(pk[k] * math.log(pk[k]) for k in range(L))
        assert abs(analyze.attention_nmi(attn)[h].item() - mi / math.sqrt(math.log(L) * hk)) < 1e-4
    uniform = torch.full((1, 1, 17, 17), 1 / 17)  # every query attends the same way: collapse, NMI 0
    assert analyze.attention_nmi(uniform).item() < 1e-6
    eye = torch.eye(17).expand(1, 1, 17, 17)  # every query attends a different key: NMI 1
    assert abs(analyze.attention_nmi(eye).item() - 1) < 1e-4


def test_fourier_against_numpy_and_limits():
    torch.manual_seed(0)
    z = torch.randn(2, 1 + 64, 5)
    spec = np.log(np.abs(np.fft.fft2(z[:, 1:].numpy().astype(np.float64).transpose(0, 2, 1).reshape(2, 5, 8, 8)))
                  + 1e-6)
    spec = np.fft.fftshift(spec, axes=(2, 3)).mean(axis=(0, 1))
    diag = np.diagonal(spec)[4:]
    assert abs(analyze.fourier_delta_log_amplitude(z) - (diag[-1] - diag[0])) < 1e-6
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.stack([torch.cos(2 * math.pi * (r + c) / 16) + 2] * 5, dim=-1).reshape(1, 64, 5)
    smooth = torch.cat([torch.zeros(1, 1, 5), smooth], 1)
    assert analyze.fourier_delta_log_amplitude(smooth) < analyze.fourier_delta_log_amplitude(z) - 3  # low-pass vs white



# ------------------------------------------------------------------------------------------------ attention maps

def test_attention_maps_sum_to_one_and_hand_built_case():
    attn = random_attention(B=2, H=3, L=16)
    maps = analyze.attention_maps(attn, [(0, 0), (1, 2), (3, 3)])
    assert maps.shape == (2, 3, 4, 4)
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, 3), atol=1e-5)
    # hand-built, 2 heads on a 2x2 grid: head 0 sends patch q to patch (q+1) % 4 with 0.5 and to CLS with 0.5 (CLS is
    # dropped and the row renormalized: 1 on the next patch), head 1 is uniform over the 5 tokens (1/4 per patch).
    a = torch.zeros(1, 2, 5, 5)
    for q in range(4):
        a[0, 0, 1 + q, 0], a[0, 0, 1 + q, 1 + (q + 1) % 4] = 0.5, 0.5
    a[0, 1] = 0.2
    maps = analyze.attention_maps(a, [(0, 1), (1, 1)])  # patches 1 and 3: heads' mean = 0.5 * one-hot + 0.5 * 1/4
    expected = torch.full((2, 4), 0.125)
    expected[0, 2] += 0.5  # patch 1 -> patch 2
    expected[1, 0] += 0.5  # patch 3 -> patch 0
    assert torch.allclose(maps[0], expected.reshape(2, 2, 2), atol=1e-6)


def test_attention_maps_of_a_model_with_predictable_attention():
    """Zero query/key weights make q.k = 0 for every pair: uniform attention, each map 1/L on every patch. A real
    model's map is not flat, so the model path (block choice, head mean) is what is tested."""
    torch.manual_seed(0)
    model = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    img = torch.randn(3, 32, 32)
    assert analyze.attention_maps_of(model, img, 3, [(1, 1)]).std() > 1e-4
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[:128] = 0  # the q and k rows of block 2 (width 64)
        model.blocks[1].attn.qkv.bias[:128] = 0
    flat = analyze.attention_maps_of(model, img, 2, [(0, 0), (2, 3)])
    assert flat.shape == (2, 4, 4) and torch.allclose(flat, torch.full((2, 4, 4), 1 / 16), atol=1e-6)
    assert analyze.attention_maps_of(model, img, 3, [(0, 0)]).std() > 1e-4  # block 3 untouched: not flat

# -------------------------------------------------------------------------------------------------------- CKA

def cka_hsic(x, y):
    """Kornblith et al.'s definition, slowly: HSIC of the centred linear Gram matrices, normalized."""
    n = len(x)
    H = torch.eye(n, dtype=torch.float64) - 1 / n
    K, L = H @ (x.double() @ x.double().T) @ H, H @ (y.double() @ y.double().T) @ H
    return float((K * L).sum() / ((K * K).sum() * (L * L).sum()).sqrt())


def test_linear_cka_identity_invariances_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) + 3  # an offset: centring must remove it
    y = x @ torch.randn(16, 24, generator=g, dtype=torch.float64) + 0.5 * torch.randn(200, 24, generator=g,
                                                                                 dtype=torch.float64)  # related
    assert abs(analyze.linear_cka(x, x) - 1) < 1e-9
    value = analyze.linear_cka(x, y)
    assert 0.2 < value < 0.99 and abs(value - cka_hsic(x, y)) < 1e-9
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    assert abs(analyze.linear_cka(x, y @ q) - value) < 1e-9  # orthogonal rotation of the features
    assert abs(analyze.linear_cka(7.5 * x, y) - value) < 1e-9  # isotropic scaling
    stretch = torch.ones(16, dtype=torch.float64)
    stretch[0] = 30.0  # an anisotropic scaling is not an invariance: the assertions above could fail
    assert abs(analyze.linear_cka(x * stretch, y) - value) > 1e-3
    independent = torch.randn(2000, 8, generator=g)
    assert analyze.linear_cka(torch.randn(2000, 8, generator=g), independent) < 0.02  # about d / n


def test_knn_equals_eval_fewshot():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g)
    train_y, test_y = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (120,), generator=g)
    train_x = centres[train_y] + 1.5 * torch.randn(300, 32, generator=g)
    test_x = centres[test_y] + 1.5 * torch.randn(120, 32, generator=g)
    for k, n_train in ((20, 300), (7, 300), (20, 12)):  # the last: k capped at the bank size
        ours = analyze.knn_accuracy(train_x[:n_train], train_y[:n_train], test_x, test_y, k)
        ref = eval_fewshot.knn_accuracy(train_x[:n_train], train_y[:n_train], test_x, test_y, k)
        assert ours == ref, (k, n_train)
    assert 0.3 < ours < 0.95  # neither trivial nor chance on these clusters

# --------------------------------------------------------------------------------------------------------- CLI

MINI = ["--model", "vit_mini", "--img-size", "32", "--patch-size", "8", "--num-images", "12", "--fourier-images", "6",
        "--probe-train", "60", "--probe-val", "40", "--queries", "1,1", "3,2", "--attn-image", "2"]
PICTURES = ["attention_distance.png", "attention_nmi.png", "fourier.png", "attention_maps.png", "probes_knn.png",
            "cka.png"]


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    torch.manual_seed(1)  # not the seed-0 init of 'random'
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    torch.save(enc.state_dict(), path)
    return enc, str(path)


def test_cli_end_to_end(image_root, saved_encoder, tmp_path):
    enc, path = saved_encoder
    out = tmp_path / "out"
    res = analyze.main(["--data", image_root, *MINI, "--checkpoint", f"ours={path}", "--checkpoint", "rand=random",
                        "--out", str(out)])
    saved = json.loads((out / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("versions", "device", "args", "command", "images", "results", "probes", "cka", "attention_maps"):
        assert key in saved, key
    assert set(saved["versions"]) >= {"torch", "torchvision", "python", "numpy", "matplotlib"}
    assert saved["versions"]["matplotlib"] is not None and saved["pictures"] == PICTURES
    for name in PICTURES:
        assert (out / name).stat().st_size > 5000, name  # a drawn figure, not an empty file
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(saved["results"]) == ["ours", "rand"]

    # the CLI's numbers are the functions' numbers on the images it names
    torch.manual_seed(0)
    rand = vit.MODELS["vit_mini"](img_size=32, patch_size=8)  # --checkpoint random is the seed-0 init
    imgs, paths = analyze.fixed_batch(image_root, 32, 12)
    assert saved["images"]["analysis"] == paths and len(set(paths)) == 12
    assert len({p.split(os.sep)[1] for p in paths}) >= 8  # spread evenly over the 10 classes of val/
    assert (saved["images"]["fourier"] == [paths[i] for i in analyze.spread(12, 6)]
            and len(saved["images"]["fourier"]) == 6)
    train_set, val_set, train_paths, val_paths = analyze.probe_sets(image_root, 32, 60, 40, 0)
    assert saved["images"]["probe_train"] == train_paths and saved["images"]["probe_val"] == val_paths
    assert len(train_paths) == 60 and all(p.startswith("train") for p in train_paths)
    feats = {}
    for name, model in (("ours", enc), ("rand", rand)):
        direct = analyze.analyze(model, imgs, 6)
        assert len(direct["attention_distance"]) == 3 and len(direct["fourier_dlogamp"]) == 4
        for metric, values in direct.items():
            assert res["results"][name][metric] == pytest.approx(values, abs=1e-6), (name, metric)
        maps = analyze.attention_maps_of(model, imgs[2], 3, [(1, 1), (3, 2)])  # default block: the last
        assert torch.allclose(torch.tensor(res["results"][name]["attention_maps"]), maps, atol=1e-6)
        tx, ty = analyze.block_features(model, train_set, torch.device("cpu"))
        vx, vy = analyze.block_features(model, val_set, torch.device("cpu"))
        assert torch.allclose(vx[-1], model.forward_features(torch.stack([val_set[i][0] for i in range(40)]))[:, 1:]
                              .mean(1), atol=1e-5)  # the last block's feature is eval_fewshot's --feature mean
        knn = [100 * eval_fewshot.knn_accuracy(a, ty, b, vy) for a, b in zip(tx, vx)]
        assert res["probes"]["top1"][name] == pytest.approx(knn, abs=1e-9), name
        feats[name] = vx
    pair = res["cka"]["pairs"]
    assert len(pair) == 1 and (pair[0]["a"], pair[0]["b"]) == ("ours", "rand")
    assert np.allclose(pair[0]["matrix"], analyze.cka_matrix(feats["ours"], feats["rand"]), atol=1e-9, rtol=0)
    assert res["results"]["ours"]["attention_distance"] != pytest.approx(res["results"]["rand"]["attention_distance"],
                                                                         abs=1e-3)


def test_cli_without_matplotlib_writes_json_and_says_so(image_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "out"
    res = analyze.main(["--data", image_root, *MINI, "--checkpoint", "rand=random", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["analysis.json"]
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["pictures"] is None and saved["versions"]["matplotlib"] is None
    assert saved["cka"]["pairs"][0]["a"] == saved["cka"]["pairs"][0]["b"] == "rand"  # a lone model: itself
    assert saved["cka"]["pairs"][0]["matrix"][1][1] == pytest.approx(1.0)
    assert saved["results"] == json.loads(json.dumps(res["results"]))
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_help_documents_every_flag():
    parser = analyze.get_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    text = parser.format_help()
    for flag in ("--checkpoint", "--model", "--img-size", "--patch-size", "--queries", "--attn-block", "--out"):
        assert flag in text


def exit_message(argv):
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def bad_roots(image_root, tmp_path_factory):
    """An empty folder, a root without train/, and a copy of image_root with one unreadable JPEG."""
    base = tmp_path_factory.mktemp("bad")
    os.makedirs(base / "empty" / "val")
    shutil.copytree(os.path.join(image_root, "val"), base / "noval_train" / "val")
    shutil.copytree(image_root, base / "broken")
    cls = sorted(os.listdir(base / "broken" / "val"))[0]
    victim = base / "broken" / "val" / cls / sorted(os.listdir(base / "broken" / "val" / cls))[0]
    victim.write_bytes(b"not a jpeg at all")
    return base, victim


def test_bad_input_one_line_errors(image_root, saved_encoder, bad_roots, tmp_path):
    _, path = saved_encoder
    base, victim = bad_roots
    ok = ["--data", image_root, *MINI]
    wrong_size = tmp_path / "tiny.pt"
    torch.save(vit.vit_tiny(img_size=32, patch_size=8).state_dict(), wrong_size)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    cases = [
        (["--data", str(tmp_path / "nowhere"), *MINI, "--checkpoint", "r=random"], "no such folder"),
        (["--data", str(base / "empty"), *MINI, "--checkpoint", "r=random"], "no class folders"),
        (["--data", str(base / "noval_train"), *MINI, "--checkpoint", "r=random"], "no 'train' folder"),
        (["--data", str(base / "broken"), *MINI, "--checkpoint", "r=random"], f"cannot read image {victim}"),
        ([*ok, "--checkpoint", path], "expected NAME=PATH"),
        ([*ok, "--checkpoint", "=random"], "expected NAME=PATH"),
        ([*ok, "--checkpoint", "a=random", "--checkpoint", f"a={path}"], "used twice"),
        ([*ok, "--checkpoint", f"a={tmp_path / 'missing.pt'}"], "not found"),
        ([*ok, "--checkpoint", f"a={garbage}"], "cannot read"),
        ([*ok, "--checkpoint", f"a={wrong_size}"], "another model"),
        ([*ok, "--checkpoint", "a=random", "--num-images", "0"], "--num-images 0: must be at least 1"),
        ([*ok, "--checkpoint", "a=random", "--probe-train", "-3"], "--probe-train -3"),
        ([*ok, "--checkpoint", "a=random", "--queries", "4,0"], "outside the 4x4 patch grid"),
        ([*ok, "--checkpoint", "a=random", "--queries", "two"], "expected ROW,COL"),
        ([*ok, "--checkpoint", "a=random", "--attn-block", "4"], "blocks 1 to 3"),
        ([*ok, "--checkpoint", "a=random", "--attn-image", "12"], "--attn-image 12"),
        ([*ok, "--checkpoint", "a=random", "--patch-size", "5"], "not a multiple"),
        ([*ok, "--checkpoint", "a=random", "--seed", "1180591620717411303424"],
         "--seed 1180591620717411303424: must be >= 0 and < 2**63"),
        ([*ok, "--checkpoint", "a=random", "--seed", "-1"], "--seed -1: must be >= 0 and < 2**63"),
    ]
    for argv, expected in cases:
        assert expected in exit_message(argv), (argv, expected)


def test_out_is_checked_before_any_work(image_root, tmp_path, monkeypatch):
    """--out under a file, or on a full disk, used to fail only after the whole analysis: now before any image is
    read; a disk that fills up during the run still gives one line (after the tables)."""
    (tmp_path / "file").write_text("a file, not a folder")
    argv = ["--data", image_root, *MINI, "--checkpoint", "r=random"]

    def too_late(*a, **kw):
        raise AssertionError("the analysis started before --out was checked")
    with monkeypatch.context() as m:
        m.setattr(analyze, "fixed_batch", too_late)
        assert "--out" in exit_message([*argv, "--out", str(tmp_path / "file" / "out")])
        assert "cannot write there" in exit_message([*argv, "--out", str(tmp_path / "file" / "out")])

        def full(*a, **kw):
            raise OSError(28, "No space left on device")
        m.setattr(analyze.tempfile, "TemporaryFile", full)
        assert exit_message([*argv, "--out", str(tmp_path / "out")]) == \
            f"error: --out {tmp_path / 'out'}: cannot write there (No space left on device); pass another folder"

    def full_later(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(analyze, "draw_pictures", full_later)
    message = exit_message([*argv, "--out", str(tmp_path / "out2")])
    assert message.endswith("writing the results failed (No space left on device); the tables above hold the numbers")
    assert not (tmp_path / "out2" / "analysis.json").exists()


def test_ctrl_c_is_one_line(image_root, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(analyze, "fixed_batch", interrupted)
    try:
        message = exit_message(["--data", image_root, *MINI, "--checkpoint", "r=random"])
    except KeyboardInterrupt:  # a traceback; raised on, it would also end pytest's session
        pytest.fail("Ctrl-C came out as a KeyboardInterrupt traceback, not one line")
    assert message.startswith("error: stopped by Ctrl-C"), message


def test_non_finite_numbers_are_never_reported(image_root, tmp_path, capsys):
    """An all-NaN checkpoint printed nan tables and an 18% k-NN, status 0: now one line and no table. A finite one
    whose numbers are not (all-zero weights: every block's feature is the same vector, CKA = 0 / 0) stops too."""
    enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
    torch.save({k: torch.full_like(v, math.nan) for k, v in enc.state_dict().items()}, tmp_path / "nan.pt")
    torch.save({k: torch.zeros_like(v) for k, v in enc.state_dict().items()}, tmp_path / "zero.pt")
    argv = ["--data", image_root, *MINI, "--out", str(tmp_path / "out")]
    message = exit_message([*argv, "--checkpoint", f"bad={tmp_path / 'nan.pt'}"])
    assert message == f"error: --checkpoint bad={tmp_path / 'nan.pt'}: its weights hold NaN or inf (a diverged " \
                      f"run?); pass another checkpoint"
    capsys.readouterr()
    message = exit_message([*argv, "--checkpoint", f"zero={tmp_path / 'zero.pt'}"])
    assert message.startswith("error: analysis.cka.pairs[0].matrix[0][0] is NaN or inf, so no table"), message
    assert "linear CKA" not in capsys.readouterr().out and not (tmp_path / "out" / "analysis.json").exists()
    hybrid_nan = tmp_path / "hybrid.pt"
    import hybrid
    hargs = hybrid.get_args(["--data", image_root, "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
                             "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2",
                             "--moco-dim", "16", "--moco-mlp-dim", "32"])
    model = hybrid.build_model(hargs, verbose=False)
    torch.save({"model": {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                          for k, v in model.state_dict().items()},
                "optimizer": {}, "method": "hybrid", "step": 0, "args": vars(hargs)}, hybrid_nan)
    assert "its weights hold NaN or inf" in exit_message([*argv, "--checkpoint", "r=random", "--conflict",
                                                         f"h={hybrid_nan}"])


def test_non_finite_finder():
    assert analyze.non_finite({"a": [1.0, 2.0], "b": {"c": [[0.5, float("inf")]]}}, "x") == "x.b.c[0][1]"
    assert analyze.non_finite({"a": [1.0, "text", None, 3], "b": {"c": [[0.5]]}}, "x") is None
    assert analyze.non_finite([float("nan")], "x") == "x[0]"


def test_pictures_say_what_was_measured_and_label_the_papers_claims(monkeypatch, tmp_path):
    """Each picture's title says what was measured, on how many images; a paper's finding is only ever quoted as the
    paper's (the CPU demo's data show no such trend: the title must not state it as what is drawn)."""
    from matplotlib.figure import Figure
    titles = {}

    def record(fig, path, *a, **kw):
        texts = [ax.get_title() for ax in fig.axes if ax.get_title()]
        titles[os.path.basename(path)] = texts + ([fig._suptitle.get_text()] if fig._suptitle else [])
    monkeypatch.setattr(Figure, "savefig", record)
    blocks = {"attention_distance": [10.0, 12.0], "attention_nmi": [0.2, 0.1], "fourier_dlogamp": [-3.0, -2.0, -1.0],
              "attention_maps": [[[0.25, 0.25], [0.25, 0.25]]]}
    report = {"results": {"a": blocks, "b": blocks}, "images": {"analysis": ["x"] * 60, "fourier": ["x"] * 16},
              "attention_maps": {"queries": [[0, 0]], "block": 2}, "cka": {"pairs": [{"a": "a", "b": "b",
              "matrix": [[1.0, 0.5], [0.5, 1.0]]}]}, "probes": {"top1": {"a": [20.0, 30.0], "b": [25.0, 28.0]},
              "n_train": 200, "n_val": 100},
              "conflict": {"h": {"layers": ["embed", "1", "2", "norm"], "cosine_per_batch": [[0.1, 0.0, -0.1, 0.2]] * 3,
                                 "lam": 0.2, "batches": 3, "batch_size": 8}}}
    written = analyze.draw_pictures(str(tmp_path), report, torch.zeros(3, 16, 16), 8)
    assert sorted(titles) == sorted(written) == sorted(PICTURES + ["conflict.png"])
    claims = ("CL", "MIM", "MoCo", "SimMIM", "deeper", "collapse")
    for name, texts in titles.items():
        lines = [line for text in texts for line in text.splitlines()]
        for line in lines:  # a line that states a finding names whose it is
            if any(word in line for word in claims):
                quoted = line.startswith(("Park et al. report", "Layer Grafted reports"))
                assert quoted or "grad CL" in line, (name, line)
    assert "60 images" in titles["attention_distance.png"][0] and "16 images" in titles["fourier.png"][0]
    assert "200 train, 100 val images" in titles["probes_knn.png"][0]
    assert "3 x 8 images" in titles["conflict.png"][0]


def test_gradient_conflict_cosines_and_cli(image_root, tmp_path):
    """cos = 1 for a loss against itself, -1 against its negative; the CLI's --conflict numbers equal the function's
    on a hybrid.py checkpoint and at init, and conflict.png is drawn."""
    import hybrid
    hargs = hybrid.get_args(["--data", image_root, "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
                             "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2",
                             "--moco-dim", "16", "--moco-mlp-dim", "32", "--batch-size", "8", "--seed", "3"])
    model = hybrid.build_model(hargs, verbose=False)
    groups = analyze.encoder_groups(model.encoder)
    assert list(groups) == ["embed", "1", "2", "3", "norm"]
    x = torch.randn(4, 3, 32, 32)
    _, loss_mim, loss_cl = model(x, x.flip(-1), x.flip(-2), 1.0)
    same = analyze.grad_cosines(loss_mim, loss_mim, groups)
    opposite = analyze.grad_cosines(loss_mim, -loss_mim, groups)
    mixed = analyze.grad_cosines(loss_mim, loss_cl, groups)
    assert (all(v == pytest.approx(1.0) for v in same.values())
            and all(v == pytest.approx(-1.0) for v in opposite.values()))
    assert all(-1 < v < 1 for v in mixed.values())
    torch.save({"model": model.state_dict(), "optimizer": {}, "method": "hybrid", "step": 0, "args": vars(hargs)},
               tmp_path / "checkpoint.pt")
    res = analyze.main(["--data", image_root, "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
                        "--checkpoint", "r=random", "--num-images", "8", "--fourier-images", "4", "--probe-train", "20",
                        "--probe-val", "10", "--conflict", f"h={tmp_path / 'checkpoint.pt'}",
                        "--conflict", "init=random", "--conflict-batches", "2", "--conflict-batch-size", "4",
                        "--out", str(tmp_path / "out")])
    cli_args = argparse.Namespace(**res["args"])
    direct = analyze.gradient_conflict(*analyze.load_hybrid(cli_args, "h", str(tmp_path / "checkpoint.pt")),
                                       torch.device("cpu"), 2, 4)
    assert res["conflict"]["h"]["cosine_per_batch"] == direct["cosine_per_batch"]
    assert len(direct["cosine_per_batch"]) == 2 and len(direct["cosine_per_batch"][0]) == 5
    assert res["conflict"]["h"]["cosine_per_batch"] != res["conflict"]["init"]["cosine_per_batch"]
    assert (tmp_path / "out" / "conflict.png").stat().st_size > 5000
    torch.save({"model": {}, "method": "mae", "step": 0, "args": {}}, tmp_path / "mae.pt")
    for bad in (tmp_path / "missing.pt", tmp_path / "mae.pt"):
        with pytest.raises(SystemExit, match="not a hybrid.py checkpoint.pt"):
            analyze.main(["--data", image_root, "--model", "vit_mini", "--img-size", "32", "--patch-size", "8",
                          "--checkpoint", "r=random", "--conflict", f"x={bad}"])
