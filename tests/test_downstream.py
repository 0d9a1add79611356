"""lm-evaluation-harness tasks and generation scored on the in-memory model (raycpt.core.eval.harness,
raycpt.core.eval.generation): a known accuracy from a model whose log-likelihoods are set by hand, sacrebleu's and
rouge-score's own numbers, the names and intervals the trial, the base model (once) and the winner on test get, the
report and the card showing them, and bad input refused before any work. Offline: local task YAMLs over jsonl."""

from __future__ import annotations

import io
import json
import math
import random
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console

from raycpt import cli
from raycpt.core import metrics
from raycpt.core.config import SelectConfig, config_from_dict
from raycpt.core.errors import InputError
from raycpt.core.eval import evaluate
from raycpt.core.eval.evaluate import f1_metrics
from raycpt.core.eval.generation import generation_metrics, greedy_generate, read_pairs
from raycpt.core.eval.harness import HarnessSpec, check_tasks
from raycpt.core.eval.prompting import PromptSpec
from raycpt.core.model.loading import load_model
from raycpt.core.prepare import measure_base
from raycpt.results import render
from raycpt.results.export import export_winner
from raycpt.results.select import Selection, select_winner
from raycpt.results.summary import Summary
from tests.conftest import DOMAIN_SENTENCES, GENERAL_SENTENCES, finished_trial, write_jsonl

BOOSTED = ["cat", "cow", "fox", "bat"]
"""The words the hand-set model prefers after any context."""
QUESTIONS = [  # (choices, index of the right one): the model picks the boosted word, right in 3 of the 4
    (["dog", "cat", "owl"], 1),
    (["cow", "dog", "owl"], 0),
    (["owl", "dog", "fox"], 2),
    (["owl", "bat", "dog"], 0),  # it picks bat: wrong
]
KNOWN_TASK = textwrap.dedent("""\
    task: known_mc
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: known_mc.jsonl
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: answer
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
    """)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A directory of one local lm-eval task (known_mc) whose data file is named relative to it."""
    path = tmp_path_factory.mktemp("lm_eval_tasks")
    (path / "known_mc.yaml").write_text(KNOWN_TASK)
    write_jsonl(path / "known_mc.jsonl", [f"Which animal is number {i}?" for i in range(len(QUESTIONS))],
                field="question", choices=[q[0] for q in QUESTIONS], answer=[q[1] for q in QUESTIONS])
    return path


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory, tiny_gpt2_dir, tokenizer) -> Path:
    """A GPT-2 whose next-token distribution is the same after any context: every weight zero except the final
    norm's bias (the unit vector e0) and an untied LM head whose first column holds the logits (5 for the boosted
    words, 0 for every other token)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(tiny_gpt2_dir)
    config.tie_word_embeddings = False
    model = GPT2LMHeadModel(config)
    boosted = [tokenizer(" " + word)["input_ids"] for word in BOOSTED]
    assert all(len(ids) == 1 for ids in boosted)  # one token each: a choice's log-likelihood is its logit's
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[[ids[0] for ids in boosted], 0] = 5.0
    path = tmp_path_factory.mktemp("unigram")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lm_eval_scores_a_model_whose_likelihoods_are_known(unigram_dir, task_dir, tokenizer):
    model = load_model(str(unigram_dir))
    with torch.no_grad():  # the model is what it claims: the same distribution after two unrelated contexts
        a = model(input_ids=torch.tensor([tokenizer("Question: which?")["input_ids"]])).logits[0, -1]
        b = model(input_ids=torch.tensor([tokenizer("An owl")["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(a, b)
    assert int(a.argmax()) in {tokenizer(" " + w)["input_ids"][0] for w in BOOSTED}
    spec = PromptSpec("{text} {label}", 0, {}, 0, 32, harness=HarnessSpec(("known_mc",), str(task_dir)))
    rng = torch.get_rng_state(), random.getstate()
    scores = f1_metrics(model, str(unigram_dir), None, seeds=1, seed=0, max_length=32, device="cpu", prompt=spec,
                        prefixes={"val": metrics.BASE_PREFIX, "test": metrics.base_name(metrics.TEST_PREFIX)})
    # right in 3 of 4; lm-eval's standard error of a mean: sample sd (ddof 1) of [1, 1, 1, 0] = 0.5, / sqrt(4)
    for prefix in ("base/", "base/test/"):
        name = prefix + "lm_eval/known_mc/acc"
        assert scores[name] == 0.75
        assert scores[name + "_ci_low"] == pytest.approx(0.75 - 1.959964 * 0.25, abs=1e-6)
        assert scores[name + "_ci_high"] == pytest.approx(0.75 + 1.959964 * 0.25, abs=1e-6)
        assert scores[name + "_samples"] == [1.0, 1.0, 1.0, 0.0]  # per document, in order: the 4th is the wrong one
    assert set(scores) == {p + "lm_eval/known_mc/acc" + s for p in ("base/", "base/test/")
                           for s in ("", "_ci_low", "_ci_high", "_samples")}
    assert model.training  # train mode restored, and the process's random state lm-eval seeded put back
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]


def test_unknown_task_or_missing_lm_eval_fail_validate_in_one_line(task_dir, tiny_gpt2_dir, corpora, tmp_path,
                                                                   capsys, monkeypatch):
    config = {"name": "v", "storage_path": str(tmp_path / "runs"), "model": {"source": tiny_gpt2_dir},
              "data": {"domain": corpora["domain"], "general": corpora["general"], "block_size": 32},
              "eval": {"lm_eval_tasks": ["known_mcq"], "lm_eval_include_path": str(task_dir)}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "eval.lm_eval_tasks: 'known_mcq' (close: known_mc" in err
    # select.metric naming an lm-eval score of a task the config does not score
    for metric in ("lm_eval/hellaswag/acc", "lm_eval/known_mc"):
        bad = {**config, "eval": {**config["eval"], "lm_eval_tasks": ["known_mc"]}, "select": {"metric": metric}}
        path.write_text(yaml.safe_dump(bad))
        assert cli.main(["validate", str(path), "--config-only"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"select.metric: '{metric}' names no score of eval.lm_eval_tasks (known_mc)" in err
    # a data file the YAML names that is not there
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "known_mc.yaml").write_text(KNOWN_TASK)
    with pytest.raises(InputError, match=r"task 'known_mc' .* reads data file known_mc.jsonl, which is not in"):
        check_tasks(HarnessSpec(("known_mc",), str(broken)))
    # lm-eval not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    config["eval"]["lm_eval_tasks"] = ["known_mc"]
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'raycpt[lm-eval]'" in err


# -- generation ----------------------------------------------------------------------------------------------------


def test_generation_scores_are_sacrebleus_and_rouge_scores_own():
    import sacrebleu
    from rouge_score import rouge_scorer

    same = ["the cat sat on the mat", "a quiet film about two brothers", "it rained all day"]
    exact = generation_metrics(same, same)
    assert exact["gen/bleu"] == pytest.approx(100) and exact["gen/chrf"] == pytest.approx(100)
    assert exact["gen/rougeL"] == pytest.approx(1.0)
    assert exact["gen/bleu_ci_low"] == pytest.approx(100) and exact["gen/rougeL_ci_high"] == pytest.approx(1.0)
    # one pair by hand: n-gram precisions 5/6, 3/5, 1/4 and 0/3 (sacrebleu's exp smoothing: 1/(2 x 3)), no brevity
    # penalty; ROUGE-L: the longest common subsequence "the cat on the mat" is 5 of 6 words either way
    one = generation_metrics(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert one["gen/bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert one["gen/rougeL"] == pytest.approx(5 / 6)
    predictions = ["the cat sat on the mat", "a loud film about three sisters", "it rained", "sunny and warm"]
    targets = ["the cat lay on the mat", "a quiet film about two brothers", "it rained all day", "cold and wet"]
    got = generation_metrics(predictions, targets, seed=3)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert got["gen/bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [targets]).score)
    assert got["gen/chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [targets]).score)
    assert got["gen/rougeL"] == pytest.approx(sum(scorer.score(t, p)["rougeL"].fmeasure
                                                  for p, t in zip(predictions, targets, strict=True)) / 4)
    for name in metrics.GENERATION:
        assert got[name + "_ci_low"] <= got[name] <= got[name + "_ci_high"]
        assert got[name + "_ci_low"] < got[name + "_ci_high"]  # four different examples: the resamples differ
    assert generation_metrics(predictions, targets, seed=3) == got  # seeded


def test_greedy_generation_stops_at_a_stop_string(tiny_gpt2_dir, tokenizer):
    model = load_model(tiny_gpt2_dir)
    prompt = "The film was"
    ids = tokenizer(prompt)["input_ids"]
    by_hand = []  # greedy, one token at a time
    with torch.no_grad():
        for _ in range(12):
            by_hand.append(int(model(input_ids=torch.tensor([ids + by_hand])).logits[0, -1].argmax()))
    text = tokenizer.decode(by_hand)
    assert greedy_generate(model, tokenizer, [prompt], max_new_tokens=12) == [text]
    assert greedy_generate(model, tokenizer, [prompt], max_new_tokens=3) == [tokenizer.decode(by_hand[:3])]
    # a stop string across the first two tokens: the prediction ends before its first occurrence, and generation
    # stops there instead of running to max_new_tokens
    first = len(tokenizer.decode(by_hand[:1]))
    stop = text[first - 1:first + 2]
    assert len(stop) == 3 and text.index(stop) < first
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        got = greedy_generate(model, tokenizer, [prompt], max_new_tokens=12, stop=["@@", stop])
    finally:
        hook.remove()
    assert got[0] == text[:text.index(stop)]
    assert len(calls) < 12  # it stopped early, not after max_new_tokens
    assert model.training


def test_bad_generation_files_are_one_line(tmp_path):
    with pytest.raises(InputError, match="eval.generate_path: .*missing.jsonl not found"):
        read_pairs(str(tmp_path / "missing.jsonl"))
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": "c", "target": "d"}\n{"input": "e"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl line 4: 'target' must be a string, got nothing") as err:
        read_pairs(str(path))
    assert "\n" not in str(err.value)
    path.write_text('{"input": "a", "target": "b"}\nnot json\n')
    with pytest.raises(InputError, match=r"pairs.jsonl line 2: not JSON"):
        read_pairs(str(path))
    path.write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n')
    assert read_pairs(str(path), limit=1) == (["a"], ["b"])


# -- a trial, the base model and the winner ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_gpt2_dir, task_dir):
    """A 2-step trial with lm-eval and generation configured, scored at its end; the base model measured twice (the
    second from its cache); the winner exported (scored on test). Counts lm-eval runs as it goes."""
    tmp = tmp_path_factory.mktemp("downstream")
    domain = write_jsonl(tmp / "domain.jsonl", [f"{s} Review {i}." for i in range(30) for s in DOMAIN_SENTENCES])
    general = write_jsonl(tmp / "general.jsonl", [f"{s} Report {i}." for i in range(30) for s in GENERAL_SENTENCES])
    texts = [f"{s} Take {i}." for i in range(3) for s in DOMAIN_SENTENCES]
    labelled = write_jsonl(tmp / "task.jsonl", texts, label=["fresh", "rotten"] * (len(texts) // 2))
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"Film {i}:", "target": "a fine film"}) + "\n" for i in range(3)))
    cfg = config_from_dict({
        "name": "downstream", "storage_path": str(tmp / "runs"), "model": {"source": tiny_gpt2_dir},
        "data": {"domain": str(domain), "general": str(general), "block_size": 32, "heldout_fraction": 0.1,
                 "heldout_blocks": 2},
        "train": {"lr": 1e-3, "steps": 2, "batch_size": 2, "eval_every": 2, "warmup_steps": 1, "mix_ratio": 0.75},
        "eval": {"task": str(labelled), "train_size": 8, "val_size": 4, "test_size": 4,
                 "lm_eval_tasks": ["known_mc"], "lm_eval_include_path": str(task_dir),
                 "generate_path": str(pairs), "generate_max_new_tokens": 4},
    })
    runs = []
    with pytest.MonkeyPatch.context() as patch:
        real = evaluate.harness_scores
        patch.setattr(evaluate, "harness_scores", lambda *a, **k: runs.append(1) or real(*a, **k))
        exp_dir, manifest, row = finished_trial(cfg)
        after_trial = len(runs)
        base = measure_base(cfg, manifest, exp_dir)
        again = measure_base(cfg, manifest, exp_dir)
        after_base = len(runs)
        card = export_winner(exp_dir, cfg, {**row, "status": "finished"}, base, Selection("t1"))
    return {"row": row, "base": base, "again": again, "card": card, "exp_dir": exp_dir,
            "runs": (after_trial, after_base, len(runs))}


def test_the_trial_the_base_once_and_the_winner_on_test_get_the_scores(scored):
    row, base, card = scored["row"], scored["base"], scored["card"]
    # one lm-eval run each: the trial's end, the base model (validation and test names from one run; the second
    # measurement read the cache), the exported winner
    assert scored["runs"] == (1, 2, 3)
    assert scored["again"] == base
    names = ["lm_eval/known_mc/acc", "gen/bleu", "gen/chrf", "gen/rougeL"]
    for prefix, values in (("", row), ("base/", base), ("base/test/", base), ("test/", card["test"])):
        for name in names:
            value = values[metrics.prefixed(prefix, name) if prefix else name]
            low, high = (values[metrics.prefixed(prefix, name + s) if prefix else name + s] for s in ("_ci_low",
                                                                                                     "_ci_high"))
            assert low <= value <= high and math.isfinite(value), (prefix, name)
    assert base["base/lm_eval/known_mc/acc"] == base["base/test/lm_eval/known_mc/acc"]
    assert card["metrics"]["lm_eval/known_mc/acc"] == row["lm_eval/known_mc/acc"]
    # per-document values travel with the trial and the base model, so the pick can pair them
    for values, name in ((row, "lm_eval/known_mc/acc"), (base, "base/lm_eval/known_mc/acc")):
        assert len(values[name + "_samples"]) == 4 and sum(values[name + "_samples"]) / 4 == values[name]
    sel = select_winner(pd.DataFrame([{**row, "trial_id": "t1", "status": "finished"}]), base,
                        SelectConfig(metric="lm_eval/known_mc/acc"))
    assert sel.trial_id == "t1" and "highest validation lm_eval/known_mc/acc" in sel.reasons[0]
    assert "lm_eval/known_mc/acc (" in sel.verdict and "no interval" not in sel.verdict, sel.verdict


def test_report_and_card_show_lm_eval_and_generation(scored):
    row, base, card = scored["row"], scored["base"], scored["card"]
    summary = Summary(str(scored["exp_dir"]), base, [{**row, "status": "finished"}], winner="t1",
                      reasons=["highest downstream F1"], order=["t1"], test=card["test"])
    headers, rows = render.trial_rows(summary)
    assert headers[-4:-2] == ["known_mc acc", "BLEU"]
    assert rows[0].cells[headers.index("known_mc acc")].startswith(f"{base['base/lm_eval/known_mc/acc']:.4f} [")
    assert rows[1].cells[headers.index("BLEU")].startswith(f"{row['gen/bleu']:.2f}")
    markdown = render.summary_markdown(summary)
    assert "known_mc acc" in markdown and "lm-evaluation-harness (eval.lm_eval_tasks)" in markdown
    assert "test (base → winner): " in markdown and "known_mc acc " in markdown.split("test (base → winner): ")[1]
    text = io.StringIO()
    render.print_summary(Console(file=text, width=140), summary)
    assert "known_mc acc" in text.getvalue() and "BLEU" in text.getvalue()
    data = render.report_json(summary)
    assert data["downstream"]["metrics"] == ["lm_eval/known_mc/acc", "gen/bleu", "gen/chrf", "gen/rougeL"]
    assert data["downstream"]["base"]["lm_eval/known_mc/acc"] == base["base/lm_eval/known_mc/acc"]
    assert data["trials"][0]["downstream"]["gen/chrf_ci_low"] == row["gen/chrf_ci_low"]
    assert data["test"]["test/gen/rougeL"] == card["test"]["test/gen/rougeL"]
    assert Summary.from_dict(json.loads(json.dumps(summary.to_dict()))).trials[0]["gen/bleu"] == row["gen/bleu"]
    readme = (scored["exp_dir"] / "export" / "README.md").read_text()
    assert "| known_mc acc (lm-eval) |" in readme and "| BLEU (generation) |" in readme
    assert "| ROUGE-L (generation) |" in readme and "each task's own evaluation data" in readme
