"""Every CUDA source of gpu/ compiles with nvcc for sm_80 and sm_90, with the options the engine uses.

No GPU is needed: this runs wherever ``nvcc`` is on the PATH, so a kernel that does not build fails CI
even on machines that cannot run it. The variants are those ``gpu/kernels.py: build_options`` produces for
each input dtype, for the largest head dim (128) and one that needs padding (40), and every version of the
forward kernel (``kernels.FORWARD``).
"""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpu import kernels

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")

ARCHS = ("80", "90")
VARIANTS = ([(source, elem, D, None) for source in ("flash_forward.cu", "flash_backward.cu")
             for elem in kernels.ELEM for D in (40, 128) if kernels.supports(elem, D) is None]
            + [("flash_forward.cu", elem, 128, version) for elem in kernels.ELEM for version in kernels.FORWARD
               if version != kernels.FORWARD_MASKED]
            + [("convert.cu", elem, 0, None) for elem in kernels.ELEM])


def _compile(variant, tmp_path):
    """nvcc on exactly the text and options NVRTC gets (``kernels.source_text``, ``build_options``)."""
    source, elem, D, version = variant
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    name = tmp_path / f"{source[:-3]}-{elem}-D{D}-{version}"
    Path(f"{name}.cu").write_text(kernels.source_text(source))
    cmd = [NVCC, "-fatbin", *gencode, *kernels.build_options(source, elem, D, version), "-o", f"{name}.fatbin",
           f"{name}.cu"]
    job = subprocess.run(cmd, capture_output=True, text=True)
    return variant, cmd, job


def test_every_source_compiles_for_sm80_and_sm90(tmp_path):
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda v: _compile(v, tmp_path), VARIANTS))
    failures = [f"{' '.join(cmd)}\n{job.stderr}" for _, cmd, job in results if job.returncode != 0]
    assert not failures, "\n\n".join(failures)
    assert {source for (source, *_), _, _ in results} == set(kernels.SOURCES)


def test_sources_have_no_warnings(tmp_path):
    """Warnings from nvcc (unused variables, narrowing) are errors waiting to happen in a kernel."""
    noisy = []
    for source in kernels.SOURCES:
        variant = (source, "bfloat16", 0 if source == "convert.cu" else 128, None)
        _, cmd, job = _compile(variant, tmp_path)
        if job.returncode != 0 or "warning" in job.stderr.lower():
            noisy.append(f"{' '.join(cmd)}\n{job.stderr}")
    assert not noisy, "\n\n".join(noisy)
