"""decode_rate: a decode figure is the decode steps' own time, never the noise between two runs."""

from __future__ import annotations

import itertools

import pytest

from twinfer.bench.cpu_decode import decode_rate


def timer(first: list[float], full: list[float]):
    """run(n): seconds from `first` for n == 1, from `full` otherwise (the warm-up is n == 4)."""
    firsts, fulls = itertools.cycle(first), itertools.cycle(full)

    def run(n: int) -> float:
        return next(firsts) if n == 1 else next(fulls)

    return run


def test_rate_is_decode_tokens_over_the_decode_time() -> None:
    # 2 prompts, 11 decode steps each, 1.0 s of decode beyond the first token.
    assert decode_rate(timer([0.5], [1.5]), 2, 12) == pytest.approx(22.0)


def test_a_disturbed_first_run_is_retried_away() -> None:
    # The first two n=1 runs were disturbed (1.6 s); later ones show the real 0.5 s.
    assert decode_rate(timer([1.6, 1.6, 0.5], [1.5]), 1, 12) == pytest.approx(11.0)


@pytest.mark.parametrize("full", [0.5, 0.4, 0.5001])
def test_decode_inside_the_noise_is_an_error_not_a_figure(full: float) -> None:
    with pytest.raises(ValueError, match="raise --output-len"):
        decode_rate(timer([0.5], [full]), 1, 12)
    with pytest.raises(ValueError, match="at least 2"):
        decode_rate(timer([0.5], [1.5]), 1, 1)
