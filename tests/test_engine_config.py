"""EngineConfig settings of the CUDA path: bad values are clear errors that name the fix."""

from __future__ import annotations

import pytest
import torch

from twinfer import LLM, SamplingParams
from twinfer.config import EngineConfig


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_gpu_memory_utilization_outside_0_1_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=value)


@pytest.mark.parametrize("field", ["attention_backend", "moe_backend", "load_format"])
def test_unknown_backend_or_load_format_names_the_choices(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} 'flash' is unknown; choose one of"):
        EngineConfig(**{field: "flash"})


def test_triton_backend_on_the_cpu_says_use_torch() -> None:
    config = EngineConfig(attention_backend="triton")
    with pytest.raises(ValueError, match="needs a CUDA GPU; use torch on the CPU"):
        config.resolved_backend("attention_backend", torch.device("cpu"))
    assert EngineConfig().resolved_backend("moe_backend", torch.device("cpu")) == "torch"


def test_cuda_graphs_follow_enforce_eager_and_cudagraph_mode() -> None:
    cuda = torch.device("cuda")
    assert EngineConfig().use_cuda_graphs(cuda)
    assert not EngineConfig(enforce_eager=True).use_cuda_graphs(cuda)
    assert not EngineConfig(compilation_config={"cudagraph_mode": "none"}).use_cuda_graphs(cuda)
    assert not EngineConfig().use_cuda_graphs(torch.device("cpu"))


def test_dummy_weights_serve_a_config_only_checkpoint(tmp_path) -> None:
    """--load-format dummy: random weights for a shape from its config.json alone."""
    from twinfer.bench.random_model import make_random_checkpoint

    path = make_random_checkpoint(
        "qwen3-moe-tiny", tmp_path, dtype=torch.float32, tokenizer_from=None, weights=False
    )
    assert not list(path.glob("*.safetensors"))
    llm = LLM(str(path), load_format="dummy", dtype="float32", max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    out = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    # (the CPU frees plain weights it prepacked: those are empty)
    weights = [p for p in llm.engine.runner.model.parameters() if p.numel()]
    assert all(p.abs().max() <= 1e-3 for p in weights) and any(p.abs().max() > 0 for p in weights)
