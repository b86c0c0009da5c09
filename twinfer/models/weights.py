"""HF checkpoint names -> twinfer parameters (+ shard ids), and the load loop the models share.

Fused parameters carry `shard_ids` (the pieces a full load must fill); a shard_id of None, or an
expert shard (None, name), fills the whole parameter at once (an already fused checkpoint tensor).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import Tensor, nn

from twinfer.layers.params import WeightShapeError, default_weight_loader

# Buffers some checkpoints carry that are not parameters (twinfer recomputes them), and
# compressed-tensors' `weight_shape` (the [out, in] config.json already gives).
_SKIP = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$|\.weight_shape$")

# Parameters weight formats add beside (or instead of) `weight`, fused like it.
_QUANT_PARAMS = (
    "weight_scale_inv|weight_packed|weight_scale|weight_zero_point|weight_g_idx"
    "|grid_q|grid_scale|grid_zero"
)

_EXPERT_SHARD = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3"}
_EXPERT_SHARD |= {"down_proj": "w2", "w2": "w2"}

# (HF name pattern, twinfer parameter name, shard id from the match)
_RULES: list[tuple[re.Pattern[str], str, Callable[[re.Match[str]], object]]] = [
    (
        re.compile(rf"^(.*)\.([qkv])_proj\.(weight|bias|{_QUANT_PARAMS})$"),
        r"\1.qkv_proj.\3",
        lambda m: m[2],
    ),
    (
        re.compile(rf"^(.*\.mlp)\.(gate|up)_proj\.(weight|bias|{_QUANT_PARAMS})$"),
        r"\1.gate_up_proj.\3",
        lambda m: 0 if m[2] == "gate" else 1,
    ),
    (
        re.compile(
            rf"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|w1|w3)\.(weight|{_QUANT_PARAMS})$"
        ),
        r"\1.w13_\4",
        lambda m: (int(m[2]), _EXPERT_SHARD[m[3]]),
    ),
    (
        re.compile(rf"^(.*\.mlp)\.experts\.(\d+)\.(down_proj|w2)\.(weight|{_QUANT_PARAMS})$"),
        r"\1.w2_\4",
        lambda m: (int(m[2]), "w2"),
    ),
    # transformers 5 in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    (re.compile(r"^(.*\.mlp)\.experts\.gate_up_proj$"), r"\1.w13_weight", lambda m: (None, "w13")),
    (re.compile(r"^(.*\.mlp)\.experts\.down_proj$"), r"\1.w2_weight", lambda m: (None, "w2")),
]


def resolve_name(name: str, params: dict[str, nn.Parameter]) -> tuple[str, object] | None:
    """(parameter name, shard id) for an HF name, or None when no parameter takes it."""
    if name in params:
        return name, None
    for pattern, target, shard in _RULES:
        m = pattern.match(name)
        if m is not None:
            param_name = m.expand(target)
            if param_name in params:
                return param_name, shard(m)
    return None


def _fills_whole(shard_id: object) -> bool:
    return shard_id is None or (isinstance(shard_id, tuple) and shard_id[0] is None)


def load_hf_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, Tensor]],
    rename: Callable[[str], str] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> set[str]:
    """Feed each (HF name, tensor) to its parameter's weight_loader.

    Returns the names of the parameters filled completely (every shard of a fused one).
    `rename` maps an HF name to the module's naming first; `skip(name)` drops a tensor on purpose.

    A module with `prepare_when_loaded` (MoE layers) is prepared (`process_weights_after_loading`)
    as soon as all its own parameters are filled: its experts are packed and the checkpoint's copy
    freed while later layers load, so host RAM never holds every layer in both forms.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled: dict[str, set[object]] = {}
    complete: set[str] = set()
    for hf_name, tensor in weights:
        if _SKIP.search(hf_name):
            continue
        name = rename(hf_name) if rename is not None else hf_name
        if skip is not None and skip(name):
            continue
        target = resolve_name(name, params)
        if target is None:
            raise ValueError(
                f"checkpoint weight {hf_name!r} matches no parameter of "
                f"{type(model).__name__}; the checkpoint does not match config.json "
                "(architecture, layer count or expert count)."
            )
        param_name, shard_id = target
        param = params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id)
        except WeightShapeError as e:
            raise ValueError(
                f"weight {hf_name} has shape {list(e.got)} but the model expects "
                f"{list(e.expected)}; the checkpoint does not match config.json."
            ) from None
        required = getattr(param, "shard_ids", None)
        keys = filled.setdefault(param_name, set())
        if required is None or _fills_whole(shard_id):
            keys.update(required or {None})
        else:
            keys.add(shard_id)
        if param_name not in complete and keys >= (required or {None}):
            complete.add(param_name)
            _prepare_if_loaded(modules.get(param_name.rpartition(".")[0]), param_name, complete)
    return complete


def _prepare_if_loaded(module: nn.Module | None, param_name: str, complete: set[str]) -> None:
    if module is None or not getattr(module, "prepare_when_loaded", False):
        return
    prefix = param_name.rpartition(".")[0]
    if all(f"{prefix}.{n}" in complete for n, _ in module.named_parameters(recurse=False)):
        module.process_weights_after_loading()
