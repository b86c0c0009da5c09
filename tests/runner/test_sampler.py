"""Sampler tests against small straightforward references (vLLM v1 semantics), CPU only.

Shape legend: N rows, V vocab, P positions.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from twinfer.runner.sampler import (
    _WINDOW,
    Sampler,
    SamplingMetadata,
    _draw_full,
    _keep_thresholds,
    apply_min_tokens,
    apply_penalties,
    compute_token_logprobs,
)
from twinfer.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 2


def build(
    params: list[SamplingParams],
    vocab: int,
    *,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingMetadata:
    n = len(params)
    stops = [
        frozenset(({EOS} if not p.ignore_eos else set()) | set(p.stop_token_ids)) for p in params
    ]
    empty: list[int] = []
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [empty] * n,
        outputs if outputs is not None else [empty] * n,
        generators if generators is not None else [None] * n,
        stops,
        vocab,
        CPU,
    )


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # NOTE: not torch.testing.assert_close, whose first call imports torch.distributed (~4 s).
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    return Sampler()(logits.clone(), md).sampled_token_ids


def generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def fields_of(p: SamplingParams) -> dict[str, object]:
    return {name: getattr(p, name) for name in p.__dataclass_fields__}


def ref_keep_mask(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """vLLM v1's filters on one row [V], written out plainly: which tokens stay allowed."""
    x = x / p.temperature
    probs = x.softmax(-1)
    x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if 0 < p.top_k < x.shape[0]:  # top_k >= V keeps everything
        kth = x.sort(descending=True).values[p.top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        ascending, idx = x.sort()
        cum = ascending.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return x > float("-inf")


def ref_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    keep = ref_keep_mask(x, p)
    return (x / p.temperature).masked_fill(~keep, float("-inf")).softmax(-1)


def sampler_keep_mask(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The sampler's allowed tokens per row (all rows random): scaled logits >= threshold."""
    md = build(params, logits.shape[1])
    assert md.temperature is not None
    x = logits / md.temperature.unsqueeze(1)
    thr, _ = _keep_thresholds(x, x.amax(-1), md)
    return x >= thr.unsqueeze(1)


# --- greedy ----------------------------------------------------------------------------------


def test_all_greedy_no_penalties_is_argmax_and_cheap() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 1000)
    md = build([SamplingParams(temperature=0.0) for _ in range(8)], 1000)
    assert md.all_greedy and md.temperature is None and md.penalty_rows is None
    assert md.min_tokens_rows is None and md.max_num_logprobs is None
    out = Sampler()(logits.clone(), md)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_temperature_zero_rows_are_argmax_in_mixed_batch() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 500)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(6)]
    got = sample(logits, build(params, 500, generators=[generator(p.seed) for p in params]))
    assert torch.equal(got[1::2], logits[1::2].argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_equals_greedy(temperature: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(16, 3000)
    params = [SamplingParams(temperature=temperature, top_k=1, seed=i) for i in range(8)]
    params += [SamplingParams(temperature=temperature, top_k=1) for _ in range(8)]
    got = sample(logits, build(params, 3000, generators=[generator(p.seed) for p in params]))
    assert torch.equal(got, logits.argmax(-1))


# --- seeds -----------------------------------------------------------------------------------


def run_steps(
    steps: list[torch.Tensor], params: list[SamplingParams], gens: list[torch.Generator | None]
) -> list[list[int]]:
    """Sample every step's logits [N, V] with persistent generators; tokens per row."""
    out: list[list[int]] = [[] for _ in params]
    for logits in steps:
        tokens = sample(logits, build(params, logits.shape[1], outputs=out, generators=gens))
        for row, t in zip(out, tokens.tolist(), strict=True):
            row.append(t)
    return out


SEEDED_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=50),
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=1500, top_p=0.95),  # k beyond the window
    SamplingParams(temperature=4.0, top_p=0.999),  # top_p set beyond the window: full sort
    SamplingParams(temperature=0.8, top_k=40, top_p=0.8, min_p=0.02, frequency_penalty=0.5),
]


@pytest.mark.parametrize("case", range(len(SEEDED_CASES)))
def test_seeded_row_same_alone_or_batched(case: int) -> None:
    vocab, seed = 3000, 1234
    target = SamplingParams(**{**fields_of(SEEDED_CASES[case]), "seed": seed})
    torch.manual_seed(3)
    steps = [torch.randn(6, vocab) * 3 for _ in range(5)]
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=0.9, top_k=2000),  # widens the batch's top-k window
        SamplingParams(temperature=1.1, top_p=0.5, seed=7),
        SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.3),
    ]
    # The same request alone, twice (fresh generators from the same seed): same tokens.
    alone = run_steps([s[2:3] for s in steps], [target], [generator(seed)])
    again = run_steps([s[2:3] for s in steps], [target], [generator(seed)])
    assert alone == again
    # Batched at row 2 between seeded, unseeded and greedy neighbours: still the same tokens.
    params = neighbours[:2] + [target] + neighbours[2:]
    gens = [generator(p.seed) for p in params]
    torch.manual_seed(12345)  # unseeded neighbours draw from the default generator
    batched = run_steps(steps, params, gens)
    assert batched[2] == alone[0]


def test_different_seeds_differ() -> None:
    torch.manual_seed(4)
    steps = [torch.randn(1, 1000) for _ in range(6)]
    p = SamplingParams(temperature=1.0, seed=0)
    a = run_steps(steps, [p], [generator(1)])
    b = run_steps(steps, [p], [generator(2)])
    assert a != b


def test_unseeded_rows_follow_default_generator() -> None:
    logits = torch.randn(4, 1000)
    params = [SamplingParams(temperature=1.0) for _ in range(4)]
    torch.manual_seed(5)
    a = sample(logits, build(params, 1000))
    torch.manual_seed(5)
    b = sample(logits, build(params, 1000))
    assert torch.equal(a, b)


# --- filters ---------------------------------------------------------------------------------

FILTER_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.3, top_k=200),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=0.5, top_p=0.9),
    SamplingParams(temperature=3.0, top_p=0.95),  # keeps more than the window
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=2.0, min_p=0.3, top_k=50, top_p=0.7),
    SamplingParams(temperature=1.0, top_k=1500),  # k beyond the window
    SamplingParams(temperature=0.9, top_k=20, top_p=0.999),
]


def test_filter_masks_equal_reference() -> None:
    torch.manual_seed(6)
    vocab = 4000
    logits = torch.randn(len(FILTER_CASES), vocab) * 2
    got = sampler_keep_mask(logits, FILTER_CASES)
    for row, p in enumerate(FILTER_CASES):
        want = ref_keep_mask(logits[row], p)
        assert torch.equal(got[row], want), f"row {row}: {p}"
    assert int(got[5].sum()) > _WINDOW  # the full-sort top_p path was taken


def test_filter_masks_do_not_depend_on_neighbours() -> None:
    torch.manual_seed(7)
    logits = torch.randn(len(FILTER_CASES), 4000) * 2
    batched = sampler_keep_mask(logits, FILTER_CASES)
    for row, p in enumerate(FILTER_CASES):
        assert torch.equal(sampler_keep_mask(logits[row : row + 1], [p])[0], batched[row])


def test_top_k_keeps_ties() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    got = sampler_keep_mask(logits, [SamplingParams(top_k=2)])
    assert got.tolist() == [[True, False, True, True, True, False]]


@pytest.mark.parametrize("case", range(len(FILTER_CASES)))
def test_draws_follow_reference_distribution(case: int) -> None:
    """Many independent draws of one row (rows of one batch) match the reference probabilities."""
    p = FILTER_CASES[case]
    torch.manual_seed(8)
    vocab, draws = 64, 20000
    row = torch.randn(vocab) * 2
    logits = row.expand(draws, vocab).contiguous()
    tokens = sample(logits, build([p] * draws, vocab))
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    want = ref_probs(row, p)
    assert bool((freq[want == 0] == 0).all()), "drew a filtered token"
    assert (freq - want).abs().max() < 0.015


def test_full_vocab_draws_follow_distribution() -> None:
    """Rows keeping more than the window are drawn over the whole vocab: check that path too."""
    torch.manual_seed(9)
    vocab, draws = 3 * _WINDOW + 17, 6000
    row = torch.randn(vocab)
    row[:4] += 4.0  # a few likely tokens, checked one by one
    row[100:200] = float("-inf")  # never drawn
    p = SamplingParams(temperature=1.0, min_p=1e-4)
    tokens = sample(row.expand(draws, vocab).contiguous(), build([p] * draws, vocab))
    want = ref_probs(row, p)
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    assert bool((freq[want == 0] == 0).all())
    assert (freq[:4] - want[:4]).abs().max() < 0.03
    buckets = torch.arange(vocab) // 256  # coarse mass per id range
    got_b = torch.zeros(int(buckets.max()) + 1).index_add_(0, buckets, freq)
    want_b = torch.zeros_like(got_b).index_add_(0, buckets, want)
    assert (got_b - want_b).abs().max() < 0.03


def test_full_draw_is_inverse_cdf_and_never_picks_masked() -> None:
    torch.manual_seed(10)
    vocab = 2500
    x = torch.randn(3, vocab)
    x[:, ::3] = float("-inf")
    x[2, 2400:] = float("-inf")
    u = torch.tensor([0.0, 0.37, 1.0 - 2.0**-53], dtype=torch.float64)
    row_max = x.amax(-1)
    got = _draw_full(x.clone(), row_max, u)
    cdf = (x - row_max.unsqueeze(1)).exp().double().cumsum(-1)
    want = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    want = torch.minimum(want, (cdf < cdf[:, -1:]).sum(-1))
    assert torch.equal(got, want)
    assert bool(torch.isfinite(x[torch.arange(3), got]).all())


# --- penalties and min_tokens ----------------------------------------------------------------


def ref_penalties(
    x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    x = x.clone()
    for t in set(prompt) | set(output):
        r = p.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def test_penalties_equal_reference() -> None:
    torch.manual_seed(11)
    vocab = 300
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.7, temperature=0.0),
        SamplingParams(frequency_penalty=0.8),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(repetition_penalty=1.2, frequency_penalty=-0.5, presence_penalty=1.0),
    ]
    prompts = [torch.randint(0, vocab, (40,)).tolist() for _ in params]
    outputs = [torch.randint(0, vocab, (25,)).tolist() for _ in params]
    outputs[3] += [7, 7, 7]
    logits = torch.randn(len(params), vocab) * 3
    md = build(params, vocab, prompts=prompts, outputs=outputs)
    assert md.penalty_rows is not None and set(md.penalty_rows.tolist()) == {1, 2, 3, 4, 5}
    got = logits.clone()
    apply_penalties(got, md)
    for i, p in enumerate(params):
        assert_close(got[i], ref_penalties(logits[i], p, prompts[i], outputs[i]))
    # The greedy row with a penalty picks the argmax of the penalised logits.
    want = ref_penalties(logits[2], params[2], prompts[2], outputs[2]).argmax()
    assert sample(logits, md)[2] == want


def test_min_tokens_masks_stop_ids_only_below_min_tokens() -> None:
    vocab = 50
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True),
        SamplingParams(temperature=0.0),
    ]
    outputs = [[1, 1], [1, 1, 1], [1], []]
    logits = torch.zeros(4, vocab)
    logits[:, EOS] = 5.0
    logits[:, 9] = 4.0
    md = build(params, vocab, outputs=outputs)
    got = logits.clone()
    apply_min_tokens(got, md)
    inf = float("-inf")
    assert got[0, EOS] == inf and got[0, 9] == inf  # 2 < 3 generated: EOS and stop id masked
    assert torch.equal(got[1], logits[1])  # reached min_tokens
    assert got[2, EOS] == 5.0 and got[2, 9] == inf  # ignore_eos: only the stop id
    assert torch.equal(got[3], logits[3])
    assert sample(logits, md).tolist() == [0, EOS, EOS, EOS]


def test_min_tokens_holds_for_random_rows() -> None:
    vocab = 20
    logits = torch.zeros(500, vocab)
    logits[:, EOS] = 8.0  # nearly always EOS if not masked
    params = [SamplingParams(temperature=1.0, min_tokens=1)] * 500
    assert EOS not in sample(logits, build(params, vocab)).tolist()


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_raw_with_ranks_and_top_n() -> None:
    torch.manual_seed(12)
    vocab = 400
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0),
        SamplingParams(temperature=0.7, logprobs=0, top_k=10),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, logprobs=5, frequency_penalty=1.0, seed=3),
    ]
    logits = torch.randn(len(params), vocab) * 2
    md = build(
        params,
        vocab,
        prompts=[list(range(30))] * 4,
        outputs=[[5, 6], [7], [], [8, 8]],
        generators=[generator(p.seed) for p in params],
    )
    out = Sampler()(logits.clone(), md)
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.sampled_ranks is not None
    assert out.logprobs.shape == (4, 6) and out.logprobs.dtype == torch.float32
    raw = logits.log_softmax(-1)
    for row in (0, 1, 3):
        tok = int(out.sampled_token_ids[row])
        n = params[row].logprobs or 0
        assert int(out.logprob_token_ids[row, 0]) == tok
        assert_close(out.logprobs[row, 0], raw[row, tok])
        assert int(out.sampled_ranks[row]) == int((raw[row] >= raw[row, tok]).sum())
        top = raw[row].topk(n)
        assert out.logprob_token_ids[row, 1 : 1 + n].tolist() == top.indices.tolist()
        assert_close(out.logprobs[row, 1 : 1 + n], top.values)
    assert int(out.sampled_ranks[2]) == 0 and bool((out.logprobs[2] == 0).all())


def test_prompt_logprobs() -> None:
    torch.manual_seed(13)
    positions, vocab = 600, 300  # more positions than one block
    logits = torch.randn(positions, vocab) * 3
    targets = torch.randint(0, vocab, (positions,))
    ids, lps, ranks = compute_token_logprobs(logits, targets, 4)
    raw = logits.log_softmax(-1)
    target_lp = raw.gather(1, targets.unsqueeze(1)).squeeze(1)
    assert ids.shape == (positions, 5) and lps.shape == (positions, 5)
    assert torch.equal(ids[:, 0], targets)
    assert_close(lps[:, 0], target_lp)
    assert torch.equal(ranks, (raw >= target_lp.unsqueeze(1)).sum(-1))
    top = raw.topk(4, dim=-1)
    assert torch.equal(ids[:, 1:], top.indices)
    assert_close(lps[:, 1:], top.values)
    # Only the target when no top-n is asked; rank 1 for the argmax.
    ids0, lps0, ranks0 = compute_token_logprobs(logits[:3], logits[:3].argmax(-1), 0)
    assert ids0.shape == (3, 1) and ranks0.tolist() == [1, 1, 1]


def test_top_k_ties_past_the_window_are_kept() -> None:
    """Ties at the k-th value beyond the top-(k+1) window: kept, and drawn from the full vocab."""
    vocab = 3000
    row = torch.full((vocab,), -1.0)
    row[10] = 2.0
    row[::7] = 1.0  # 429 tokens tie for the 2nd place
    p = SamplingParams(temperature=1.0, top_k=2)
    assert torch.equal(sampler_keep_mask(row.unsqueeze(0), [p])[0], ref_keep_mask(row, p))
    tokens = sample(row.expand(3000, vocab).contiguous(), build([p] * 3000, vocab))
    assert set(tokens.tolist()) <= set(ref_keep_mask(row, p).nonzero().squeeze(1).tolist())
    assert len(set(tokens.tolist())) > 300  # the ties are drawn too, not only the window's


def test_penalties_ignore_empty_rows_and_out_of_vocab_ids() -> None:
    vocab = 10
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)] * 3
    prompts: list[list[int]] = [[], [3, 3, 42], [1]]
    outputs: list[list[int]] = [[], [], [1, 11, 1]]
    logits = torch.ones(3, vocab)
    got = logits.clone()
    apply_penalties(got, build(params, vocab, prompts=prompts, outputs=outputs))
    for i, p in enumerate(params):
        want = ref_penalties(logits[i], p, [t for t in prompts[i] if t < vocab], outputs[i][:1] * 2)
        assert_close(got[i], want)


def test_top_p_past_the_window_widens_then_sorts() -> None:
    """Nuclei wider than the window: one fits the 8x window, one needs the full sort."""
    torch.manual_seed(14)
    vocab = 10000
    logits = torch.randn(3, vocab) * 0.5
    params = [SamplingParams(top_p=0.5), SamplingParams(top_p=0.97), SamplingParams(top_k=3)]
    got = sampler_keep_mask(logits, params)
    kept = got.sum(-1).tolist()
    assert _WINDOW < kept[0] < 8 * (_WINDOW + 1) < kept[1]
    for row, p in enumerate(params):
        assert torch.equal(got[row], ref_keep_mask(logits[row], p)), f"row {row}: {p}"


def test_a_vanishing_top_p_keeps_the_top_token() -> None:
    """top_p = 5e-324 (found by fuzzing the server) rounds to 0 in float32: still the top token."""
    torch.manual_seed(15)
    logits = torch.randn(2, 1025)
    params = [SamplingParams(top_p=5e-324), SamplingParams(top_p=1e-40, top_k=5)]
    got = sampler_keep_mask(logits, params)
    assert got.sum(-1).tolist() == [1, 1]
    assert got.float().argmax(-1).tolist() == logits.argmax(-1).tolist()
    tokens = sample(logits, build(params, 1025))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_logit_bias_is_added_to_its_rows_logits_only() -> None:
    """OpenAI's logit_bias: +100 forces a token, -100 bans one; rows without it are untouched,
    and the logprobs stay the model's (before any processing)."""
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={int(logits[2].argmax()): -100.0}, logprobs=1),
    ]
    md = build(params, 50)
    assert not md.plain_greedy and md.bias_rows.tolist() == [0, 2]
    out = Sampler()(logits.clone(), md)
    banned = logits[2].clone()
    banned[logits[2].argmax()] -= 100
    want = [7, int(logits[1].argmax()), int(banned.argmax())]
    assert out.sampled_token_ids.tolist() == want
    assert_close(out.logprobs[2, 0], logits[2].log_softmax(-1)[want[2]])


@pytest.mark.parametrize(
    ("bias", "message"),
    [({-1: 1.0}, "token ids"), ({3: 101.0}, r"\[-100, 100\]"), ({3: float("nan")}, "100")],
)
def test_bad_logit_bias_names_the_field(bias, message) -> None:
    with pytest.raises(ValueError, match=f"logit_bias .*{message}"):
        SamplingParams(logit_bias=bias)
