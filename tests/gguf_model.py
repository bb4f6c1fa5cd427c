"""The tests' tiny Llama (tests/tiny_model.py) as a GGUF file that llama.cpp's server loads.

Nothing is downloaded from a model hub: llama.cpp's own converter (convert_hf_to_gguf.py, with
its `conversion` package and `gguf-py`) is taken from the llama-cpp-python source package that
`make install-llama` keeps beside its wheel, and run on the tiny model's directory. The converter
knows BPE pre-tokenizers by the hash of what they make of a test string; the tiny model's
byte-level BPE is unknown to it, so it is declared `gpt-2` (the same byte-level splitting; `gpt2`
is not a name llama.cpp loads, and `default` splits differently). Converted from the tiny vicuna
model and served with `--chat_format vicuna`, llama.cpp sees the prompt tokens FastChat's worker
sees.

Files are cached beside the tiny models (tests/.models/, git-ignored): the converter in
``llama-convert-<version>/``, each GGUF as ``<BUILD_VERSION>/<model>.f32.gguf``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.tiny_model import BUILD_VERSION, MODELS_DIR, build_tiny_model

LLAMA_CPP_VERSION = "0.3.36"
# Where `make install-llama` keeps the source package (LLAMA_WHEELS in the Makefile).
SOURCE_DIRS = [os.environ.get("LLAMA_WHEELS", ""), str(Path.home() / ".cache" / "gateway-wheels")]
SDIST = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

# Run in a child process: the converter's modules stay out of the tests' interpreter.
CONVERT = """
import sys
converter, model_dir, outfile = sys.argv[1:4]
sys.path[:0] = [converter, converter + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


class ConverterMissing(RuntimeError):
    """The llama-cpp-python source package is not where `make install-llama` keeps it."""


def source_package() -> Path:
    for directory in SOURCE_DIRS:
        if directory and (Path(directory) / SDIST).exists():
            return Path(directory) / SDIST
    raise ConverterMissing(f"{SDIST} not found in {[d for d in SOURCE_DIRS if d]} (run make install-llama)")


def converter_dir(root: Path = MODELS_DIR) -> Path:
    """llama.cpp's converter, extracted once from the source package."""
    target = Path(root) / f"llama-convert-{LLAMA_CPP_VERSION}"
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llama-convert-", dir=target.parent))
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    try:
        with tarfile.open(source_package()) as archive:
            for member in archive.getmembers():
                if not member.name.startswith(prefix):
                    continue
                relative = member.name[len(prefix):]
                if relative.startswith(CONVERTER_MEMBERS) and (member.isfile() or member.isdir()):
                    member.name = relative
                    archive.extract(member, staging, filter="data")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "convert_hf_to_gguf.py").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_gguf(root: Path = MODELS_DIR, template: str = "vicuna_v1.1") -> Path:
    """The GGUF of the tiny model for `template`, converted if needed (a few seconds)."""
    model_dir = build_tiny_model(root, template)
    target = Path(root) / BUILD_VERSION / f"{model_dir.name}.f32.gguf"
    if target.exists():
        return target
    converter = converter_dir(root)
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    result = subprocess.run([sys.executable, "-c", CONVERT, str(converter), str(model_dir), str(staging)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not staging.exists():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    staging.rename(target)
    return target


if __name__ == "__main__":  # python -m tests.gguf_model: convert the tiny vicuna model, print its path
    print(build_gguf())
