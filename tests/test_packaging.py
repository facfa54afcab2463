"""Packaging: what an install carries (the CUDA sources for the first-use build, the Triton
kernels), and LORA_FAST_CUDA_ARCHS parsed the same way by setup.py and lora_fast.cuda_ext."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from lora_fast import _archs, cuda_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value, want", [
    ("80;86;90", ["8.0", "8.6", "9.0"]),
    ("8.0 8.6 9.0", ["8.0", "8.6", "9.0"]),
    ("sm_80,sm_90", ["8.0", "9.0"]),
    ("80; 90", ["8.0", "9.0"]),
    ("90a", ["9.0a"]),
    ("compute_120", ["12.0"]),
    ("8.0;8.6+PTX", ["8.0", "8.6+PTX"]),
])
def test_cuda_archs_parsing(value, want, monkeypatch):
    assert _archs.parse(value) == want
    monkeypatch.setenv(_archs.ENV, value)
    assert cuda_ext._arch_list() == ";".join(want)  # the first-use build reads it the same way
    flags = _archs.gencode_flags(want)
    nums = [a.replace("+PTX", "").replace(".", "") for a in want]
    assert [f for f in flags[1::2] if "code=sm_" in f] == [f"arch=compute_{n},code=sm_{n}" for n in nums]
    ptx = [n for a, n in zip(want, nums) if a.endswith("+PTX")]
    assert [f for f in flags[1::2] if "code=compute_" in f] == [f"arch=compute_{n},code=compute_{n}" for n in ptx]


def test_blank_cuda_archs_is_the_default():
    assert _archs.from_env({_archs.ENV: "  "}) == _archs.from_env({}) == ["8.0", "8.6", "9.0"]


@pytest.mark.parametrize("value", ["bogus", "8.0.1", "", ";", "sm_"])
def test_cuda_archs_bad_values_are_named(value):
    with pytest.raises(ValueError, match=_archs.ENV):
        _archs.parse(value)


def test_wheel_carries_the_cuda_sources_and_triton_kernels(tmp_path):
    # a non-editable install had no csrc/, so the CUDA extension could never compile on first use
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".triton36", "data", ".whl"))
    out = tmp_path / "whl"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, LORA_FAST_SKIP_CUDA_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1"))
    if proc.returncode != 0 and "bdist_wheel" in proc.stderr:
        pytest.skip(f"this environment cannot build wheels without isolation: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in os.listdir(os.path.join(REPO, "csrc")):
        assert f"lora_fast/csrc/{f}" in names, f
    for f in os.listdir(os.path.join(REPO, "kernels")):
        if f.endswith(".py"):
            assert f"lora_fast/kernels/{f}" in names, f
    assert "lora_fast/_archs.py" in names
