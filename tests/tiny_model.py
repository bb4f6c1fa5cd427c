"""A tiny random Llama model that FastChat's real model_worker can serve on the CPU.

No weights can be downloaded here, so the model is built locally in a few seconds
(docs/fastchat-protocol.md#failure-modes): a byte-level BPE tokenizer trained on some of the Python standard
library's own source, wrapped in PreTrainedTokenizerFast, and a randomly initialised
LlamaForCausalLM. Both are saved with save_pretrained into a directory whose name makes
FastChat's model adapters pick the wanted conversation template:

* ``vicuna`` in the name: VicunaAdapter, template ``vicuna_v1.1``;
* ``llama-2`` in the name: Llama2Adapter, template ``llama-2``.

The text it generates is gibberish, but every code path in the worker is FastChat's own.
Built models are cached under ``tests/.models/<BUILD_VERSION>/`` (git-ignored), so only the
first run pays for the build. Seeds are fixed: the same inputs give the same files.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when anything below changes what is built: the cache key.
BUILD_VERSION = "v1"
MODELS_DIR = Path(__file__).resolve().parent / ".models"

# FastChat template name -> model directory name (FastChat matches on the directory's basename).
DIRECTORY_NAMES = {
    "vicuna_v1.1": "vicuna-tiny",
    "vicuna": "vicuna-tiny",
    "llama-2": "llama-2-chat-tiny",
    "llama-2-chat": "llama-2-chat-tiny",
}

VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
SEED = 1234
# Standard-library modules whose source trains the tokenizer: plain English docstrings and
# code, present in every CPython 3.11 build, a few hundred kB in all (trains in about a second).
TRAINING_MODULES = [
    "textwrap.py", "string.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "difflib.py", "argparse.py", "fractions.py", "shlex.py", "csv.py", "calendar.py",
    "pprint.py", "dataclasses.py", "functools.py",
]
# Used when the standard library's sources are not on disk (e.g. a stripped Python).
FALLBACK_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: Hello there! "
    "ASSISTANT: Hi, how can I help you today? [INST] <<SYS>> You are a helpful assistant. "
    "<</SYS>> What is the capital of France? [/INST] Paris is the capital of France. "
    "def function(argument):\n    return argument + 1\n\nclass Example:\n    pass\n"
)


def build_tiny_model(directory: Path = MODELS_DIR, template: str = "vicuna_v1.1") -> Path:
    """The directory of a tiny model for ``template`` ("vicuna_v1.1" or "llama-2"), built if needed.

    ``directory`` is the cache root; the model lands in ``directory/BUILD_VERSION/<name>``.
    Safe to call from several processes at once: each builds into a temporary directory and
    renames it into place.
    """
    try:
        name = DIRECTORY_NAMES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(DIRECTORY_NAMES)}") from None
    target = Path(directory) / BUILD_VERSION / name
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not a concurrent builder's success
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def training_text() -> list[str]:
    lib = Path(os.__file__).resolve().parent
    texts = []
    for module in TRAINING_MODULES:
        path = lib / module
        if path.exists():
            texts.append(path.read_text(encoding="utf-8"))
    return texts or [FALLBACK_TEXT] * 50


def build_tokenizer():
    """A byte-level BPE tokenizer that prepends ``<s>`` as Llama's does, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _build(directory: Path) -> None:
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


if __name__ == "__main__":  # python -m tests.tiny_model [ROOT]: build both, print their paths
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else MODELS_DIR
    for name in ("vicuna_v1.1", "llama-2"):
        print(build_tiny_model(root, name))
