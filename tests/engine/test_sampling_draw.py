"""The sampler's draw (engine.sampling.draw): the distribution it is given, never a token of
zero mass, the same token for the same generator state."""

from __future__ import annotations

import torch

from engine.sampling import SamplingParams, draw, sample_rows

DRAWS = 20_000


def test_draws_follow_the_distribution_and_skip_zero_mass() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.0, 0.05])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([draw(probs, generator) for _ in range(DRAWS)]),
                            minlength=len(probs)).double()
    assert counts[1] == counts[4] == 0
    # four standard deviations of a binomial count at the largest p: 4 * sqrt(n p (1-p)) / n
    assert torch.allclose(counts / DRAWS, probs.double(), atol=4 * (0.25 / DRAWS) ** 0.5)


def test_the_edges_of_the_distribution() -> None:
    one_hot = torch.zeros(49152)
    one_hot[-1] = 1.0  # all the mass on the last token
    assert all(int(draw(one_hot)) == 49151 for _ in range(50))
    first = torch.zeros(8)
    first[0] = 1.0
    assert all(int(draw(first)) == 0 for _ in range(50))
    unnormalised = torch.tensor([2.0, 0.0, 2.0])  # a float32 softmax sums to ~1, not exactly
    assert {int(draw(unnormalised)) for _ in range(200)} == {0, 2}


def test_a_seed_draws_the_same_tokens_alone_and_beside_others() -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(1, temperature=1.0, seed=5)] * 3

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(5 + row) for row in range(3)]

    together = sample_rows(logits, params, generators())
    for row in range(3):
        alone = sample_rows(logits[row:row + 1], params[:1], generators()[row:row + 1])
        assert int(alone) == int(together[row])
    assert torch.equal(sample_rows(logits, params, generators()), together)
