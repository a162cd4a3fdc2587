"""Speculative decoding: cheap drafts, verified by the real model in one pass through the chain.

A drafter proposes up to k next tokens; the driver sends ``[last, d1..dk]`` through the chain as
one multi-token step and gets logits at k+1 positions. Greedy verification accepts the longest
prefix of drafts that equal the model's own argmax, plus one "bonus" token (the argmax after the
last accepted draft), so the output is token-identical to plain greedy decoding while each chain
round trip yields 1..k+1 tokens. On a slow network, round trips are what generation pays for.

Drafters: prompt lookup (n-gram match against the prompt and the text so far; free) and a small
draft model (:class:`DraftModelDrafter`) when one is configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Drafter(Protocol):
    """Proposes tokens that likely follow ``tokens``; may propose fewer than ``k`` (or none)."""

    def propose(self, tokens: Sequence[int], k: int) -> list[int]: ...


@dataclass(frozen=True)
class NgramDrafter:
    """Prompt-lookup drafting: find the latest earlier occurrence of the last n tokens, copy what followed it."""

    max_ngram: int = 3  # longest suffix tried first (more specific matches predict better)
    min_ngram: int = 1  # shortest suffix tried before giving up

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        seq = list(tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            suffix = seq[-n:]
            # latest earlier occurrence whose continuation is known (start < len - n)
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == suffix:
                    # copy what followed, LZ77-style: a match that overlaps the end keeps copying its
                    # own drafts, so a periodic tail (common in greedy output) yields k drafts, not 1
                    extended = list(seq)
                    for j in range(k):
                        extended.append(extended[start + n + j])
                    return extended[len(seq) :]
        return []


class DraftLength:
    """How many tokens to draft next: grows while every draft is accepted, shrinks when none is.

    Each verification is one pass through the whole chain, so on a text the drafter predicts well
    (repetitive output) longer drafts save round trips, and on one it predicts badly short drafts
    waste less compute. Lossless either way: verification keeps only what greedy decoding would
    produce. Bounds: 1 .. ``factor`` x the method's ``draft_tokens``.
    """

    def __init__(self, base: int, factor: int = 2) -> None:
        self.base = max(0, base)
        self.most = self.base * max(1, factor)
        self.now = self.base

    def update(self, *, proposed: int, accepted: int) -> None:
        if proposed < self.now:  # the drafter or the token budget ran short: no evidence about the length
            return
        if accepted == proposed:
            self.now = min(self.most, self.now * 2)
        elif accepted == 0:
            self.now = max(1, self.now // 2)


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one speculative step."""

    tokens: list[int]  # accepted drafts followed by the bonus token: 1..k+1 new tokens
    accepted: int  # how many drafts were accepted (len(tokens) - 1)


def verify_greedy(drafts: Sequence[int], logits: torch.Tensor) -> Verdict:
    """Greedy acceptance of ``drafts`` given ``logits`` [len(drafts) + 1, vocab].

    ``logits[i]`` is the model's prediction after the last committed token followed by drafts[:i].
    """
    if logits.dim() != 2 or logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"need logits for {len(drafts) + 1} positions, got shape {tuple(logits.shape)}")
    predicted = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == predicted[accepted]:
        accepted += 1
    return Verdict(tokens=[*drafts[:accepted], predicted[accepted]], accepted=accepted)


class DraftModelDrafter:
    """Greedy drafts from a small causal LM held by the driver (same tokenizer as the served model).

    Keeps its own KV cache across calls and crops it to the common prefix with the new context, so
    each call costs about k small-model steps.
    """

    def __init__(self, model) -> None:  # model: a transformers causal LM in eval mode
        from transformers import DynamicCache

        self._model = model
        self._cache = DynamicCache(config=model.config)
        self._seen: list[int] = []  # tokens whose keys/values are in the cache

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        seq = list(tokens)
        if k <= 0 or not seq:
            return []
        common = 0
        limit = min(len(self._seen), len(seq) - 1)  # always feed at least one token
        while common < limit and self._seen[common] == seq[common]:
            common += 1
        if len(self._seen) > common:  # transformers 5: a negative crop removes that many trailing tokens
            self._cache.crop(common - len(self._seen))
        self._seen = self._seen[:common]
        feed = seq[common:]
        drafts: list[int] = []
        for _ in range(k):
            out = self._model(input_ids=torch.tensor([feed]), past_key_values=self._cache, use_cache=True)
            self._seen.extend(feed)
            nxt = int(out.logits[0, -1].argmax())
            drafts.append(nxt)
            feed = [nxt]
        return drafts
