"""The "triton" expert backend: the fused Triton MoE kernels on CUDA tensors.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size.
"""

from __future__ import annotations

from torch import Tensor

from twinfer.layers.moe.backends import register_expert_backend
from twinfer.layers.moe.triton_kernels import fused_moe


@register_expert_backend("triton")
class TritonExpertBackend:
    """Grouped GEMMs over expert-sorted token slots (vLLM's fused_moe design): one alignment
    launch, gate+up with SiLU fused, down weighted by the routing weights, a sum over K. No host
    sync, so it runs inside CUDA graphs."""

    name = "triton"

    def forward(
        self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor
    ) -> Tensor:
        """hidden [T, H], topk_weights [T, K], topk_ids [T, K] int, w13 [E, 2I, H], w2 [E, H, I]
        -> [T, H] in hidden's dtype."""
        return fused_moe(hidden, topk_weights, topk_ids, w13, w2)
