"""Vocabulary-parallel token embedding and LM head.

Shapes: `T` tokens, `N` rows to score, `H` hidden, `V` vocab. Each rank holds a contiguous slice of
ceil(V / tp) vocabulary rows; the last slice is zero-padded when tp does not divide V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinfer.layers.linear import tp_all_gather, tp_all_reduce
from twinfer.layers.params import check_shape, new_param
from twinfer.layers.quantization.cpu_kernels import cpu_prepack, packed_linear
from twinfer.parallel import ParallelConfig


class VocabParallelEmbedding(nn.Module):
    """Token id -> embedding row; ids outside this rank's slice add zeros to the all-reduce."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.parallel = parallel or ParallelConfig()
        self.prefix = prefix
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        tp = self.parallel.tp_size
        # NOTE: pad instead of requiring tp | V: vocab sizes such as 151936 or 32000 are not
        # divisible by every tensor_parallel_size; padded rows are zero and trimmed from logits.
        self.num_embeddings_per_partition = -(-num_embeddings // tp)
        self.vocab_start = self.parallel.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = new_param(self.num_embeddings_per_partition, embedding_dim)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        check_shape(loaded_weight, (self.num_embeddings, self.embedding_dim))
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [T, H]
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # [T]
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside[:, None], 0)  # [T, H]
        return tp_all_reduce(out, self.parallel)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, per_partition={self.weight.shape[0]}"


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden -> vocabulary logits with this rank's vocab slice; logits gathered over ranks."""

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings); checkpoints may omit lm_head."""
        self.weight = embed_tokens.weight

    packed_weight: Tensor | None = None

    def process_weights_after_loading(self) -> None:
        # NOTE: the plain weight stays: a tied embedding still looks rows up in it.
        self.packed_weight = cpu_prepack(self.weight)

    def compute_logits(self, hidden: Tensor, float32: bool = True) -> Tensor:
        """[N, H] -> [N, V] logits, float32 (or the model dtype with float32=False)."""
        if self.packed_weight is not None:
            logits = packed_linear(hidden, self.packed_weight, None)  # [N, V/tp]
        else:
            logits = F.linear(hidden, self.weight)  # [N, V/tp] in the model dtype, as HF's lm_head
        logits = tp_all_gather(logits, self.parallel)  # [N, V padded]
        logits = logits[:, : self.num_embeddings]
        return logits.to(torch.float32) if float32 else logits

    def forward(self, input_ids: Tensor) -> Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding; call compute_logits(hidden).")
