"""Speculative decoding pieces: prompt-lookup drafts, greedy verification, and the draft-model drafter."""

from __future__ import annotations

import pytest
import torch

from node.accel.speculative import DraftLength, DraftModelDrafter, NgramDrafter, verify_greedy


def one_hot_logits(tokens: list[int], vocab: int = 16) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    for i, t in enumerate(tokens):
        logits[i, t] = 1.0
    return logits


def test_ngram_drafter_copies_what_followed_the_latest_match_of_the_longest_suffix():
    drafter = NgramDrafter(max_ngram=3)
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # the suffix [1, 2, 3] last occurred at index 5, followed by 7, 8, 5
    assert drafter.propose(tokens, 3) == [7, 8, 5]
    assert drafter.propose(tokens, 1) == [7]


def test_ngram_drafter_keeps_copying_through_a_periodic_tail():
    drafter = NgramDrafter(max_ngram=3)
    assert drafter.propose([5, 9, 9, 9], 4) == [9, 9, 9, 9]
    assert drafter.propose([7, 1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]


def test_ngram_drafter_falls_back_to_shorter_suffixes_and_returns_nothing_without_a_match():
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    assert drafter.propose([4, 5, 6, 4], 2) == [5, 6]  # only the 1-gram [4] matches
    assert drafter.propose([1, 2, 3, 4], 4) == []
    assert drafter.propose([1], 4) == []
    assert drafter.propose([1, 1, 1], 0) == []
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=1, min_ngram=2)


def test_verify_greedy_accepts_the_longest_matching_prefix_plus_the_bonus_token():
    # the model would produce 5, 6, 7, 8 after the committed text
    verdict = verify_greedy([5, 6, 9], one_hot_logits([5, 6, 7, 8]))
    assert verdict.tokens == [5, 6, 7] and verdict.accepted == 2
    assert verify_greedy([5, 6, 7], one_hot_logits([5, 6, 7, 8])).tokens == [5, 6, 7, 8]
    assert verify_greedy([1], one_hot_logits([5, 6])).tokens == [5]
    assert verify_greedy([], one_hot_logits([5])).tokens == [5]
    with pytest.raises(ValueError):
        verify_greedy([1, 2], one_hot_logits([5, 6]))


def test_draft_model_drafter_proposes_what_the_model_itself_would_generate(tiny_model_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_path).eval()
    prompt = [5, 77, 300, 12, 99]
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    drafter = DraftModelDrafter(model)
    assert drafter.propose(prompt, 4) == expected[:4]
    # a later call reuses the cache for the common prefix and continues correctly
    assert drafter.propose(prompt + expected[:4], 4) == expected[4:8]
    # and a context that diverges is handled by cropping
    assert drafter.propose(prompt, 2) == expected[:2]


def test_draft_length_grows_while_drafts_are_accepted_and_shrinks_when_none_is():
    length = DraftLength(4)
    assert (length.now, length.most) == (4, 8)
    length.update(proposed=4, accepted=4)
    assert length.now == 8
    length.update(proposed=8, accepted=8)
    assert length.now == 8  # bounded by twice the method's draft_tokens
    length.update(proposed=8, accepted=3)
    assert length.now == 8  # partly right: keep the length
    length.update(proposed=8, accepted=0)
    length.update(proposed=4, accepted=0)
    length.update(proposed=2, accepted=0)
    length.update(proposed=1, accepted=0)
    assert length.now == 1  # never below one draft
    length.update(proposed=0, accepted=0)  # the drafter found nothing: no evidence either way
    assert length.now == 1
    assert DraftLength(0).now == 0 and DraftLength(0).most == 0  # methods without speculation
