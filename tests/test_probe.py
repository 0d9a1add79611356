import numpy as np
import pytest

from raycpt.core.data.blocks import Task
from raycpt.core.eval.evaluate import downstream_f1, probe_scores, text_features
from raycpt.core.model.loading import load_model


def _synthetic(n=200, separable=True, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array(["pos", "neg"] * (n // 2))
    x = rng.normal(size=(n, 16))
    if separable:
        x[:, 0] += np.where(y == "pos", 4.0, -4.0)
    return x, list(y)


def test_probe_scores_separable_task_near_one_and_shuffled_labels_near_chance():
    x, y = _synthetic()
    tx, ty = _synthetic(seed=1)
    good = probe_scores(x, y, tx, ty)
    assert good["f1"] > 0.97 and good["accuracy"] > 0.97
    assert set(good["per_class_f1"]) == {"neg", "pos"}
    shuffled = list(np.random.default_rng(2).permutation(y))
    chance = probe_scores(x, shuffled, tx, ty, seeds=5)
    assert 0.3 < chance["f1"] < 0.7
    # the spread over subsampled refits: large on labels that carry no signal, tiny on a separable task, and
    # absent (None) for one fit
    assert chance["f1_sd"] > 0.005
    assert probe_scores(x, y, tx, ty, seeds=5)["f1_sd"] < 0.02
    assert good["f1_sd"] is None


def test_probe_on_the_model_is_deterministic_and_learns_a_separable_text_task(tiny_gpt2_dir, tokenizer):
    model = load_model(tiny_gpt2_dir)
    rng = np.random.default_rng(0)
    words = ["movie", "story", "plot", "scene", "actor", "film"]

    def texts(n):
        labels = ["good", "bad"] * (n // 2)
        cue = {"good": "wonderful brilliant delightful", "bad": "terrible awful dreadful"}
        return [f"{' '.join(rng.choice(words, 4))} {cue[y]}" for y in labels], labels

    train_texts, train_labels = texts(60)
    test_texts, test_labels = texts(40)
    task = Task(train_texts, train_labels, test_texts, test_labels, test_texts, test_labels)
    first = downstream_f1(model, tokenizer, task, splits=("val", "test"))
    second = downstream_f1(model, tokenizer, task, splits=("val",))
    assert first["val"]["f1"] == pytest.approx(second["val"]["f1"], abs=1e-6)
    assert first["val"]["f1"] > 0.95 and first["val"]["predictions"] == first["test"]["predictions"]
    assert first["val"]["f1_ci_low"] <= first["val"]["f1"] <= first["val"]["f1_ci_high"]
    assert first["val"]["f1_sd"] is None  # one fit: no spread is reported as if measured
    assert model.training  # train mode restored


def test_features_are_mask_aware(tiny_gpt2_dir, tokenizer):
    """A text's features do not depend on what it is batched with (padding is masked out)."""
    model = load_model(tiny_gpt2_dir)
    alone = text_features(model, tokenizer, ["a short review"])
    batched = text_features(model, tokenizer, ["a short review", "a much longer review that needs lots of padding"])
    np.testing.assert_allclose(alone[0], batched[0], rtol=1e-5, atol=1e-6)
