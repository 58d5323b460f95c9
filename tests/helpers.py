"""Helpers for tests: run a function in 2 CPU processes under gloo, as torchrun would."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
