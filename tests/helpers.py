"""Helpers for tests: a tiny registered ViT, and a function run in 2 CPU processes under gloo, as torchrun would."""
import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root, also in workers
import vit  # noqa: E402

# The whole-run tests (train, resume, DDP) use `--model vit_mini`: 3 blocks of width 64, a few times cheaper per image
# than vit_tiny on 2 cores while every code path is the same. The scripts' --model choices read vit.MODELS, and this
# module is imported by conftest.py and by every spawned worker (run_ddp's entry point lives here).
def vit_mini(cls=vit.VisionTransformer, **kw):
    return cls(**{"embed_dim": 64, "depth": 3, "num_heads": 2, **kw})


vit.MODELS.setdefault("vit_mini", vit_mini)


_given_ports = set()


def free_port():
    """A port nothing listens on now and that this process has not handed out before. The OS may give the same
    ephemeral port twice in a row, and a test that calls free_port() for its second process group while run_ddp
    takes one for the first must get two ports: one store still bound to the first makes the second EADDRINUSE."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port


def _entry(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)


def run_ddp(fn, *args, world_size=2):
    """Call fn(rank, world_size, *args) in `world_size` spawned processes with torchrun's environment variables set
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). fn must be a module-level function; it may call
    dist.init_process_group("gloo") itself or run a script's main(), which does. Return results through files."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def run_as_main(script, argv):
    """Run ROOT/script as `python script *argv` would, in this process (no second torch import), and return what
    sys.exit was given: an "error: ..." string means Python printed it to stderr alone and exited with status 1.
    Any other exception propagates, so a traceback where one line is promised fails the test."""
    import runpy
    old = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script),
                       run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old
    return None


if __name__ == "__main__":  # python tests/helpers.py SCRIPT ARGS...: a script as its own process, vit_mini registered
    import runpy
    sys.argv = sys.argv[1:]
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.argv[0]),
                   run_name="__main__")
