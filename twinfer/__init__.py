"""twinfer: an LLM inference server for big mixture-of-experts models on a GPU plus a big CPU."""

from __future__ import annotations

from twinfer.outputs import CompletionOutput, Logprob, RequestOutput
from twinfer.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # NOTE: LLM is imported lazily so `import twinfer` stays cheap (no torch) for the CLI's --help.
    if name == "LLM":
        from twinfer.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'twinfer' has no attribute {name!r}")
