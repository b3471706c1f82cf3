"""Sampler and logits processors: hand-computed cases, parity with transformers, seeding and distributions."""

import math

import pytest
import torch

from kilnlm.errors import KilnError
from kilnlm.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)

NEG_INF = -math.inf
# Probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled order, so filters must map sorted positions back.
SHUFFLED_PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])


def _kept(scores: torch.Tensor) -> set[int]:
    """Ids a processor left selectable."""
    return set(torch.nonzero(torch.isfinite(scores)).flatten().tolist())


def _random_logits(seed: int, vocab: int = 1000) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


# --- parameter validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.2}, "repetition_penalty"),
        ({"seed": "42"}, "seed"),
    ],
)
def test_invalid_params_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(KilnError, match=name):
        SamplingParams(**kwargs)


def test_boundary_params_are_accepted():
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5, seed=0)
    assert params.temperature == 0.0 and params.min_p == 1.0


# --- processors on hand-computed examples -------------------------------------------------------------------------


def test_repetition_penalty_hand_example():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    previous = torch.tensor([0, 1, 1, 0, 99])  # repeats count once; 99 is past the vocab and ignored
    out = apply_repetition_penalty(logits, previous, 2.0)
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input untouched


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 37])
def test_top_k_keeps_exactly_the_k_best(seed, k):
    logits = _random_logits(seed)
    out = apply_top_k(logits, k)
    assert _kept(out) == set(torch.topk(logits, k).indices.tolist())
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_top_k_larger_than_vocab_keeps_everything_and_ties_are_kept():
    assert _kept(apply_top_k(torch.tensor([1.0, 2.0, 3.0]), 10)) == {0, 1, 2}
    assert _kept(apply_top_k(torch.tensor([1.0, 2.0, 2.0, 3.0]), 2)) == {1, 2, 3}


@pytest.mark.parametrize(
    "top_p,expected",
    [
        (0.75, {1, 3}),  # 0.5 + 0.3 = 0.8 is the smallest mass >= 0.75
        (0.85, {0, 1, 3}),  # needs 0.15 more
        (0.99, {0, 1, 2, 3}),
        (0.10, {1}),  # the most likely token alone already covers it
        (1e-9, {1}),  # at least one token is always kept
    ],
)
def test_top_p_hand_example(top_p, expected):
    assert _kept(apply_top_p(SHUFFLED_PROBS.log(), top_p)) == expected


@pytest.mark.parametrize("top_p,n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_top_p_keeps_a_set_that_reaches_top_p_exactly(top_p, n_kept):
    # Four equal logits: probabilities and their sums are exact, so "cumulative >= top_p" is tested at equality.
    assert len(_kept(apply_top_p(torch.zeros(4), top_p))) == n_kept


def test_min_p_keeps_tokens_exactly_at_the_threshold():
    assert _kept(apply_min_p(torch.zeros(4), 1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("min_p,expected", [(0.35, {1, 3}), (0.2, {0, 1, 3}), (0.05, {0, 1, 2, 3}), (1.0, {1})])
def test_min_p_hand_example(min_p, expected):
    # The threshold is min_p * 0.5 (the top probability).
    assert _kept(apply_min_p(SHUFFLED_PROBS.log(), min_p)) == expected


# --- parity with transformers' processors -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from transformers.generation import logits_process

    return logits_process


@pytest.mark.parametrize("seed", range(4))
def test_processors_match_transformers(hf, seed):
    logits = _random_logits(seed)
    previous = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(seed))
    cases = [
        (apply_repetition_penalty(logits, previous, 1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)),
        (apply_repetition_penalty(logits, previous, 0.7), hf.RepetitionPenaltyLogitsProcessor(0.7)),
        (apply_top_k(logits, 40), hf.TopKLogitsWarper(40)),
        (apply_top_p(logits, 0.9), hf.TopPLogitsWarper(0.9)),
        (apply_top_p(logits, 0.3), hf.TopPLogitsWarper(0.3)),
        (apply_min_p(logits, 0.05), hf.MinPLogitsWarper(0.05)),
        (apply_min_p(logits, 0.3), hf.MinPLogitsWarper(0.3)),
    ]
    for ours, processor in cases:
        expected = processor(previous[None], logits[None].clone())[0]
        torch.testing.assert_close(ours, expected, rtol=0, atol=0, msg=lambda m: f"{processor}: {m}")


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=1),
        SamplingParams(temperature=1.3, top_p=0.5, seed=2),
        SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=0.8, seed=3),
    ],
)
def test_sampler_draws_what_transformers_pipeline_gives(hf, params):
    # Same processor chain as generate(), then multinomial on an identically seeded generator: same tokens.
    chain = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
            hf.TemperatureLogitsWarper(params.temperature),
            *([hf.TopKLogitsWarper(params.top_k)] if params.top_k else []),
            hf.TopPLogitsWarper(params.top_p),
            hf.MinPLogitsWarper(params.min_p),
        ]
    )
    sampler, generator = Sampler(params), torch.Generator().manual_seed(params.seed)
    ids = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0))
    for step in range(40):
        logits = _random_logits(100 + step)
        probs = torch.softmax(chain(ids[None], logits[None].clone()), dim=-1)
        expected = int(torch.multinomial(probs, 1, generator=generator))
        assert sampler(logits, ids) == expected, f"step {step}"
        ids = torch.cat([ids, torch.tensor([expected])])


# --- the Sampler ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = _random_logits(seed)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.1))
    assert sampler(logits) == int(torch.argmax(logits))
    assert sampler(logits.to(torch.bfloat16)) == int(torch.argmax(logits.to(torch.bfloat16).float()))


def test_greedy_ties_go_to_the_lowest_id_and_penalty_applies_first():
    greedy = Sampler(SamplingParams(temperature=0.0))
    assert greedy(torch.tensor([1.0, 5.0, 2.0, 5.0])) == 1
    penalised = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert penalised(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([1])) == 2  # 5 / 2 < 3


def test_same_seed_same_tokens_and_different_seed_different_tokens():
    def run(seed: int | None) -> tuple[list[int], int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(_random_logits(step, vocab=50) * 0.3) for step in range(40)], sampler.seed

    assert run(7) == run(7)
    assert run(7)[0] != run(8)[0]
    tokens, seed = run(None)
    assert tokens != run(None)[0]  # unseeded samplers get fresh seeds
    assert run(seed)[0] == tokens  # ... which are recorded, so the run can be replayed


def test_sampler_leaves_global_rng_and_logits_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    logits = _random_logits(0)
    before = logits.clone()
    sampler = Sampler(SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.5))
    for _ in range(10):
        sampler(logits, torch.arange(100))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(logits, before)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    assert torch.all(counts[probs == 0] == 0), "sampled a token with probability 0"
    nonzero = probs > 0
    return float((((counts - expected) ** 2)[nonzero] / expected[nonzero]).sum())


@pytest.mark.parametrize(
    "params,expected_probs",
    [
        # Temperature 1: softmax of the logits. Temperature 0.5: softmax of twice the logits.
        (SamplingParams(temperature=1.0, seed=11), torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])),
        (SamplingParams(temperature=0.5, seed=12), torch.tensor([1, 4, 9, 16, 100]) / 130),
        # top_k=3 keeps 0.15, 0.2, 0.5 and renormalises.
        (SamplingParams(temperature=1.0, top_k=3, seed=13), torch.tensor([0, 0, 0.15, 0.2, 0.5]) / 0.85),
    ],
)
def test_empirical_distribution_matches(params, expected_probs):
    logits = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5]).log()
    sampler = Sampler(params)
    counts = torch.zeros(5)
    for _ in range(6000):
        counts[sampler(logits)] += 1
    # 4 degrees of freedom: P(chi2 > 23.5) = 1e-4, and the seeds are fixed, so this is not flaky.
    assert _chi_square(counts, expected_probs) < 23.5


def test_rejects_batched_logits():
    with pytest.raises(ValueError, match="vocab"):
        Sampler(SamplingParams())(torch.zeros(2, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_is_seeded_and_checks_the_device():
    params = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1, seed=5)
    logits = [_random_logits(step).cuda() for step in range(20)]
    first, second = Sampler(params, device="cuda"), Sampler(params, device="cuda")
    previous = torch.arange(10)  # on the CPU: moved to the logits' device
    assert [first(x, previous) for x in logits] == [second(x, previous) for x in logits]
    assert Sampler(SamplingParams(temperature=0), "cuda")(logits[0]) == int(torch.argmax(logits[0]))
    with pytest.raises(ValueError, match="cuda"):
        Sampler(params)(logits[0])
