"""Shared fixtures: a tiny tokenizer that fits tiny_models' vocabulary, and tiny checkpoints on disk."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

CALIBRATION_TEXT = Path(__file__).parents[1] / "awqforge" / "data" / "calibration_en.txt"


# Triton's interpreter must be on before triton is first imported (its own tl.sum & co. are made then), and
# test modules import transformers, which may import triton: tests/test_kernels_triton.py runs the kernel on
# CPU tensors through it. (tests/test_kernels_triton_aot.py compiles for real GPUs in processes without it.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@atexit.register
def _quiet_triton_teardown() -> None:
    """triton 3.x's bindings print `nanobind: leaked ...` (hundreds of lines) when the interpreter tears its
    modules down, after pytest's summary. Registered first, this runs last of the exit handlers: from here on
    only module teardown writes to stderr, and only this process's (the workers and servers that tests start
    block triton without a GPU: worker/startup.py, awqforge.cli.skip_triton_without_cuda)."""
    if sys.modules.get("triton") is not None:
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


# scripts/test.sh runs the service tests and the engine's in two processes side by side: each process's torch
# takes its share of the cores.
_PROCESSES = int(os.environ.get("AWQFORGE_TEST_PROCESSES", "1"))
if _PROCESSES > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _PROCESSES))


def train_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE of vocab_size tokens trained on the bundled English text (ids < vocab_size;
    <pad>, <s>, </s> are 0, 1, 2 as in tiny_models' configs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CALIBRATION_TEXT)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread; OpenMP workers spinning on a shared machine cost far more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """tiny_checkpoint(family, dtype=torch.float32, **overrides) -> folder with safetensors + tokenizer (cached)."""
    from tiny_models import build_tiny_model

    cache: dict[tuple, Path] = {}

    def make(family: str, dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = (family, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt-{family}")
            build_tiny_model(family, dtype=dtype, **overrides).save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return make
