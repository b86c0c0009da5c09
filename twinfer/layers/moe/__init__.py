"""Mixture-of-experts: MoELayer (router + placed experts) and the expert-backend registry."""

from twinfer.layers.moe.backends import (
    ExpertBackend,
    available_expert_backends,
    get_expert_backend,
    register_expert_backend,
)
from twinfer.layers.moe.layer import MoELayer
from twinfer.layers.moe.placement import ExpertPlacement

__all__ = [
    "ExpertBackend",
    "ExpertPlacement",
    "MoELayer",
    "available_expert_backends",
    "get_expert_backend",
    "register_expert_backend",
]
