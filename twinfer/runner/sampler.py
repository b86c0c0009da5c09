"""Sampler: next tokens and their logprobs from the model's last-position logits (vLLM v1 rules).

Order per step, as in vLLM: raw logprobs (log_softmax of the model's logits) → min_tokens →
penalties → greedy rows: argmax | random rows: temperature → min_p → top_k → top_p → draw.

NOTE: a random row is drawn by inverse CDF with one float64 uniform per row, not by the exponential
race: drawing V exponentials per row costs ~4× a softmax on CPU, while one uniform is free. A seeded
row takes its uniform from its own `torch.Generator`, so its tokens depend only on its own logits,
params and generator, never on its neighbours (up to float rounding at a CDF boundary); unseeded
rows share one batched `torch.rand`. Tokens are taken in token-id order, so the draw does not depend
on how a batch's top-k window happened to order ties. The filters become one threshold per row
(keep logits >= thr); rows whose kept set fits in the batch's top-W window are drawn from it
without touching the rest of the vocab.

Shape legend: N rows (requests this step), V vocab, G greedy rows, R random rows, E penalised
(row, token) pairs, F random rows with top_k/top_p, W top-k window, C chunk, P positions,
K 1 + top-n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twinfer.sampling_params import SAMPLING_EPS, SamplingParams

# Top-k window for top_p rows without a top_k: the nucleus usually fits; else 8x wider, then a sort.
_WINDOW = 1024
# Full-vocab draws pick a chunk by its mass, then a token inside it: float64 work stays [R, V/C].
_CHUNK = 1024
# Prompt logprobs run in row blocks so log_softmax never doubles a long prompt's [P, V] logits.
_PROMPT_BLOCK = 256

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingMetadata:
    """Per-step sampling inputs, one row per request; a tensor exists only when some row needs it.

    Random-row tensors are indexed by position among the random rows (`random_rows` order).
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_rows: torch.Tensor | None = None  # [G] int64; None when all rows are greedy or random
    random_rows: torch.Tensor | None = None  # [R] int64; None when all rows are greedy or random
    temperature: torch.Tensor | None = None  # [R] float32
    min_p: torch.Tensor | None = None  # [R] float32; None when no row uses min_p
    top_k: torch.Tensor | None = None  # [R] int64, vocab_size where off; None when no row uses it
    top_p: torch.Tensor | None = None  # [R] float32, 1.0 where off; None when no row uses it
    window: int = 0  # W, the top-k width the filters look at (0 when no row uses top_k/top_p)
    filter_rows: torch.Tensor | None = None  # [F] random rows with top_k or top_p; None: all
    top_p_rows: torch.Tensor | None = None  # positions among filter rows with top_p < 1; None: all
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # random-row pos -> gen
    # Penalties touch only the tokens seen: one entry per (row, token) in prompt ∪ output (prompt
    # only with a repetition penalty), so their cost follows the tokens, not N x V.
    penalty_rows: torch.Tensor | None = None  # [E] int64; None when no row has a penalty
    penalty_token_ids: torch.Tensor | None = None  # [E] int64
    penalty_counts: torch.Tensor | None = None  # [E] float32 occurrences in the row's output
    repetition_penalty: torch.Tensor | None = None  # [E] float32 of the entry's row; None: unused
    frequency_penalty: torch.Tensor | None = None  # [E] float32; None when no row uses it
    presence_penalty: torch.Tensor | None = None  # [E] float32; None when no row uses it
    bias_rows: torch.Tensor | None = None  # [B] int64 row of each (row, token) logit_bias entry
    bias_ids: torch.Tensor | None = None  # [B] int64 token of each entry
    bias_values: torch.Tensor | None = None  # [B] float32 added to that logit
    min_tokens_rows: torch.Tensor | None = None  # [M] int64 row of each (row, stop id) to mask
    min_tokens_ids: torch.Tensor | None = None  # [M] int64 stop id of each pair
    max_num_logprobs: int | None = None  # n of the top-n logprobs; None when no row asked
    logprob_rows: torch.Tensor | None = None  # [L] int64 rows that asked; None: all rows

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of the raw logits: no penalty, mask or logprobs."""
        return (
            self.all_greedy
            and self.penalty_rows is None
            and self.bias_rows is None
            and self.min_tokens_rows is None
            and self.max_num_logprobs is None
        )

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        stop_token_ids: list[frozenset[int]],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingMetadata:
        """Gather the batch's params into tensors; an all-greedy plain batch builds none.

        `stop_token_ids[i]` are the ids masked while row i is below min_tokens (EOS ids unless
        ignore_eos, plus stop_token_ids). `generators[i]` (on `device`) is request i's own
        generator, used when the row is random; it persists across steps with the request.
        """
        n = len(params)

        def rows_tensor(rows: list[int]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.long, device=device)

        def float_tensor(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        random = [i for i, p in enumerate(params) if p.temperature >= SAMPLING_EPS]
        md = cls(
            num_rows=n, vocab_size=vocab_size, all_greedy=not random, all_random=len(random) == n
        )
        if random and not md.all_random:
            is_random = set(random)
            md.greedy_rows = rows_tensor([i for i in range(n) if i not in is_random])
            md.random_rows = rows_tensor(random)
        if random:
            rp = [params[i] for i in random]
            md.temperature = float_tensor([p.temperature for p in rp])
            if any(p.min_p > 0.0 for p in rp):
                md.min_p = float_tensor([p.min_p for p in rp])
            ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in rp]
            max_k = max((k for k in ks if k < vocab_size), default=0)
            if max_k:
                md.top_k = torch.tensor(ks, dtype=torch.long, device=device)
            if any(p.top_p < 1.0 for p in rp):
                md.top_p = float_tensor([p.top_p for p in rp])
            filtered = [j for j, p in enumerate(rp) if ks[j] < vocab_size or p.top_p < 1.0]
            if filtered:
                # NOTE: one extra slot proves a row keeps no more than the window (W-th dropped).
                open_top_p = any(ks[j] == vocab_size for j in filtered)  # top_p without top_k
                md.window = min(vocab_size, (max(_WINDOW, max_k) if open_top_p else max_k) + 1)
            if filtered and len(filtered) < len(rp):
                md.filter_rows = rows_tensor(filtered)
            with_top_p = [f for f, j in enumerate(filtered) if rp[j].top_p < 1.0]
            if with_top_p and len(with_top_p) < len(filtered):
                md.top_p_rows = rows_tensor(with_top_p)
            md.generators = {j: g for j, i in enumerate(random) if (g := generators[i]) is not None}

        _fill_penalties(md, params, prompt_token_ids, output_token_ids, device)
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        if biased:
            rows, ids, values = zip(*biased, strict=True)
            md.bias_rows, md.bias_ids = rows_tensor(list(rows)), rows_tensor(list(ids))
            md.bias_values = float_tensor(list(values))
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                ids = [t for t in stop_token_ids[i] if t < vocab_size]
                mask_rows += [i] * len(ids)
                mask_ids += ids
        if mask_ids:
            md.min_tokens_rows = rows_tensor(mask_rows)
            md.min_tokens_ids = rows_tensor(mask_ids)

        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        if asked:
            md.max_num_logprobs = max(params[i].logprobs or 0 for i in asked)
            if len(asked) < n:
                md.logprob_rows = rows_tensor(asked)
        return md


@dataclass(slots=True)
class SamplerOutput:
    """Sampled tokens and, when some row asked, raw logprobs (rows that did not ask hold zeros)."""

    sampled_token_ids: torch.Tensor  # [N] int64
    logprob_token_ids: torch.Tensor | None = None  # [N, K] int64: sampled token, then top-n
    logprobs: torch.Tensor | None = None  # [N, K] float32
    sampled_ranks: torch.Tensor | None = None  # [N] int64, 1 = most likely


class Sampler:
    """Samples one token per row. NOTE: like vLLM, it may modify float32 `logits` in place."""

    def greedy(self, logits: torch.Tensor) -> SamplerOutput:
        """The argmax of each row, for a `plain_greedy` batch (logits in any float dtype)."""
        return SamplerOutput(sampled_token_ids=_argmax(logits))

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        md = metadata
        logits = logits.float()  # [N, V]; a no-op for float32
        raw = None
        if md.max_num_logprobs is not None:  # from the model's logits, before any processing
            raw = _take(logits, md.logprob_rows).log_softmax(-1)  # [L, V]
        apply_min_tokens(logits, md)
        if md.bias_rows is not None:  # OpenAI's logit_bias: added to the model's logits
            logits.index_put_((md.bias_rows, md.bias_ids), md.bias_values, accumulate=True)
        apply_penalties(logits, md)
        sampled = _sample(logits, md)  # [N]
        out = SamplerOutput(sampled_token_ids=sampled)
        if raw is None:
            return out
        assert md.max_num_logprobs is not None
        ids, lps, ranks = _gather_logprobs(
            raw, _take(sampled, md.logprob_rows), md.max_num_logprobs
        )
        if md.logprob_rows is not None:  # rows that did not ask stay zero
            rows = md.logprob_rows
            ids = ids.new_zeros(md.num_rows, ids.shape[1]).index_copy_(0, rows, ids)
            lps = lps.new_zeros(md.num_rows, lps.shape[1]).index_copy_(0, rows, lps)
            ranks = ranks.new_zeros(md.num_rows).index_copy_(0, rows, ranks)
        out.logprob_token_ids, out.logprobs, out.sampled_ranks = ids, lps, ranks
        return out


def compute_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logprob and rank of each target token, plus the top-`num_top` (prompt logprobs).

    logits [P, V] predict token_ids [P]. Returns ids [P, 1+n], logprobs [P, 1+n], ranks [P].
    """
    parts = [
        _gather_logprobs(
            logits[s : s + _PROMPT_BLOCK].float().log_softmax(-1),
            token_ids[s : s + _PROMPT_BLOCK],
            num_top,
        )
        for s in range(0, logits.shape[0], _PROMPT_BLOCK)
    ]
    if not parts:
        empty = torch.empty(0, 1 + num_top, device=logits.device)
        return empty.long(), empty, torch.empty(0, dtype=torch.long, device=logits.device)
    ids, lps, ranks = zip(*parts, strict=True)
    return torch.cat(ids), torch.cat(lps), torch.cat(ranks)


def apply_min_tokens(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Rows below min_tokens cannot pick a stop token yet (in place)."""
    if md.min_tokens_rows is not None and md.min_tokens_ids is not None:
        minus_inf = torch.tensor(_NEG_INF, device=logits.device)
        logits.index_put_((md.min_tokens_rows, md.min_tokens_ids), minus_inf)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Repetition (prompt ∪ output), frequency and presence (output) penalties, in place."""
    if md.penalty_rows is None or md.penalty_token_ids is None or md.penalty_counts is None:
        return
    index = (md.penalty_rows, md.penalty_token_ids)
    x = logits[index]  # [E]
    counts = md.penalty_counts  # [E]
    if md.repetition_penalty is not None:
        rep = md.repetition_penalty
        x = torch.where(x > 0, x / rep, x * rep)
    if md.frequency_penalty is not None:
        x = x - md.frequency_penalty * counts
    if md.presence_penalty is not None:
        x = x - md.presence_penalty * (counts > 0)
    logits.index_put_(index, x)


def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    if md.all_greedy:
        return _argmax(logits)
    if md.all_random:
        return _sample_random(logits, md)
    assert md.greedy_rows is not None and md.random_rows is not None
    sampled = torch.empty(md.num_rows, dtype=torch.long, device=logits.device)
    sampled[md.greedy_rows] = _argmax(logits[md.greedy_rows])
    sampled[md.random_rows] = _sample_random(logits[md.random_rows], md)
    return sampled


def _argmax(x: torch.Tensor) -> torch.Tensor:
    # NOTE: max(dim).indices is argmax (first maximum too) but ~2.5x faster on CPU.
    return x.max(-1).indices


def _sample_random(x: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """One token per random row; x [R, V] is scaled and masked in place."""
    assert md.temperature is not None
    rows, vocab = x.shape
    x.div_(md.temperature.unsqueeze(1))
    row_max = x.amax(-1)  # [R]
    thr, window = _keep_thresholds(x, row_max, md)  # [R]
    u = _uniforms(md, rows, x.device)  # [R] float64
    if window is None:
        full = None
    else:
        win_rows, values, ids = window
        tokens = torch.empty(rows, dtype=torch.long, device=x.device)
        tokens[win_rows] = _draw_window(values, ids, thr[win_rows], u[win_rows], vocab)
        rest = torch.ones(rows, dtype=torch.bool, device=x.device)
        rest[win_rows] = False
        full = rest.nonzero().squeeze(1)
        if full.numel() == 0:
            return tokens
    xr = _take(x, full)
    if md.min_p is not None or md.top_k is not None or md.top_p is not None:
        xr.masked_fill_(xr < _take(thr, full).unsqueeze(1), _NEG_INF)
    drawn = _draw_full(xr, _take(row_max, full), _take(u, full))
    if full is None:
        return drawn
    tokens[full] = drawn
    return tokens


def _keep_thresholds(
    x: torch.Tensor, row_max: torch.Tensor, md: SamplingMetadata
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Per random row, the lowest logit kept by min_p, then top_k, then top_p (keep x >= thr).

    x [R, V] is temperature-scaled. Ties at a threshold are all kept. Also returns, for the rows
    whose kept set fits in the top-W window, (rows [R'], window logits [R', W], window ids [R', W]).
    """
    # min_p: p >= min_p * p_max  <=>  x >= max + log(min_p); log(0) = -inf keeps all.
    thr = torch.full_like(row_max, _NEG_INF) if md.min_p is None else row_max + md.min_p.log()
    if md.top_k is None and md.top_p is None:
        return thr, None
    f = md.filter_rows
    xf, max_f, thr_f = _take(x, f), _take(row_max, f), _take(thr, f)  # [F, V], [F], [F]
    vocab, width = x.shape[1], md.window
    values, ids = xf.topk(width, dim=-1)  # [F, W] descending
    if md.top_k is not None:
        k = _take(md.top_k, f)  # [F]
        kth = values.gather(1, (k - 1).clamp(max=width - 1).unsqueeze(1)).squeeze(1)
        thr_f = torch.where(k < vocab, torch.maximum(thr_f, kth), thr_f)
    if md.top_p is not None:
        p_rows = md.top_p_rows  # [T] the filter rows with a top_p
        args = (xf, values, max_f, thr_f, _take(md.top_p, f))
        cut = _top_p_threshold(*(_take(t, p_rows) for t in args))  # [T]
        thr_f = cut if p_rows is None else thr_f.index_copy(0, p_rows, cut)
    thr = thr_f if f is None else thr.index_copy(0, f, thr_f)
    if width == vocab:
        in_window = torch.arange(values.shape[0], device=x.device)
    else:  # the window's last slot is dropped, so nothing past it is kept
        in_window = (values[:, -1] < thr_f).nonzero().squeeze(1)
        if in_window.numel() == 0:
            return thr, None
    win_rows = in_window if f is None else f[in_window]
    return thr, (win_rows, values[in_window], ids[in_window])


def _top_p_threshold(
    x: torch.Tensor,
    values: torch.Tensor,
    row_max: torch.Tensor,
    thr: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Raise thr to keep the smallest top set whose mass (among tokens >= thr) reaches top_p.

    x [T, V], values [T, W] its top-W descending, row_max/thr/top_p [T]. Rows whose set runs past
    the window retry with a wider top-k, then a full sort (vLLM always sorts the full vocab).
    """
    vocab, width = x.shape[1], values.shape[1]
    # Mass kept by min_p/top_k: from the window when the kept set fits in it, else the whole row.
    # NOTE: summed in float32 (cascade sum, ~1e-7 relative) then widened: float64 sums cost ~10x.
    w = _rel_mass(values, row_max, thr)  # [T, W]
    target = w.sum(-1).double()  # [T]
    if width < vocab and bool((spill := values[:, -1] >= thr).any()):
        rows = spill.nonzero().squeeze(1)
        target[rows] = _rel_mass(x[rows], row_max[rows], thr[rows]).sum(-1).double()
    target = target * top_p
    cut, done = _top_p_cut(values, w, target)
    while width < vocab and not bool(done.all()):
        late = (~done).nonzero().squeeze(1)
        width = min(vocab, width * 8)
        xl = x[late]  # [T', V]
        wide = xl.topk(width, -1).values if width < vocab else xl.sort(-1, descending=True).values
        w = _rel_mass(wide, row_max[late], thr[late])
        cut[late], done[late] = _top_p_cut(wide, w, target[late])
    return torch.maximum(thr, cut)


def _rel_mass(values: torch.Tensor, row_max: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """exp(values - row max) where values >= thr, else 0: unnormalised probabilities."""
    w = (values - row_max.unsqueeze(1)).exp_()
    return w.masked_fill_(values < thr.unsqueeze(1), 0.0)


def _top_p_cut(
    values: torch.Tensor, w: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last value kept in each descending row (mass before it < target), and whether the
    cut fell inside the row (then nothing past it is kept)."""
    mass_before = w.cumsum(-1, dtype=torch.float64) - w  # [T, W] float64
    keep = (mass_before < target.unsqueeze(1)) & (w > 0)  # a prefix; the top token always stays
    # NOTE: a top_p below float32's range (5e-324) makes the target 0: the top token still stays.
    num_kept = keep.sum(-1).clamp_(min=1)  # [T]
    cut = values.gather(1, (num_kept - 1).unsqueeze(1)).squeeze(1)
    return cut, num_kept < values.shape[1]


def _uniforms(md: SamplingMetadata, rows: int, device: torch.device) -> torch.Tensor:
    """One float64 uniform per random row: seeded rows from their own generator."""
    if len(md.generators) < rows:
        u = torch.rand(rows, dtype=torch.float64, device=device)
    else:
        u = torch.empty(rows, dtype=torch.float64, device=device)
    for pos, gen in md.generators.items():
        u[pos] = torch.rand(1, dtype=torch.float64, device=device, generator=gen)
    return u


def _draw_window(
    values: torch.Tensor, ids: torch.Tensor, thr: torch.Tensor, u: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Inverse-CDF draw among window tokens >= thr, taken in token-id order (batch-independent)."""
    keep = values >= thr.unsqueeze(1)  # [R', W]
    order = torch.where(keep, ids, vocab).sort(-1)  # kept ids ascending, then the dropped ones
    w = (values - values[:, :1]).exp_().masked_fill_(~keep, 0.0).gather(1, order.indices)
    cdf = w.cumsum(-1, dtype=torch.float64)  # [R', W]
    pick = _search(cdf, u * cdf[:, -1])
    return order.values.gather(1, pick.unsqueeze(1)).squeeze(1)


def _draw_full(x: torch.Tensor, row_max: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the whole vocab (tokens at -inf have no mass), in two levels.

    x [R, V] is overwritten: on CPU a fresh [R, V] buffer costs more in page faults than the math.
    """
    rows, vocab = x.shape
    w = x.sub_(row_max.unsqueeze(1)).exp_()  # [R, V] unnormalised probabilities
    size = min(_CHUNK, vocab)
    whole = vocab // size * size
    # NOTE: chunk masses summed in float32 (cascade sum) then widened: a float64 sum costs ~10x.
    mass = w[:, :whole].view(rows, -1, size).sum(-1)  # [R, V/C]
    if whole < vocab:  # the last, shorter chunk
        mass = torch.cat([mass, w[:, whole:].sum(-1, keepdim=True)], 1)
    mass = mass.double()
    cdf = mass.cumsum(-1)
    target = u * cdf[:, -1]  # [R]
    chunk = _search(cdf, target)  # [R]
    before = cdf.gather(1, (chunk - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    frac = (target - torch.where(chunk > 0, before, 0.0)) / mass.gather(1, chunk.unsqueeze(1))[:, 0]
    ids = chunk.unsqueeze(1) * size + torch.arange(size, device=x.device)  # [R, C]
    inner = w.gather(1, ids.clamp(max=vocab - 1)).masked_fill_(ids >= vocab, 0.0)
    inner_cdf = inner.cumsum(-1, dtype=torch.float64)  # [R, C]
    # The same fraction of the chunk's own float64 total, so the two sums never disagree.
    return chunk * size + _search(inner_cdf, frac * inner_cdf[:, -1])  # [R]


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index whose cdf exceeds target; never an index without mass, even when rounding
    puts target at or past the total (then the last index that adds mass)."""
    found = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    last_with_mass = (cdf < cdf[:, -1:]).sum(-1)
    return torch.minimum(found, last_with_mass)


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs [P, V], token_ids [P] -> ids [P, K], logprobs [P, K], ranks [P] (vLLM's rank)."""
    token_ids = token_ids.long().unsqueeze(1)  # [P, 1]
    token_lp = logprobs.gather(1, token_ids)  # [P, 1]
    ranks = (logprobs >= token_lp).sum(-1)  # [P]; 1 = most likely
    if num_top <= 0:
        return token_ids, token_lp, ranks
    top_lp, top_ids = logprobs.topk(num_top, dim=-1)  # [P, n]
    return torch.cat([token_ids, top_ids], 1), torch.cat([token_lp, top_lp], 1), ranks


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """t itself when rows is None (all rows), else those rows (a copy)."""
    return t if rows is None else t[rows]


def _fill_penalties(
    md: SamplingMetadata,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    device: torch.device,
) -> None:
    """One entry per (row, token) seen: the token's output count and the row's penalties."""
    rows = [
        i
        for i, p in enumerate(params)
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if not rows:
        return
    vocab = md.vocab_size
    outputs = [output_token_ids[i] for i in rows]
    keys, counts = _unique(_pair_keys(rows, outputs, vocab, device))  # [E'] row * V + token
    if any(params[i].repetition_penalty != 1.0 for i in rows):  # prompt tokens count as seen
        prompts = [prompt_token_ids[i] for i in rows]
        seen = _unique(torch.cat([_pair_keys(rows, prompts, vocab, device), keys]))[0]  # [E]
        at = torch.searchsorted(keys, seen).clamp(max=max(keys.numel() - 1, 0))
        counts = torch.where(keys[at] == seen, counts[at], 0) if keys.numel() else seen * 0
        keys = seen
    entry_rows = keys // vocab  # [E]
    md.penalty_rows, md.penalty_token_ids = entry_rows, keys % vocab
    md.penalty_counts = counts.float()

    def per_entry(values: list[float], neutral: float) -> torch.Tensor | None:
        if all(v == neutral for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32, device=device)[entry_rows]

    md.repetition_penalty = per_entry([p.repetition_penalty for p in params], 1.0)
    md.frequency_penalty = per_entry([p.frequency_penalty for p in params], 0.0)
    md.presence_penalty = per_entry([p.presence_penalty for p in params], 0.0)


def _pair_keys(
    rows: list[int], token_ids: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[T] int64 key row * V + token of every token of every row (ids >= vocab_size dropped)."""
    flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=device)
    lengths = torch.tensor([len(ids) for ids in token_ids], device=device)
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long, device=device), lengths)
    if bool((flat >= vocab_size).any()):
        valid = flat < vocab_size
        row_of, flat = row_of[valid], flat[valid]
    return row_of * vocab_size + flat


def _unique(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct keys and their counts. NOTE: torch.unique is ~10x slower on CPU."""
    return torch.unique_consecutive(keys.sort().values, return_counts=True)
