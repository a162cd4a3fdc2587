"""Next-token choice shared by every engine, so local and chained generation agree exactly."""

from __future__ import annotations

import torch


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def choose_next_token(
    logits: torch.Tensor,  # [vocab] logits of the last position, any float dtype
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """Greedy when ``temperature`` is 0, otherwise temperature + nucleus (top-p) sampling."""
    logits = logits.float().cpu()
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, sorted_idx, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())
