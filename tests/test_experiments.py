"""experiments/table.py end to end at toy size: every row trained (2 steps of ViT-T/8 on a few CIFAR images) and
evaluated with its commands in the JSON, a done row skipped, a --max-minutes stop and a stale command refused in one
line, the markdown written. The numbers of a toy table mean nothing; the harness must not rot. In-process (no
training): its flags' one-line errors, and what it says of a row whose training script failed."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "experiments", "table.py")
ROWS = ["random", "mae", "moco", "graft", "mimco", "micl", "hybrid"]
TRAINED = ROWS[1:]
LABELS = ["random init", "MAE", "MoCo v3", "Layer Grafted", "MimCo", "MiCL", "hybrid (lam 0.2)"]


def table(*args, timeout=280):
    # One thread per process: on 2 cores shared with other work, 2-thread OpenMP spin-waits made this test 4x slower.
    return subprocess.run([sys.executable, TABLE, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def in_memory_everywhere():
    """--in-memory (issue #16) once every training script has it, so the toy runs the path the real presets run."""
    def has_flag(row):
        with open(os.path.join(ROOT, f"{row}.py")) as f:
            return '"--in-memory"' in f.read()
    return all(has_flag(r) for r in TRAINED)


def load_table():
    spec = importlib.util.spec_from_file_location("experiments_table", TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_flags_one_line_errors(image_root, tmp_path):
    """Each is refused in get_args, before anything runs, as one line (table.py prints it as `error: ...`)."""
    t = load_table()
    (tmp_path / "file").write_text("a file, not a folder")
    common = ["--preset", "toy", "--data", image_root, "--json", str(tmp_path / "r.json"), "--markdown",
              str(tmp_path / "r.md")]
    cases = [(["--measure", "-1"], "--measure -1.0: must be a positive number"),  # was a ZeroDivisionError
             (["--measure", "0"], "--measure 0.0: must be a positive number"),  # was: the table ran instead
             (["--max-minutes", "nan"], "--max-minutes nan: must be a positive number"),  # was accepted: never stops
             (["--max-minutes", "0"], "--max-minutes 0.0: must be a positive number"),
             (["--jobs", "0"], "--jobs 0: must be >= 1"),
             (["--jobs", "abc"], "argument --jobs: invalid int value: 'abc'"),  # argparse's own: one line too
             (["--markdown", str(tmp_path / "file" / "t.md")], f"--markdown {tmp_path / 'file' / 't.md'}: cannot "
              f"write there (File exists: {tmp_path / 'file'}); pass another path"),
             (["--json", str(tmp_path / "file" / "x")], f"--json {tmp_path / 'file' / 'x'}: cannot write there (File "
              f"exists: {tmp_path / 'file'}); pass another path")]
    for extra, message in cases:
        with pytest.raises(t.Stop) as e:
            t.get_args(common + extra)
        assert str(e.value) == message, (extra, str(e.value))
    with pytest.raises(t.Stop, match="the following arguments are required: --data"):
        t.get_args(["--preset", "toy"])
    args = t.get_args([*common, "--markdown", str(tmp_path / "new" / "t.md")])  # a missing folder is made
    assert os.path.isdir(tmp_path / "new") and os.listdir(tmp_path / "new") == []  # the test write left nothing
    assert args.markdown == str(tmp_path / "new" / "t.md")


def test_failed_row_says_what_its_checkpoint_can_do(image_root, tmp_path):
    """A training script that failed: with a damaged checkpoint.pt the table used to say it "keeps its progress and
    the same command resumes it"; it names the damage and the way out instead."""
    t = load_table()
    args = t.get_args(["--preset", "toy", "--data", image_root, "--runs-dir", str(tmp_path / "runs"), "--json",
                       str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    table = t.Table(args)
    out = tmp_path / "runs" / "mae"
    os.makedirs(out)

    def fail(rc=1):  # a fresh failure: the first one also stops the other rows (table.signal)
        table.state["rows"]["mae"], table.signal = {}, None
        return table.finish("mae", rc, {"started": "now", "device": "cpu"}, time.monotonic())
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    message = fail()
    assert message.startswith(f"row mae: mae.py failed (status 1): its {out / 'checkpoint.pt'} is damaged (")
    assert message.endswith("move it away (the row then starts from step 0) or pass --redo mae"), message
    assert "keeps its progress" not in message
    torch.save({"step": 3, "method": "mae", "args": {}, "images": 120, "model": {}}, out / "checkpoint.pt")
    message = fail()
    assert message.endswith(f"{out / 'checkpoint.pt'} keeps its progress: once that is fixed, the same command "
                            "resumes it"), message
    os.remove(out / "checkpoint.pt")
    assert fail().endswith("before its first save: the same command starts the row again")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"]["mae"]["status"] == "failed" and len(saved["rows"]["mae"]["pretrain"]["launches"]) == 1


def test_toy_table(image_root, tmp_path):
    runs, js, md = tmp_path / "runs", tmp_path / "results.json", tmp_path / "README.md"
    common = ["--preset", "toy", "--data", image_root, "--runs-dir", runs, "--json", js, "--markdown", md]
    common += ["--in-memory"] if in_memory_everywhere() else []

    # a --max-minutes that is over once the random row is evaluated: that row is kept, the next is not started
    r = table(*common, "--max-minutes", "0.005")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == "error: --max-minutes 0.005 reached before row mae; the same command resumes"
    stopped = json.loads(js.read_text())["rows"]
    assert stopped["random"]["status"] == "done" and "status" not in stopped["mae"]
    assert not (runs / "mae").exists()

    # the whole table: the random row is not evaluated again, every other row is trained (2 at once, to keep this
    # test short: the toy's wall-clocks overlap) and evaluated
    r = table(*common, "--jobs", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("done, skipped") == 1
    state = json.loads(js.read_text())
    assert state["preset"] == "toy" and state["settings"]["max_steps"] == 2 and state["scale_rules"]
    assert list(state["rows"]) == ROWS
    for name in ROWS:
        rec = state["rows"][name]
        assert rec["status"] == "done", (name, rec.get("status"))
        for key in ("knn_full", "logreg_1pct", "logreg_10shot"):
            m = rec["metrics"][key]
            assert math.isfinite(m["top1"]) and 0 <= m["top1"] <= 100, (name, key, m)
            assert m["n_val"] == 80
        assert rec["metrics"]["knn_full"]["n_train"] == 160  # the full train bank
        assert rec["metrics"]["logreg_1pct"]["n_train"] == 10 and rec["metrics"]["logreg_10shot"]["n_train"] == 100
        for key in ("logreg_1pct", "logreg_10shot"):  # several seeds, an interval
            assert len(rec["metrics"][key]["per_seed"]) == 5 and math.isfinite(rec["metrics"][key]["ci95"])
        assert rec["commands"]["eval_knn"].startswith("python eval_fewshot.py --checkpoint ")
        assert "--protocol knn --percent 100" in rec["commands"]["eval_knn"]
        assert "--protocol logreg --percent 1 --shots 10 --seeds 0,1,2,3,4" in rec["commands"]["eval_logreg"]
        assert rec["eval"]["device"]
    for name in TRAINED:
        rec, out = state["rows"][name], runs / name
        cmd = rec["commands"]["pretrain"]
        # pre-trained on the first 12 images of each class (linked into RUNS), evaluated on all 16
        assert cmd.startswith(f"python {name}.py --data $RUNS/train_12_per_class --output-dir $RUNS/{name} ")
        # the same encoder, images, epochs and batch for every row
        assert "--model vit_tiny --img-size 32 --patch-size 8 --batch-size 16 --epochs 1 " in cmd
        assert rec["pretrain"]["done"] and rec["pretrain"]["seconds"] > 0 and rec["pretrain"]["device"]
        assert rec["pretrain"]["steps"] == 2 and len(rec["pretrain"]["launches"]) == 1
        assert rec["pretrain"]["seconds"] == round(sum(x["seconds"] for x in rec["pretrain"]["launches"]), 1)
        assert (out / "encoder.pt").is_file() and (out / "eval_knn.json").is_file()
        assert f"--checkpoint $RUNS/{name}/encoder.pt" in rec["commands"]["eval_knn"]
    subset = runs / "train_12_per_class"
    assert sorted(os.listdir(subset / "train")) == sorted(os.listdir(os.path.join(image_root, "train")))
    assert all(len(os.listdir(subset / "train" / c)) == 12 for c in os.listdir(subset / "train"))
    assert "--mim-checkpoint $RUNS/mae/encoder.pt" in state["rows"]["graft"]["commands"]["pretrain"]
    mimco = state["rows"]["mimco"]["commands"]["pretrain"]
    assert "--teacher $RUNS/moco/encoder.pt --teacher-model vit_tiny --teacher-num-heads 3" in mimco
    assert "--mask-ratio 0.875" in state["rows"]["micl"]["commands"]["pretrain"]  # 16 patches: one per view
    assert state["rows"]["graft"]["pretrain"]["seconds_with_start_row"] > state["rows"]["graft"]["pretrain"]["seconds"]
    text = md.read_text()
    assert text.count("<!-- table:toy:start -->") == 1 and text.count("<!-- table:toy:end -->") == 1
    for label in LABELS:
        assert f"| {label} | " in text
    assert "python graft.py --data $RUNS/train_12_per_class" in text and "Still to run" not in text
    png = tmp_path / "results.png"  # the picture, next to the JSON and linked from the markdown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![the toy table](results.png)" in text

    # again: every row is done, so nothing is trained or evaluated (no torch start either)
    stamps = {n: (runs / n / "encoder.pt").stat().st_mtime_ns for n in TRAINED}
    t0 = time.monotonic()
    r = table(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < 20
    assert r.stdout.count("done, skipped") == len(ROWS)
    assert {n: (runs / n / "encoder.pt").stat().st_mtime_ns for n in TRAINED} == stamps
    again = json.loads(js.read_text())
    assert {n: again["rows"][n] for n in ROWS} == {n: state["rows"][n] for n in ROWS}
    assert (md.read_text().split("<!-- table:toy:start -->")[1] == text.split("<!-- table:toy:start -->")[1])

    # a row recorded with another command than the preset's is refused, in one line, before anything runs
    again["rows"]["moco"]["commands"]["pretrain"] += " --moco-t 0.1"
    js.write_text(json.dumps(again))
    r = table(*common, "--rows", "moco")
    assert r.returncode == 1 and r.stderr.startswith("error: row moco was run with another pretrain command"), r.stderr
    assert "--redo moco" in r.stderr and len(r.stderr.strip().splitlines()) == 1
