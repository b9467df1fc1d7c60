"""llama.cpp for `vs_llama_cpp.py`: its source from PyPI, `llama-server` built once, GGUF conversion.

No llama.cpp code is in this repository. PyPI's `llama-cpp-python` sdist vendors a whole
llama.cpp tree (server, `convert_hf_to_gguf.py`, `gguf-py`), so we fetch that sdist with pip,
build only the `llama-server` target, and cache everything under ~/.cache/xllm/llama.cpp/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The llama.cpp that this sdist vendors is the one measured: pin it so runs compare.
LLAMA_CPP_PYTHON = "0.3.36"
ROOT = Path(os.environ.get("XLLM_CACHE_DIR", Path.home() / ".cache" / "xllm")) / "llama.cpp"
HERE = ROOT / LLAMA_CPP_PYTHON


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def source() -> Path:
    """The vendored llama.cpp tree, unpacked from the sdist once."""
    tree = HERE / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    log(f"fetching llama-cpp-python=={LLAMA_CPP_PYTHON} sdist from PyPI (once)...")
    HERE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", "--dest", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="tar")
        unpacked = Path(tmp) / sdist.name.removesuffix(".tar.gz")
        # The sdist carries the submodule's git metadata: keep which llama.cpp commit it is.
        head = unpacked / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
        if head.is_file():
            (HERE / "COMMIT").write_text(head.read_text())
        # Move only when complete, so an interrupted fetch is redone next time.
        (unpacked / "vendor" / "llama.cpp").rename(tree)
    return tree


def commit() -> str | None:
    """The llama.cpp commit that the pinned sdist vendors, if it said."""
    path = HERE / "COMMIT"
    return path.read_text().strip() if path.is_file() else None


def server_binary() -> Path:
    """`llama-server`, built from `source()` once (Release, CPU only, this CPU's ISA)."""
    binary = HERE / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    tree, build = source(), HERE / "build"
    log(f"building llama-server in {build} (once, ~10-20 min on 2 cores)...")
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",  # AVX-512 / AVX512-BF16 kernels where this CPU has them
        "-DGGML_CUDA=OFF",
        "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
        "-DLLAMA_OPENSSL=OFF",  # no HTTPS needed (this llama.cpp has no curl option any more)
        # The web UI would be fetched from Hugging Face or built with npm: neither is wanted.
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]
    subprocess.run(["cmake", "-S", tree, "-B", build, *flags], check=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j2"], check=True)
    return binary


def _converter_script(tree: Path, workdir: Path) -> Path:
    """`convert_hf_to_gguf.py`, told that our tokenizer is a Qwen2-style byte-level BPE.

    The converter recognises a tokenizer by hashing how it splits a test text, and our
    locally trained BPE is in no table: its pre-tokenizer is Qwen2's regex, and the
    benchmarks send token ids anyway, so "qwen2" is right. Qwen2/3 conversion also tries
    SentencePiece first and needs the `sentencepiece` package just to find out that there is
    no `tokenizer.model`; we go straight to the GPT-2-style BPE path instead.
    """
    wrapper = workdir / "convert.py"
    wrapper.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(tree)!r})\n"
        f"sys.argv[0] = {str(tree / 'convert_hf_to_gguf.py')!r}\n"
        "import convert_hf_to_gguf\n"
        "from conversion.base import TextModel\n"
        "from conversion.qwen import Qwen2Model\n"
        "TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "Qwen2Model.set_vocab = TextModel._set_vocab_gpt2\n"
        "convert_hf_to_gguf.main()\n"
    )
    return wrapper


def gguf(model_dir: Path, outtype: str = "bf16") -> Path:
    """`model_dir` as a GGUF of `outtype` (bf16, f32), written beside it once."""
    out = model_dir.parent / f"{model_dir.name}-{outtype}.gguf"
    if out.is_file():
        return out
    tree = source()
    log(f"converting {model_dir} to {out} (once)...")
    with tempfile.TemporaryDirectory() as tmp:
        partial = Path(tmp) / out.name
        subprocess.run(
            [sys.executable, _converter_script(tree, Path(tmp)), model_dir,
             "--outtype", outtype, "--outfile", partial],
            check=True,
        )  # fmt: skip
        shutil.move(partial, out)
    return out
