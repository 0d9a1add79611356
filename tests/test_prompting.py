"""Prompted classification (raycpt.core.eval.prompting): the prediction is the arg-max of each label word's
log-likelihood after the prompt, computed here by hand one sequence at a time; bad prompts are one line; the pick
can use prompt F1 (select.metric)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from raycpt.core.config import config_from_dict
from raycpt.core.errors import ConfigError, InputError
from raycpt.core.eval.prompting import PromptSpec, check_prompt, prompt_scores
from raycpt.core.model.loading import load_model

TRAIN = (["a lovely warm film", "dull and tedious", "a joy to watch", "painfully slow"],
         ["fresh", "rotten", "fresh", "rotten"])
SCORED = (["wonderful acting", "a boring mess", "great fun", "terrible plot", "moving story", "awful"],
          ["fresh", "rotten", "fresh", "rotten", "fresh", "rotten"])
SPEC = PromptSpec("Review: {text}\nVerdict: {label}", shots=2, label_words={"fresh": "good", "rotten": "bad"},
                  seed=3, max_length=32)


def by_hand(model, tokenizer, context: str, word: str) -> float:
    """log p(" word" | context), one unpadded sequence, summed over the word's tokens."""
    ctx = tokenizer(context.rstrip(" "), add_special_tokens=False)["input_ids"]
    cont = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.mark.parametrize("word", [{"fresh": "good", "rotten": "bad"},  # one token each: one forward per text
                                  {"fresh": "very good indeed", "rotten": "quite bad"}])  # several tokens
def test_prompt_f1_is_the_argmax_of_label_loglikelihoods(tiny_gpt2_dir, tokenizer, word):
    from dataclasses import replace

    model = load_model(tiny_gpt2_dir)
    scores = prompt_scores(model, tokenizer, replace(SPEC, label_words=word), TRAIN, SCORED, ["fresh", "rotten"])
    # the prompt by hand: the two seeded examples, then the text; rng(3).permutation(4)[:2] picks them
    shown = [TRAIN[0][i] for i in np.random.default_rng(3).permutation(4)[:2]]
    examples = "".join(f"Review: {t}\nVerdict: {word[TRAIN[1][TRAIN[0].index(t)]]}\n\n" for t in shown)
    expected = []
    for text in SCORED[0]:
        context = f"{examples}Review: {text}\nVerdict: "
        ll = {label: by_hand(model, tokenizer, context, word[label]) for label in ("fresh", "rotten")}
        expected.append(max(ll, key=ll.get))
    assert scores["predictions"] == expected
    assert scores["f1"] == pytest.approx(f1_score(SCORED[1], expected, average="macro",
                                                  labels=["fresh", "rotten"], zero_division=0))
    assert scores["f1_ci_low"] <= scores["f1"] <= scores["f1_ci_high"]
    assert model.training  # train mode restored


def test_bad_prompts_are_one_line(tokenizer):
    classes = ["fresh", "rotten"]
    with pytest.raises(InputError, match="no {label} slot"):
        check_prompt(PromptSpec("Review: {text}", 0, {}, 0, 16), classes, tokenizer)
    with pytest.raises(InputError, match="not labels of the task"):
        check_prompt(PromptSpec("{text} {label}", 0, {"positive": "good"}, 0, 16), classes, tokenizer)
    with pytest.raises(InputError, match="tokenises to nothing"):
        check_prompt(PromptSpec("{text} {label}", 0, {"fresh": "  "}, 0, 16), classes, tokenizer)
    with pytest.raises(InputError, match="share a word"):
        check_prompt(PromptSpec("{text} {label}", 0, {"fresh": "ok", "rotten": "ok"}, 0, 16), classes, tokenizer)
    check_prompt(SPEC, classes, tokenizer)


def test_config_checks_the_method_template_and_the_pick_metric():
    base = {"data": {"domain": "x.jsonl"}, "train": {"mix_ratio": 1.0}, "eval": {"task": "t.csv"}}
    with pytest.raises(ConfigError, match="eval.method"):
        config_from_dict({**base, "eval": {"task": "t.csv", "method": "probes"}})
    with pytest.raises(ConfigError, match="eval.template"):
        config_from_dict({**base, "eval": {"task": "t.csv", "method": "prompt", "template": "{text}"},
                          "select": {"metric": "eval/prompt_f1"}})
    with pytest.raises(ConfigError, match="needs eval.method prompt or both"):
        config_from_dict({**base, "select": {"metric": "eval/prompt_f1"}})
    cfg = config_from_dict({**base, "eval": {"task": "t.csv", "method": "both"},
                            "select": {"metric": "eval/prompt_f1"}})
    assert cfg.select.metric == "eval/prompt_f1"


def test_the_pick_by_prompt_f1_uses_prompt_predictions():
    import pandas as pd

    from raycpt.core.config import SelectConfig
    from raycpt.results.select import select_winner

    labels = ["neg", "pos"] * 100
    wrong_a = np.zeros(200, dtype=bool)
    wrong_a[:60] = True  # a: 30% wrong on the prompt, but the best probe
    wrong_b = np.zeros(200, dtype=bool)
    wrong_b[:10] = True  # b: 5% wrong on the prompt: significantly better there

    def preds(wrong):
        return [("pos" if y == "neg" else "neg") if w else y for y, w in zip(labels, wrong, strict=True)]

    def f1(p):
        return f1_score(labels, p, average="macro")

    rows = [{"trial_id": tid, "status": "finished", "step": 8, "eval/domain_ppl": ppl, "eval/general_ppl": 30.0,
             "eval/f1": probe, "eval/predictions": preds(probe_wrong), "eval/prompt_f1": f1(preds(w)),
             "eval/prompt_predictions": preds(w)}
            for tid, ppl, probe, probe_wrong, w in (("a", 40.0, 0.9, wrong_b, wrong_a),
                                                    ("b", 50.0, 0.7, wrong_a, wrong_b))]
    base = {"base/domain_ppl": 70.0, "base/general_ppl": 30.0}
    by_probe = select_winner(pd.DataFrame(rows), base, SelectConfig(), labels, ["neg", "pos"])
    by_prompt = select_winner(pd.DataFrame(rows), base, SelectConfig(metric="eval/prompt_f1"), labels,
                              ["neg", "pos"])
    assert by_probe.trial_id == "a" and by_prompt.trial_id == "b"
    assert "prompt_f1" in by_prompt.reasons[0] and not math.isnan(rows[1]["eval/prompt_f1"])
