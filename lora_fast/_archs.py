"""``LORA_FAST_CUDA_ARCHS``: the CUDA architectures of the extension, parsed one way for the
install-time build (``setup.py`` loads this file by path, so it imports nothing but the standard
library) and for the first-use build (``lora_fast.cuda_ext``).

Accepted: entries separated by ``;``, ``,`` or spaces, each ``80``, ``8.0``, ``sm_80``,
``compute_80``, with an optional ``a`` suffix for the architecture-specific features
(``90a``, ``9.0a``) and an optional ``+PTX`` (PTX for that architecture too, as in
``TORCH_CUDA_ARCH_LIST``).  Anything else raises ``ValueError`` naming the entry; an empty value
is the same as unset (the caller's default).
"""
import re
from typing import List

ENV = "LORA_FAST_CUDA_ARCHS"
DEFAULT = "80;86;90"

_TOKEN = re.compile(r"^(?:sm_|compute_)?(?:(\d+)\.(\d)|(\d+)(\d))(a?)(\+ptx)?$")


def parse(value: str) -> List[str]:
    """The architectures in ``value`` as ``major.minor[a]`` strings, e.g. ``["8.0", "9.0a"]``."""
    out = []
    for tok in re.split(r"[;,\s]+", value.strip()):
        if not tok:
            continue
        m = _TOKEN.match(tok.lower())
        if m is None:
            raise ValueError(f"{ENV}: {tok!r} is not a CUDA architecture (use e.g. 80;86;90, 8.0;9.0 or sm_90a)")
        major, minor = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        arch = f"{int(major)}.{minor}{m.group(5)}" + ("+PTX" if m.group(6) else "")
        if arch not in out:
            out.append(arch)
    if not out:
        raise ValueError(f"{ENV}={value!r} names no architecture")
    return out


def arch_list(archs: List[str]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` form: ``8.0;9.0a``."""
    return ";".join(archs)


def gencode_flags(archs: List[str]) -> List[str]:
    """nvcc ``-gencode`` flags: ``arch=compute_90a,code=sm_90a`` per architecture (and
    ``code=compute_86`` too for ``8.6+PTX``)."""
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def from_env(environ, default: str = DEFAULT) -> List[str]:
    """The architectures ``LORA_FAST_CUDA_ARCHS`` names in ``environ`` (``default`` if it is unset
    or blank)."""
    value = environ.get(ENV, "")
    return parse(value if value.strip() else default)
