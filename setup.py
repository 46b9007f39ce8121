"""Builds rlhf_kernels._C from csrc/ with torch.utils.cpp_extension and ninja.

RLHF_KERNELS_BUILD chooses what to build:
  auto (default)  CUDA + CPU kernels when nvcc is found and torch is a CUDA
                  build, else CPU kernels only, else (no C++ compiler or no
                  torch) no extension: the torch and triton backends still work.
  cuda            CUDA + CPU kernels, or fail.
  cpu             CPU kernels only.
  none            no extension.
TORCH_CUDA_ARCH_LIST picks the GPU architectures; without it, the visible
GPU's, or sm_80 and sm_90 when no GPU is visible.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
MODE = os.environ.get("RLHF_KERNELS_BUILD", "auto").lower()
if MODE not in ("auto", "cuda", "cpu", "none"):
    sys.exit(f"RLHF_KERNELS_BUILD must be auto, cuda, cpu or none, got {MODE!r}")


def _find_cuda_home() -> str | None:
    """The toolkit root. An nvcc on PATH may be a wrapper script in /usr/local/bin,
    so look for the folder that holds both bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        try:  # a wrapper like `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            for word in Path(nvcc).read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def _extensions():
    if MODE == "none":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if MODE == "auto":
            print(f"rlhf_kernels: not building the extension ({exc})", file=sys.stderr)
            return [], {}
        raise
    if MODE == "auto" and shutil.which(os.environ.get("CXX", "c++")) is None:
        print("rlhf_kernels: no C++ compiler, not building the extension", file=sys.stderr)
        return [], {}

    use_cuda = MODE == "cuda" or (MODE == "auto" and cuda_home is not None and torch.version.cuda is not None)
    if MODE == "cuda" and (cuda_home is None or torch.version.cuda is None):
        sys.exit(
            f"RLHF_KERNELS_BUILD=cuda needs nvcc (found toolkit: {cuda_home}) and a CUDA torch "
            f"(torch.version.cuda = {torch.version.cuda})"
        )

    # -fopenmp: at::parallel_for is a header template that expands to an OpenMP
    # region in our own translation units; without the flag it runs serially.
    cxx = ["-O3", "-Wno-psabi", "-fopenmp"]
    sources = [
        "csrc/bindings.cpp",
        "csrc/logprobs_cpu.cpp",
        "csrc/preference_cpu.cpp",
        "csrc/ppo_cpu.cpp",
        "csrc/ppo_loss_cpu.cpp",
    ]
    kwargs = {"name": "rlhf_kernels._C", "include_dirs": [str(ROOT / "csrc")], "extra_link_args": ["-fopenmp"]}
    if not use_cuda:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
        return [ext], {"build_ext": cpp_extension.BuildExtension}

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            archs = "8.0;9.0+PTX"  # PTX too, so newer GPUs can JIT the kernels
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DNDEBUG"]
    cxx += ["-DRLHF_WITH_CUDA", f'-DRLHF_CUDA_ARCHS="{archs}"']
    ext = cpp_extension.CUDAExtension(
        sources=sources
        + ["csrc/logprobs.cu", "csrc/preference.cu", "csrc/ppo.cu", "csrc/ppo_loss.cu", "csrc/ppo_logits.cu",
           "csrc/ppo_whiten.cu"],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        **kwargs,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
