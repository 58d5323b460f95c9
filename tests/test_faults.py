"""Runs that survive preemption and bad input, in every training script: killed (SIGKILL) or stopped (SIGTERM) at
steps drawn from a seed, a run resumed with the same command ends with the same weights as one never interrupted;
several processes stop together and torchrun's restarts resume; no non-finite weights are ever saved; every bad input
of the catalogue is one line that names the flag or file and the fix."""
import contextlib
import fcntl
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

import graft
import hybrid
import mae
import micl
import mimco
import moco
import vit
from helpers import run_as_main, run_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"mae": mae, "moco": moco, "graft": graft, "mimco": mimco, "micl": micl, "hybrid": hybrid}
# 160 images / batch 32 = 5 steps per epoch, 10 in all; a log line and a checkpoint after every step.
COMMON = ["--model", "vit_mini", "--img-size", "32", "--patch-size", "8", "--batch-size", "32", "--epochs", "2",
          "--warmup-epochs", "1", "--blr", "1e-3", "--num-workers", "0", "--log-every", "1",
          "--save-every-minutes", "1e-9"]
HEADS = ["--moco-dim", "16", "--moco-mlp-dim", "32"]
DECODER = ["--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A MIM encoder for graft.py and a contrastive teacher for mimco.py, as mae.py and moco.py write them."""
    d = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(1)
    for method in ("mae", "moco"):
        enc = vit.MODELS["vit_mini"](img_size=32, patch_size=8)
        torch.save({"model": enc.state_dict(), "method": method, "args": {"model": "vit_mini", "num_heads": 2}},
                   d / f"{method}_encoder.pt")
    return d


def argv(script, data, out, stage1, *extra):
    own = {"mae": DECODER, "moco": HEADS, "micl": ["--patch-size", "4"], "hybrid": DECODER + HEADS,
           "graft": HEADS + ["--mim-checkpoint", str(stage1 / "mae_encoder.pt")],
           "mimco": DECODER + ["--teacher", str(stage1 / "moco_encoder.pt"), "--teacher-model", "vit_mini",
                               "--head-hidden-dim", "64"]}[script]
    return ["--data", str(data), "--output-dir", str(out), *COMMON, *own, *map(str, extra)]


def weights(out):
    """Everything checkpoint.pt keeps (model incl. momentum encoders and BN statistics, optimizer), and encoder.pt."""
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    enc = torch.load(os.path.join(out, "encoder.pt"), weights_only=True)
    return ckpt["step"], ckpt["model"], ckpt["optimizer"]["state"], enc["model"]


def assert_same(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        flat_x, flat_y = list(mae.tensors(x)), list(mae.tensors(y))
        assert len(flat_x) == len(flat_y) and all(torch.equal(p, q) for p, q in zip(flat_x, flat_y))


def children(pid):
    """The pids whose parent is pid (from /proc)."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(p))
        except OSError:
            pass
    return found


def start(script, args, log):
    """The script as its own process (vit_mini registered by tests/helpers.py), one thread as in the tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers.py"), f"{script}.py", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def signal_after(proc, step, sig):
    """Send sig once the log line of `step` (or a later one) is printed; return the steps printed and the exit code."""
    steps = []
    for line in proc.stdout:
        if line.startswith("{"):
            steps.append(json.loads(line)["step"])
            if sig is not None and steps[-1] >= step:
                proc.send_signal(sig)
                sig = None
    return steps, proc.wait(timeout=300)


def term_at(module, step):
    """From the given step on, the process sends itself SIGTERM in the middle of the step (the first thing every
    training step does is set_lr), as a scheduler would at any moment."""
    original, calls = module.set_lr, []
    def set_lr_then_term(optimizer, lr):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(optimizer, lr)
    return set_lr_then_term


@pytest.mark.parametrize("script", list(MODULES))
def test_stopped_or_killed_anywhere_resumes_to_the_same_weights(script, image_root, stage1, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    args = argv(script, image_root, tmp_path / "cut", stage1)
    assert run_as_main(f"{script}.py", argv(script, image_root, tmp_path / "ref", stage1)) is None  # never stopped
    term, kill9 = sorted(random.Random(script).sample(range(1, 10), 2))  # two steps drawn from a seed
    with monkeypatch.context() as m:  # SIGTERM during step `term`: that step ends, is saved, and the run stops
        m.setattr(MODULES[script], "set_lr", term_at(MODULES[script], term))
        with pytest.raises(MODULES[script].StopRun) as e:
            MODULES[script].main(args)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    assert str(e.value) == f"stopped by SIGTERM after step {term}; {ckpt} (step {term}) is intact: the same command " \
                           f"resumes from it"
    assert torch.load(ckpt, weights_only=True)["step"] == term
    steps, code = signal_after(start(script, args, tmp_path / "stderr.txt"), kill9, signal.SIGKILL)  # kill -9
    assert code == -signal.SIGKILL and steps[0] == term + 1  # it had resumed at the next step
    assert run_as_main(f"{script}.py", args) is None  # wherever the kill landed, even inside a save
    assert_same(weights(tmp_path / "ref"), weights(tmp_path / "cut"))
    assert lock_is_free(tmp_path / "cut" / "run.lock") and not os.path.exists(f"{ckpt}.tmp")


def torchrun_mae(args, kill_after, log, killed):
    """mae.py under `torchrun --max-restarts 3` with 2 CPU processes; once the log line of step kill_after is out,
    SIGKILL one worker, as a dying node would. On this 2-core machine torch's gloo sometimes hangs in
    init_process_group after an elastic restart (a torch issue, before our code runs): after 35 s without output
    the launch is ended and reported as failed (rc None). Returns (exit code, stdout lines, whether it killed)."""
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "--max-restarts", "3", os.path.join(ROOT, "tests", "helpers.py"), "mae.py", *args],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=open(log, "w"), text=True, start_new_session=True)
    lines, q = [], queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in agent.stdout] + [q.put(None)], daemon=True).start()
    while True:
        try:
            line = q.get(timeout=35)
        except queue.Empty:  # torchrun starts each worker in a session of its own: kill them, then the agent's
            for pid in children(agent.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
            return None, lines, killed
        if line is None:
            return agent.wait(timeout=60), lines, killed
        lines.append(line)
        if kill_after and line.startswith("{") and json.loads(line)["step"] >= kill_after:
            os.kill(max(children(agent.pid)), signal.SIGKILL)
            kill_after, killed = None, True


def _ddp(rank, world_size, args, term_rank, out):
    """mae.main in one of two processes; only term_rank gets SIGTERM, during its 3rd step."""
    if rank == term_rank:
        mae.set_lr = term_at(mae, 3)
    main_to_file(args, os.path.join(out, f"rank{rank}.txt"))


def main_to_file(args, path):
    """mae.main(args), then its outcome ("done" or the StopRun's message) written to path."""
    try:
        mae.main(args)
        message = "done"
    except mae.StopRun as e:
        message = str(e)
    with open(path, "w") as f:
        f.write(message)


@pytest.mark.timeout(480)  # up to 5 launches of torchrun (see torchrun_mae)
def test_processes_stop_together_and_torchrun_restarts_resume(image_root, stage1, tmp_path):
    ref, cut = (argv("mae", image_root, tmp_path / d, stage1) for d in ("ref", "cut"))
    run_ddp(_ddp, ref, None, str(tmp_path))
    run_ddp(_ddp, cut, 1, str(tmp_path))  # only rank 1 gets the signal
    messages = {open(tmp_path / f"rank{r}.txt").read() for r in (0, 1)}
    assert len(messages) == 1 and "stopped by SIGTERM after step 3;" in messages.pop()  # the same step on both
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3

    # resumed under torchrun --max-restarts: a worker killed after step 6 is restarted with the other, both resume
    lines, killed = [], False
    for launch in range(5):
        rc, out, killed = torchrun_mae(cut, None if killed else 6, tmp_path / f"torchrun{launch}.txt", killed)
        lines += out
        if rc == 0:
            break  # else torch's gloo hung reconnecting after the restart (see torchrun_mae): the command again
    assert rc == 0 and killed, open(tmp_path / f"torchrun{launch}.txt").read()[-2000:]
    resumed = [line for line in lines if line.startswith("resumed from")]
    assert len(resumed) >= 2 and "at step 3 " in resumed[0] and json.loads(lines[-2])["step"] == 10
    assert_same(weights(tmp_path / "ref"), weights(tmp_path / "cut"))


def _ddp_fail(rank, world_size, args, fail, out):
    """mae.main in one of two processes; rank 0 alone takes run.lock and writes checkpoints. fail == "save": its
    every save fails (a full disk)."""
    if rank == 0 and fail == "save":
        def full_disk(obj, path):
            raise mae.StopRun(f"could not write {path} (OSError: No space left on device)")
        mae.save_checkpoint = full_disk
    main_to_file(args, os.path.join(out, f"{fail}{rank}.txt"))


@pytest.mark.timeout(240)
def test_a_failure_of_rank_0_stops_both(image_root, stage1, tmp_path):
    """When rank 0 cannot take the folder or cannot save, rank 1 stops with it (Run.agree) instead of waiting in the
    next collective: each ends with one line, and nothing is written."""
    out = tmp_path / "o"
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        run_ddp(_ddp_fail, argv("mae", image_root, out, stage1, "--max-steps", "2"), "lock", str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
        os.kill(child, signal.SIGKILL)
    run_ddp(_ddp_fail, argv("mae", image_root, tmp_path / "s", stage1, "--max-steps", "2"), "save", str(tmp_path))
    lock0, lock1, save0, save1 = (open(tmp_path / f"{f}{r}.txt").read() for f in ("lock", "save") for r in (0, 1))
    assert "is in use by another run (host some-node, pid 1234)" in lock0, lock0
    assert lock1 == "another process stopped (its line says why)", lock1
    assert save0.startswith("could not write ") and save0.endswith("; nothing saved yet"), save0
    assert save1 == "another process stopped (its line says why); nothing saved yet", save1
    assert not os.path.exists(out / "checkpoint.pt") and not os.path.exists(tmp_path / "s" / "checkpoint.pt")


def test_sigterm_to_the_whole_process_group_saves(image_root, stage1, tmp_path):
    """A scheduler's SIGTERM reaches the DataLoader workers too, often twice in a row (slurmstepd, then torchrun):
    the workers ignore it, the main process finishes its step, saves and stops with its one line."""
    args = argv("mae", image_root, tmp_path, stage1, "--num-workers", "2", "--save-every-minutes", "0")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers.py"), "mae.py", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.PIPE, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["step"] >= 2:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGTERM)
            break
    proc.stdout.read()
    err = proc.stderr.read().strip().splitlines()[-1]
    step = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert proc.wait(timeout=120) == 1 and err.startswith(f"error: stopped by SIGTERM after step {step};"), err
    assert 2 <= step < 10


@pytest.mark.parametrize("script", ["mae", "moco"])
def test_a_diverged_run_saves_nothing(script, image_root, stage1, tmp_path):
    """--blr 1e6: the loss or the weights turn non-finite; no checkpoint.pt or encoder.pt is written with them."""
    torch.set_num_threads(1)
    code = run_as_main(f"{script}.py", argv(script, image_root, tmp_path, stage1, "--blr", "1e6", "--max-steps", "5",
                                            "--save-every-minutes", "0", "--log-every", "20"))
    assert isinstance(code, str) and "\n" not in code, code
    assert "non-finite loss" in code or "are not finite" in code, code
    assert "--blr 1000000.0" in code and "nothing saved yet" in code, code
    assert not os.path.exists(tmp_path / "encoder.pt") and not os.path.exists(tmp_path / "checkpoint.pt")


BAD_FLAGS = [  # (extra flags, what the one line must say), for every training script
    (["--blr", "-1"], "--blr -1.0: must be a positive number"), (["--blr", "nan"], "--blr nan: must be a positive"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"), (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--warmup-epochs", "2"], "--warmup-epochs 2: must be 0 or shorter than --epochs 2"),
    (["--patch-size", "0"], "--patch-size 0: must be >= 1"),
    (["--img-size", "30"], "--patch-size \\d: .*divide --img-size 30"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"), (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    (["--num-workers", "-1"], "--num-workers -1"), (["--save-every-minutes", "-1"], "--save-every-minutes -1.0"),
    (["--seed", "1180591620717411303424"], "--seed 1180591620717411303424: must be >= 0 and < 2\\*\\*63"),
]
OWN_BAD_FLAGS = {
    "mae": [(["--mask-ratio", "1.0"], "--mask-ratio 1.0: must lie in \\(0, 1\\)"),
            (["--mask-ratio", "1.5"], "--mask-ratio 1.5"), (["--mask-ratio", "0"], "--mask-ratio 0.0: must lie in"),
            (["--mask-ratio", "0.99"], "keeps 0 of 16 patches"), (["--vis-every", "0"], "--vis-every 0: must be >= 1")],
    "moco": [(["--moco-t", "0"], "--moco-t 0.0: must be > 0"), (["--batch-size", "1"], "BatchNorm .* needs 2 or more"),
             (["--img-size", "4096", "--patch-size", "4", "--batch-size", "160"],  # 1M patches: >= 129 GB a step
              "--img-size 4096: a step needs more than 129 GB, the cpu has \\d+ GB; lower --img-size or --batch-size")],
    "graft": [(["--lower-lr-ratio", "-1"], "--lower-lr-ratio -1.0"), (["--moco-m", "2"], "--moco-m 2.0: must lie in")],
    "mimco": [(["--batch-size", "1"], "--batch-size 1: must be >= 2"), (["--image-tau", "0"], "--image-tau 0.0"),
              (["--head-hidden-dim", "0"], "--head-hidden-dim 0: must be >= 1")],
    "hybrid": [(["--lam", "1.5"], "--lam 1.5: must lie in \\[0, 1\\]"), (["--mask-ratio", "1"], "--mask-ratio 1.0"),
               (["--batch-size", "1"], "BatchNorm .* needs 2 or more")],
    "micl": [(["--batch-size", "1"], "--batch-size 1: on 1 process\\(es\\) leaves each image no negative"),
             (["--mask-ratio", "1"], "--mask-ratio 1.0: must lie in \\[0, 1\\)"), (["--tau", "-0.1"], "--tau -0.1")],
}


@pytest.mark.parametrize("script", list(MODULES))
def test_bad_input_catalogue_one_line_each(script, image_root, stage1, tmp_path):
    """Each row: the same command line as a user's, one line on stderr (sys.exit's string), nothing left behind."""
    (tmp_path / "file").write_text("")
    pickled = tmp_path / "pickled.pt"
    torch.save(argparse_namespace(), pickled)  # weights_only refuses it: never unpickled
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((stage1 / "moco_encoder.pt").read_bytes()[:1000])
    init_flag = {"graft": "--mim-checkpoint", "mimco": "--teacher"}.get(script, "--init")
    rows = BAD_FLAGS + OWN_BAD_FLAGS[script] + [
        (["--data", tmp_path / "nope"], "--data .*nope: no such folder"),
        (["--output-dir", tmp_path / "file" / "o"],
         "--output-dir .*file/o: Not a directory; pass a folder you can write"),
        ([init_flag, tmp_path / "missing.pt"], "no such file|not found"),
        ([init_flag, pickled], "cannot read .*pickled.pt as a file of weights|cannot read it as a PyTorch checkpoint"),
        ([init_flag, truncated], "cannot read"),
    ]
    for extra, message in rows:
        out = tmp_path / "o"
        code = run_as_main(f"{script}.py", argv(script, image_root, out, stage1, *extra))
        assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, (extra, code)
        assert __import__("re").search(message, code), (extra, code)
        assert not os.path.exists(out / "checkpoint.pt"), extra


def test_max_steps_ends_the_epoch_loop(image_root, stage1, tmp_path, monkeypatch):
    """--epochs 1000000000 --max-steps 2: the loop ends after the epoch that holds step 2 (it used to go through
    every remaining epoch, each ending at once: minutes of nothing)."""
    torch.set_num_threads(1)
    epochs, batches = [], mae.Run.batches

    def counted(self, loader, epoch):
        epochs.append(epoch)
        return batches(self, loader, epoch)
    monkeypatch.setattr(mae.Run, "batches", counted)
    mae.main(argv("mae", image_root, tmp_path, stage1, "--epochs", "1000000000", "--max-steps", "2"))
    assert epochs == [0] and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def argparse_namespace():
    import argparse
    return argparse.Namespace(weights=[1, 2])


HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.lockf(f, fcntl.LOCK_EX)
f.truncate(0)
f.write("host some-node, pid 1234")
f.flush()
child = os.fork()
if child == 0:  # outlives its parent with the file open
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def lock_is_free(path):
    """Whether another process can take run.lock now (a POSIX lock never blocks its own process: ask another)."""
    code = "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return subprocess.run([sys.executable, "-c", code, str(path)]).returncode == 0


def test_output_folder_faults(image_root, stage1, tmp_path):
    """mae.py for all (the appendix is the same text everywhere): what is in --output-dir decides what happens."""
    torch.set_num_threads(1)
    out = tmp_path / "o"
    run = lambda *extra: run_as_main("mae.py", argv("mae", image_root, out, stage1, *extra))  # noqa: E731
    assert run("--max-steps", "2") is None
    good = (out / "checkpoint.pt").read_bytes()
    # a second run in the same folder while another process holds run.lock, then once that process was killed -9
    # (its forked child, as a DataLoader worker would, still has the file open: the lock went with the holder)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        assert "is in use by another run (host some-node, pid 1234); wait for it" in run("--max-steps", "3")
        holder.kill()
        holder.wait()
        (out / "checkpoint.pt.tmp").write_bytes(b"left by a kill during a save")
        assert run("--max-steps", "3") is None and not os.path.exists(out / "checkpoint.pt.tmp")
    finally:
        os.kill(child, signal.SIGKILL)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {"resumed_at_step": 2} in log  # the marker of a restart: steps after it may repeat logged ones
    (out / "run.lock").write_text("")  # an empty lock file (left by a full disk) is no run's
    assert run("--max-steps", "4") is None
    # another method's checkpoint, a damaged one, another data set
    torch.save({**torch.load(out / "checkpoint.pt", weights_only=True), "method": "moco"}, out / "checkpoint.pt")
    assert "was written by moco.py, not mae.py" in run()
    (out / "checkpoint.pt").write_bytes(good[:1000])
    message = run()
    assert "checkpoint.pt cannot be read (" in message and "move it away to start from step 0" in message
    (out / "checkpoint.pt").write_bytes(good)
    fewer = tmp_path / "fewer"
    os.makedirs(fewer / "train")
    for c in sorted(os.listdir(os.path.join(image_root, "train")))[:5]:
        os.symlink(os.path.join(image_root, "train", c), fewer / "train" / c)
    assert "trained on 160 images, --data " in run("--data", fewer) and "has 80" in run("--data", fewer)
    # --save-every-minutes: a save at every step once the interval is over; 0 is off; --keep-every-epochs copies
    saves = []
    original = mae.save_checkpoint
    mae.save_checkpoint = lambda obj, path: (saves.append(obj.get("step")), original(obj, path))
    try:
        mae.main(argv("mae", image_root, tmp_path / "t", stage1, "--max-steps", "3"))  # COMMON: 1e-9 minutes
        mae.main(argv("mae", image_root, tmp_path / "u", stage1, "--save-every-minutes", "0",
                      "--keep-every-epochs", "1"))
    finally:
        mae.save_checkpoint = original
    # (t) every step, encoder.pt; (u) epoch ends + kept copies, encoder.pt
    assert saves == [1, 2, 3, 3, 5, 5, 10, 10, 10]
    assert sorted(f for f in os.listdir(tmp_path / "u") if f.startswith("checkpoint_")) == \
        ["checkpoint_epoch0001.pt", "checkpoint_epoch0002.pt"]
    # a resume that would claim fewer epochs than were trained (as if this run had gone on with --epochs 3)
    ckpt = torch.load(tmp_path / "u" / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "step": 15}, tmp_path / "u" / "checkpoint.pt")
    message = run_as_main("mae.py", argv("mae", image_root, tmp_path / "u", stage1))
    assert message.endswith("is at step 15, past the 10 steps of --epochs 2; pass --epochs 3 or more"), message


def test_failed_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    mae.save_checkpoint({"w": torch.ones(3)}, path)
    os.symlink("/dev/full", path + ".tmp")  # the disk fills up during the write
    with pytest.raises(mae.StopRun, match="could not write .*checkpoint.pt .*the last checkpoint is kept"):
        mae.save_checkpoint({"w": torch.zeros(3)}, path)
    assert not os.path.lexists(path + ".tmp") and torch.equal(torch.load(path)["w"], torch.ones(3))
    with pytest.raises(mae.StopRun, match="not finite"):
        mae.save_checkpoint({"w": torch.tensor([1.0, float("nan")])}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))


def test_wrong_method_for_stage1_and_micl_process_count(image_root, stage1, tmp_path):
    torch.set_num_threads(1)
    code = run_as_main("graft.py", argv("graft", image_root, tmp_path / "g", stage1, "--mim-checkpoint",
                                        stage1 / "moco_encoder.pt"))
    assert "holds moco.py weights, not a MIM encoder; pass mae.py's" in code
    code = run_as_main("mimco.py", argv("mimco", image_root, tmp_path / "m", stage1, "--teacher",
                                        stage1 / "mae_encoder.pt"))
    assert "holds mae.py weights, not a contrastive encoder" in code
    assert run_as_main("micl.py", argv("micl", image_root, tmp_path / "c", stage1, "--max-steps", "1")) is None
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "world_size": 2}, tmp_path / "c" / "checkpoint.pt")  # as if trained on 2 processes
    code = run_as_main("micl.py", argv("micl", image_root, tmp_path / "c", stage1))
    assert "was trained on 2 process(es), with 15 negatives per image; resume on as many" in code
    # mimco.py's output folder holding a damaged checkpoint, micl.py's, then its own resumed with another teacher
    os.makedirs(tmp_path / "m2")
    (tmp_path / "m2" / "checkpoint.pt").write_text("hello")
    mimco_argv = argv("mimco", image_root, tmp_path / "m2", stage1, "--max-steps", "1")
    assert "checkpoint.pt cannot be read (" in run_as_main("mimco.py", mimco_argv)
    shutil.copy(tmp_path / "c" / "checkpoint.pt", tmp_path / "m2" / "checkpoint.pt")
    assert "checkpoint.pt was written by micl.py, not mimco.py" in run_as_main("mimco.py", mimco_argv)
    os.remove(tmp_path / "m2" / "checkpoint.pt")
    assert run_as_main("mimco.py", mimco_argv) is None
    shutil.copy(stage1 / "moco_encoder.pt", tmp_path / "other_teacher.pt")
    code = run_as_main("mimco.py", mimco_argv[:-2] + ["--teacher", str(tmp_path / "other_teacher.pt")])
    assert "was written with --teacher " in code and "other_teacher.pt; pass the same value" in code


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    from PIL import Image
    import numpy as np
    grey = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(mae.pil_loader(str(tmp_path / "g16.png")))
    assert rgb.shape == (4, 4, 3) and (rgb == 127).all()  # 32768 / 257
