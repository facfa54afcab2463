"""Start the ranks of a CPU (gloo) multi-process test and wait for their result files.

Shared by tests/test_ddp.py and tests/test_fsdp2.py.  A rank still alive once every result file
exists is stuck in process-group teardown (seen once in ~5 CI runs on 2 cores) and is
terminated rather than hanging the suite; a rank that fails, or no results in time, fails the test.
"""
import os
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir: str, wanted, what: str, timeout_s: float = 300.0) -> None:
    """Spawn ``worker(rank, port, out_dir)`` for every rank and wait until all exit or every path
    in ``wanted`` exists.  ``what`` names the ranks in failure messages (e.g. "DDP")."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, out_dir)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            codes = [p.exitcode for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise AssertionError(f"a {what} rank failed (exit codes {codes})")
            if all(c == 0 for c in codes):
                return
            if all(os.path.exists(w) for w in wanted):
                for p in procs:
                    p.join(timeout=30)
                return
            time.sleep(0.2)
        raise AssertionError(f"{what} ranks gave no result within {timeout_s:.0f} s")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
