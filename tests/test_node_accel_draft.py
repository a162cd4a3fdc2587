"""spec_draft with a configured draft model: validated against the served model, lossless across a 2-node chain."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from node.accel.draft import DraftModelConfig, DraftModelError, check_draft_compatible, load_draft_model
from node.accel.speculative import DraftModelDrafter
from node.engine import GenerationRequest
from node.model_builder import PRESETS, build_model
from tests.helpers_accel import accel_chain, collect, reference_greedy

PROMPTS = [(5, 77, 300, 12, 99, 100, 7, 8) * 3, tuple(range(40, 80)), (11, 12, 13, 14) * 3]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """A draft model: the tiny architecture and tokenizer with other random weights (so most drafts are wrong)."""
    return build_model(tmp_path_factory.mktemp("draft") / "tiny-seed1", "tiny", seed=1)


def test_the_draft_preset_is_smaller_than_small_and_shares_its_vocabulary():
    draft, small = PRESETS["draft"], PRESETS["small"]
    assert draft.vocab_size == small.vocab_size
    assert draft.hidden_size < small.hidden_size and draft.num_layers < small.num_layers


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_model_path, other_tiny, tmp_path):
    check_draft_compatible(other_tiny, tiny_model_path)  # same preset, other weights: accepted
    wrong = tmp_path / "wrong-vocab"
    shutil.copytree(other_tiny, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["vocab_size"] += 1
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(DraftModelError, match="vocab_size"):
        load_draft_model(DraftModelConfig(wrong), tiny_model_path)
    renamed = tmp_path / "renamed-token"
    shutil.copytree(other_tiny, renamed)
    tok = json.loads((renamed / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["renamed-" + first] = vocab.pop(first)
    (renamed / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DraftModelError, match="different tokenizers"):
        check_draft_compatible(renamed, tiny_model_path)
    with pytest.raises(DraftModelError, match="missing"):
        check_draft_compatible(tmp_path / "nowhere", tiny_model_path)
    with pytest.raises(ValueError, match="weight format"):
        DraftModelConfig(other_tiny, weight_format="fp8")


@pytest.mark.parametrize("weight_format", ["fp32", "int8"])
async def test_spec_draft_with_a_configured_draft_model_equals_greedy_on_a_two_node_chain(
    tiny_model_path, other_tiny, weight_format
):
    expected = reference_greedy(tiny_model_path, PROMPTS, NEW_TOKENS)
    factory = load_draft_model(DraftModelConfig(other_tiny, weight_format=weight_format), tiny_model_path)
    made: list[DraftModelDrafter] = []

    def counting_factory():
        drafter = factory()
        made.append(drafter)  # type: ignore[arg-type]
        return drafter

    async with accel_chain(tiny_model_path) as chain:
        chain.driver.draft_drafter = counting_factory
        requests = [GenerationRequest(prompt_ids=p, max_new_tokens=NEW_TOKENS, method="spec_draft") for p in PROMPTS]
        outs = await asyncio.gather(*(collect(chain.driver, r) for r in requests))
        assert outs == expected
    assert len(made) == len(PROMPTS)  # every request drafted with the draft model, not prompt lookup
    assert all(len(d._seen) >= len(p) for d, p in zip(made, PROMPTS, strict=True))
