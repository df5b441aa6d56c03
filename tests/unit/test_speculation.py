"""Decoding several tokens per pass through the split: drafts checked by the cloud in one
pass, the cloud's cache rolled back past rejected drafts, and replies that are those of
plain decoding (greedy) or distributed as they are (sampling)."""

from __future__ import annotations

import pytest
import torch

from plora.clients.generation import NUCLEUS_CANDIDATES, Draft, ModelDrafter, PromptLookup, _nucleus, _pick, stream_tokens, verify
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.protocol.messages import CacheMode, ForwardRequest
from plora.platform.runtime import split_embedded
from plora.storage.errors import ValidationError
from tests.conftest import tiny_backbone, tiny_llama
from tests.unit.test_split import random_ms

# A random model peaked enough that its greedy replies vary (the default one repeats a token)
# and that sampling often accepts a likely draft.
PEAKED = dict(initializer_range=0.4)
PROMPTS = [
    [5, 17, 3, 42, 8, 5, 17, 3, 42, 9, 60, 61],  # repeats, so prompt lookup has something to copy
    [7, 7, 7, 7],
    [30, 31, 32, 33, 34, 35, 36, 37, 30, 31, 32],
]


class Scripted:
    """Drafts the reply it was told, with every `wrong_every`-th drafted token wrong."""

    def __init__(self, prompt: list[int], reply: list[int], wrong_every: int = 0):
        self.text, self.prompt_length, self.wrong_every, self.drafted = prompt + reply, len(prompt), wrong_every, 0

    def draft(self, context: list[int], limit: int) -> Draft:
        tokens = self.text[len(context) : len(context) + min(limit, 5)]
        for i in range(len(tokens)):
            self.drafted += 1
            if self.wrong_every and self.drafted % self.wrong_every == 0:
                tokens[i] = (tokens[i] + 1) % 96
        return Draft(tokens)


class PassCounter:
    def __init__(self, model):
        self.passes = 0
        model.link.taps.append(self)

    def __call__(self, direction, message):
        self.passes += isinstance(message, ForwardRequest)


@pytest.mark.parametrize("device_layers", [0, 2])
def test_greedy_speculation_gives_the_plain_reply_with_fewer_passes(device_layers):
    split = split_embedded(tiny_backbone(**PEAKED), PrivateLoRAConfig(rank=4, device_layers=device_layers))
    random_ms(split)
    counter = PassCounter(split)
    for prompt in PROMPTS:
        for budget in (1, 2, 17):
            counter.passes = 0
            plain = list(stream_tokens(split, prompt, budget, set()))
            plain_passes = counter.passes
            assert plain_passes == len(plain)  # the prompt's pass, then one per token but the last
            drafters = [Scripted(prompt, plain), Scripted(prompt, plain, wrong_every=3), Scripted(prompt, plain, wrong_every=1),
                        PromptLookup(max_tokens=4)]
            for drafter in drafters:
                counter.passes = 0
                assert list(stream_tokens(split, prompt, budget, set(), drafter=drafter)) == plain, (prompt, budget, drafter)
                if isinstance(drafter, Scripted) and drafter.wrong_every != 1 and budget > 2:
                    assert counter.passes < plain_passes  # right drafts were accepted
    stop = {plain[5]}  # a stop inside an accepted draft ends the reply there, as it does plainly
    expected = list(stream_tokens(split, PROMPTS[2], 17, stop))
    assert list(stream_tokens(split, PROMPTS[2], 17, stop, drafter=Scripted(PROMPTS[2], plain))) == expected


def test_a_step_that_keeps_part_of_the_cache_computes_as_if_the_rest_had_never_been_sent():
    split = split_embedded(tiny_backbone(**PEAKED), PrivateLoRAConfig(rank=4, device_layers=1))
    random_ms(split)
    with torch.no_grad():
        split(torch.tensor([[1, 2, 3, 4]]), CacheMode.START)
        split(torch.tensor([[9, 9, 9]]), CacheMode.EXTEND)  # a draft, rejected below
        rolled_back = split(torch.tensor([[5, 6]]), CacheMode.EXTEND, keep_cached=4)
        fresh = split(torch.tensor([[1, 2, 3, 4, 5, 6]]))[:, 4:]
    assert torch.allclose(rolled_back, fresh, atol=1e-4)  # logits of about 5: float32 rounding


def test_the_cloud_refuses_a_keep_it_cannot_honour_and_keeps_its_cache():
    session = CloudHalf(tiny_backbone(), PrivateLoRAConfig(rank=4)).open_session()
    answer = lambda request: None  # never reached: every step below is refused first
    with pytest.raises(ValidationError, match="EXTEND"):
        session.forward(ForwardRequest(torch.zeros(1, 3, 32), CacheMode.START, keep_cached=0), answer)
    split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4))
    with torch.no_grad():
        split(torch.tensor([[1, 2, 3]]), CacheMode.START)
        with pytest.raises(ValidationError, match="keep_cached=4, but the session holds 3"):
            split(torch.tensor([[4]]), CacheMode.EXTEND, keep_cached=4)
        with pytest.raises(ValidationError, match="applies to an EXTEND step only"):
            split(torch.tensor([[4]]), CacheMode.NONE, keep_cached=1)
        after = split(torch.tensor([[4]]), CacheMode.EXTEND)
        assert torch.allclose(after, split(torch.tensor([[1, 2, 3, 4]]))[:, 3:], atol=1e-5)


def test_prompt_lookup_copies_what_followed_the_latest_match_of_the_longest_tail():
    lookup = PromptLookup(max_tokens=3, max_ngram=2)
    assert lookup.draft([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 10).tokens == [5, 1, 2]  # "2 3" last seen before 5
    assert lookup.draft([1, 2, 3, 4, 9, 3], 10).tokens == [4, 9, 3]  # no "9 3" before: "3" alone
    assert lookup.draft([1, 2, 3, 4, 9, 3], 1).tokens == [4]
    assert lookup.draft([1, 2, 3], 10).tokens == [] and lookup.draft([1], 10).tokens == []


def _chi_square_p(a: list[int], b: list[int]) -> float:
    """p-value of the chi-square test that two samples of tokens come from one distribution;
    tokens rarer than 10 in both samples together share a bin."""
    counts = torch.zeros(2, 96)
    for row, sample in enumerate((a, b)):
        counts[row] += torch.bincount(torch.tensor(sample), minlength=96)
    common = counts.sum(0) >= 10
    table = torch.cat([counts[:, common], counts[:, ~common].sum(1, keepdim=True)], 1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), statistic / 2))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_keeps_the_distribution_of_plain_sampling(temperature, top_p):
    split = split_embedded(tiny_backbone(**PEAKED), PrivateLoRAConfig(rank=4))
    random_ms(split)
    prompt = PROMPTS[0]
    with torch.no_grad():
        likely = split(torch.tensor([prompt]))[0, -1].topk(2).indices.tolist()  # a draft often accepted
        logits = split(torch.tensor([prompt + likely]))[0, len(prompt) - 1 :]  # the pass over [last, *draft]
    draft, generator, samples = Draft(likely), torch.Generator().manual_seed(0), 5000
    speculative = [verify(logits, draft, temperature, top_p, generator) for _ in range(samples)]
    first_tokens = [accepted[0] if accepted else after for accepted, after in speculative]
    plain_first = [_pick(logits[0], temperature, top_p, generator) for _ in range(samples)]
    assert _chi_square_p(first_tokens, plain_first) > 0.01
    # The second token, where the first was the drafted one: distributed as after that token.
    seconds = [(accepted + [after])[1] for accepted, after in speculative if accepted[:1] == likely[:1]]
    assert len(seconds) > 700, len(seconds)
    plain_second = [_pick(logits[1], temperature, top_p, generator) for _ in range(len(seconds))]
    assert _chi_square_p(seconds, plain_second) > 0.01
    # The test catches the classic mistake: replacing a rejected draft by a plain sample.
    p = _nucleus(logits[0], temperature, top_p)[likely[0]]
    mistaken = [likely[0] if torch.rand((), generator=generator) < p else _pick(logits[0], temperature, top_p, generator)
                for _ in range(samples)]
    assert _chi_square_p(mistaken, plain_first) < 0.01


@pytest.mark.parametrize("scale", [0.5, 30.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_the_nucleus_is_that_of_the_whole_vocabulary_sorted(scale, top_p):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * scale
    probs = torch.softmax(logits, -1)
    ordered, order = probs.sort(descending=True)
    expected = torch.zeros_like(probs).scatter_(0, order, ordered * (ordered.cumsum(-1) - ordered < top_p))
    assert torch.allclose(_nucleus(logits, 1.0, top_p), expected / expected.sum(), atol=1e-7)


@pytest.mark.parametrize("top_p", [0.95, 1.0])
def test_a_token_drawn_past_the_nucleus_candidates_comes_from_the_nucleus_distribution(top_p):
    # 400 tokens of flat logits: a nucleus of 0.95 holds more than NUCLEUS_CANDIDATES of them.
    logits, generator = torch.randn(400, generator=torch.Generator().manual_seed(2)) * 0.5, torch.Generator().manual_seed(3)
    expected = _nucleus(logits, 0.8, top_p)
    assert int((expected > 0).sum()) > NUCLEUS_CANDIDATES
    counts = torch.bincount(torch.tensor([_pick(logits, 0.8, top_p, generator) for _ in range(20_000)]), minlength=400)
    assert not counts[expected == 0].any()
    statistic = ((counts - 20_000 * expected)[expected > 0] ** 2 / (20_000 * expected[expected > 0])).sum()
    assert float(torch.special.gammaincc(torch.tensor((int((expected > 0).sum()) - 1) / 2), statistic / 2)) > 0.01


def test_tokens_as_probable_as_the_last_of_the_nucleus_are_in_it():
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0]).log()  # probabilities 0.4, 0.2, 0.2, 0.2, 0
    assert _nucleus(logits, 1.0, 0.5).tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2, 0.0])


def test_speculative_sampling_of_a_model_drafter_keeps_the_distribution_of_plain_sampling():
    split = split_embedded(tiny_backbone(**PEAKED), PrivateLoRAConfig(rank=4))
    random_ms(split)
    prompt = PROMPTS[0]
    with torch.no_grad():
        q = torch.softmax(tiny_llama(seed=4, **PEAKED)(torch.tensor([prompt])).logits[0, -1], -1)  # another model's
        # The pass over [last, d] for every token d the drafter may draw.
        rows = split(torch.cat([torch.tensor([prompt] * 96), torch.arange(96)[:, None]], 1))[:, len(prompt) - 1 :]
    generator, samples = torch.Generator().manual_seed(1), 5000
    drafted = torch.multinomial(q, samples, replacement=True, generator=generator).tolist()
    speculative = [verify(rows[d], Draft([d], q[None]), 1.0, 1.0, generator) for d in drafted]
    first_tokens = [accepted[0] if accepted else after for accepted, after in speculative]
    plain_first = [_pick(rows[0, 0], 1.0, 1.0, generator) for _ in range(samples)]
    assert _chi_square_p(first_tokens, plain_first) > 0.01
    assert _chi_square_p(drafted, plain_first) < 0.01  # the drafter alone is another distribution


def test_a_model_drafter_gives_the_plain_greedy_reply():
    split = split_embedded(tiny_backbone(**PEAKED), PrivateLoRAConfig(rank=4, device_layers=1))
    random_ms(split, seed=8)
    counter = PassCounter(split)
    plain = list(stream_tokens(split, PROMPTS[0], 12, set()))
    plain_passes, counter.passes = counter.passes, 0
    drafter = ModelDrafter(tiny_llama(**PEAKED), max_tokens=3)  # the base model: close to the personalized one
    assert list(stream_tokens(split, PROMPTS[0], 12, set(), drafter=drafter)) == plain
    assert counter.passes < plain_passes
