"""Where the suite runs: the device shim (CUDA, CPU, or CPU pretending to be CUDA for
``--dry-run``) and the metadata stamped on every result (GPU, versions, commit, time).

Every CUDA-specific call the harness makes (sync, events, peak memory, graph capture) goes
through a :class:`Dev`, so ``--dry-run`` runs the exact GPU code path of the harness on the CPU
with :class:`DryRunDev`, which stands in for the CUDA runtime with wall clocks.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import subprocess
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GraphUnsupported(RuntimeError):
    """CUDA-graph replay is not possible on this device."""


class _WallEvent:
    """A stand-in for ``torch.cuda.Event`` on the CPU (perf_counter; sync is a no-op there)."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_WallEvent") -> float:
        return (end.t - self.t) * 1e3


class Dev:
    """Device operations used by the harness.  Subclasses: :class:`CudaDev`, :class:`CpuDev`,
    :class:`DryRunDev`."""

    name = "base"
    torch_device = torch.device("cpu")
    is_cuda = False  # real CUDA runtime underneath
    gpu_path = False  # run the GPU code path of the harness (events, memory, graphs)
    timings_meaningful = False

    def sync(self) -> None:
        pass

    def event(self):
        return _WallEvent()

    def memory_supported(self) -> bool:
        return False

    def reset_peak(self) -> None:
        pass

    def allocated(self) -> int:
        return 0

    def max_allocated(self) -> int:
        return 0

    def free_cache(self) -> None:
        gc.collect()

    def graph_time_ms(self, fn: Callable[[], object], inner: int, rep: int) -> List[float]:
        raise GraphUnsupported(f"CUDA graphs need a CUDA device (running on {self.name})")


class CudaDev(Dev):
    name = "cuda"
    is_cuda = True
    gpu_path = True
    timings_meaningful = True

    def __init__(self, index: int = 0) -> None:
        self.torch_device = torch.device("cuda", index)
        torch.cuda.set_device(self.torch_device)

    def sync(self) -> None:
        torch.cuda.synchronize()

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def memory_supported(self) -> bool:
        return True

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def max_allocated(self) -> int:
        return torch.cuda.max_memory_allocated()

    def free_cache(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def graph_time_ms(self, fn: Callable[[], object], inner: int, rep: int) -> List[float]:
        """Per-call times (ms) of ``fn`` replayed from one CUDA graph holding ``inner`` calls
        (the method of shared/measure/decode_graph.py): warm up on a side stream, capture,
        replay ``rep`` times, each replay timed by events and divided by ``inner``."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(rep):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / inner)
        del graph
        return times


class CpuDev(Dev):
    name = "cpu"


class DryRunDev(Dev):
    """CPU tensors, GPU code path: catches Python errors in the GPU-only branches without a GPU.
    Memory reads 0 and a 'graph' is the captured calls run again; timings mean nothing."""

    name = "cpu (dry run of the GPU path)"
    gpu_path = True

    def memory_supported(self) -> bool:
        return True

    def graph_time_ms(self, fn: Callable[[], object], inner: int, rep: int) -> List[float]:
        for _ in range(3):
            fn()
        captured = [fn] * inner
        times = []
        for _ in range(rep):
            a, b = self.event(), self.event()
            a.record()
            for f in captured:
                f()
            b.record()
            times.append(a.elapsed_time(b) / inner)
        return times


def make_dev(dry_run: bool) -> Dev:
    if dry_run:
        return DryRunDev()
    if torch.cuda.is_available():
        return CudaDev()
    return CpuDev()


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        pass
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "unknown"))
    except Exception:
        return None


def git_commit() -> Dict[str, object]:
    """HEAD of the checkout holding bench/ and whether it has local changes (None without git;
    ``BENCH_COMMIT`` overrides, for a copy of the tree without .git on a GPU machine)."""
    out: Dict[str, object] = {"commit": os.environ.get("BENCH_COMMIT") or None, "dirty": None}
    if out["commit"]:  # set by whoever copied the tree to a machine without .git
        return out
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip() or None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout
        out["dirty"] = bool(status.strip())
    except Exception:
        pass
    return out


def metadata(dev: Dev, profile: str, argv: List[str]) -> Dict[str, object]:
    """Everything a result needs to be interpreted later: what ran it, with which versions."""
    meta: Dict[str, object] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": profile,
        "device_kind": dev.name,
        "timings_meaningful": dev.timings_meaningful,
        "gpu": None,
        "compute_capability": None,
        "sm_count": None,
        "gpu_memory_GB": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "lora_fast": _version("lora_fast"),
        "LORA_FAST_BACKEND": os.environ.get("LORA_FAST_BACKEND"),
        "argv": list(argv),
    }
    meta.update(git_commit())
    if dev.is_cuda:
        props = torch.cuda.get_device_properties(dev.torch_device)
        meta["gpu"] = props.name
        meta["compute_capability"] = f"{props.major}.{props.minor}"
        meta["sm_count"] = props.multi_processor_count
        meta["gpu_memory_GB"] = round(props.total_memory / 2**30, 1)
    return meta


def auto_profile(dev: Dev) -> str:
    """smoke on CPU; h100 on sm_90, a100 on sm_80, rtx3060 on sm_86, h100-ish otherwise."""
    if isinstance(dev, DryRunDev):
        return "h100"
    if not dev.is_cuda:
        return "smoke"
    cc = torch.cuda.get_device_capability(dev.torch_device)
    return {(9, 0): "h100", (8, 0): "a100", (8, 6): "rtx3060"}.get(tuple(cc), "h100")


@contextlib.contextmanager
def temp_env(values: Dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, restoring (or removing) them after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
