"""Zero-shot downstream tasks (hnet.evaluation.tasks, hnet.evaluation.downstream, eval.py --tasks):
the harness's prompts and border rules, data read by `datasets` from task files the tests write in
the datasets' own schema, the batched bucketed scoring against a loop that scores one request at
a time, metrics worked out by hand on a uniform model, and a trained model that picks the
continuation its training forced."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eval as eval_cli
from conftest import shrink, tiny_config, write_run_folder
from hnet.errors import EvalError
from hnet.evaluation.downstream import RequestScorer, bucket_length, encode_pair, evaluate_task, task_metrics
from hnet.evaluation.evaluate import Scorer, score_batch
from hnet.evaluation.tasks import TASKS, examples, load_rows, parse_tasks
from hnet.model import build_model
from hnet.vocab import BOS_ID

WINDOW = 256

# One row per task in its Hub dataset's schema (the fields the harness reads).
ROWS = {
    "lambada_openai": {"text": "the cat sat on the mat and the dog sat on the log"},
    "hellaswag": {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing [title] on a roof."],
        "label": "1",
    },
    "piqa": {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Freeze the lid.", "label": 0},
    "arc_easy": {
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
    "arc_challenge": {
        "question": "Which is a metal?",
        "choices": {"text": ["iron", "wood"], "label": ["1", "2"]},
        "answerKey": "1",
    },
    "winogrande": {
        "sentence": "The trophy did not fit in the case because _ was too big.",
        "option1": "the trophy",
        "option2": "the case",
        "answer": "1",
    },
    "openbookqa": {
        "question_stem": "The sun is",
        "choices": {"text": ["a star", "a planet"], "label": ["A", "B"]},
        "answerKey": "A",
    },
}


def write_task_data(root, rows_by_task, suffix=".jsonl"):
    """TASK_DATA/<task>/<split>.jsonl in each dataset's schema, as eval.py --task-data reads it."""
    for name, rows in rows_by_task.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / f"{TASKS[name].split}{suffix}").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


# ---- the harness's prompts, choices and border rules ----------------------------------------


def test_each_task_poses_its_rows_as_the_harness_does():
    ex = {name: TASKS[name].to_example(row) for name, row in ROWS.items()}
    assert ex["lambada_openai"].requests == (("the cat sat on the mat and the dog sat on the", " log"),)
    assert ex["hellaswag"].requests == (
        ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
        ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing. on a roof."),
    )
    assert ex["hellaswag"].gold == 1
    assert ex["piqa"].requests[1] == ("Question: How do I open a jar?\nAnswer:", " Freeze the lid.")
    assert ex["arc_easy"].gold == 1 and ex["arc_easy"].choice_lengths == (3, 5, 4)
    assert ex["arc_challenge"].gold == 0
    assert ex["openbookqa"].requests == (("The sun is", " a star"), ("The sun is", " a planet"))
    # WinoGrande: each option completes the context; the one continuation is scored under both.
    assert ex["winogrande"].requests == (
        ("The trophy did not fit in the case because the trophy", " was too big."),
        ("The trophy did not fit in the case because the case", " was too big."),
    )
    assert ex["winogrande"].gold == 0
    assert [t.name for t in parse_tasks("piqa, arc_easy,piqa")] == ["piqa", "arc_easy"]
    with pytest.raises(EvalError, match="unknown hellaswagg"):
        parse_tasks("hellaswagg")


def test_trailing_whitespace_moves_to_the_continuation():
    def encode(text):
        return list(text.encode())

    assert encode_pair(encode, "Answer: ", "yes") == (list(b"Answer:"), list(b" yes"))
    assert encode_pair(encode, "a\n\n", "b") == (list(b"a"), list(b"\n\nb"))
    # A token encoder: the continuation is what the whole string adds after the context's ids.
    words = {"Answer:": [7], "Answer: yes": [7, 9], "ab": [3], "abc": [4]}
    assert encode_pair(words.__getitem__, "Answer:", " yes") == ([7], [9])
    assert encode_pair(words.__getitem__, "ab", "c") == ([3], [])  # merged across the border: nothing left


def test_rows_are_read_with_datasets_from_a_local_folder(tmp_path):
    rows = [dict(ROWS["piqa"], goal=f"goal {i}") for i in range(5)]
    write_task_data(tmp_path, {"piqa": rows})
    assert load_rows(TASKS["piqa"], tmp_path) == rows
    assert load_rows(TASKS["piqa"], tmp_path, limit=2) == rows[:2]
    with pytest.raises(EvalError, match="hellaswag: no split file .*hellaswag/validation"):
        load_rows(TASKS["hellaswag"], tmp_path)
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(EvalError, match="arc_easy: row 0 does not fit allenai/ai2_arc's schema"):
        examples(TASKS["arc_easy"], load_rows(TASKS["arc_easy"], tmp_path))


# ---- scoring ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hnet_model():
    """A tiny untrained 1-stage H-Net that never drops a boundary."""
    return build_model(shrink(tiny_config("hnet_1stage_tiny", capacity_slack="exact")), seed=0)


def reference_loglikelihood(model, tokenizer, context, continuation):
    """One request alone: its stream in a batch of one, padded to WINDOW, log-softmax in numpy."""
    scorer = Scorer(model, window=WINDOW, batch_size=1, tokenizer=tokenizer)
    stream, scored = RequestScorer(scorer).stream(context, continuation)
    ids = np.zeros((1, WINDOW), np.int32)
    ids[0, : len(stream) - 1] = stream[:-1]
    logits = np.asarray(jax.jit(lambda x: model(x).logits)(ids)[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logprobs = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    positions = range(len(stream) - 1 - scored, len(stream) - 1)
    ll = sum(logprobs[t, stream[t + 1]] for t in positions)
    greedy = all(np.argmax(logits[t]) == stream[t + 1] for t in positions)
    return ll, greedy


REQUESTS = [
    ("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
    ("Question: How do I open a jar?\nAnswer: ", "Freeze it."),  # the space moves across
    ("Grüße aus Köln, naïve café", " — 日本語"),
    ("", "an empty context"),
    ("x" * 300, " longer than the window: the harness keeps the last ids"),
    ("def f(x):\n    return", " x + 1"),
]


def test_batched_byte_scores_equal_one_request_at_a_time(hnet_model):
    requests = RequestScorer(Scorer(hnet_model, window=WINDOW, batch_size=4))  # batches of 4 and 2 rows
    ll, greedy = requests.loglikelihoods(REQUESTS)
    for i, (context, continuation) in enumerate(REQUESTS):
        want_ll, want_greedy = reference_loglikelihood(hnet_model, None, context, continuation)
        assert abs(ll[i] - want_ll) < 1e-4 * max(1.0, abs(want_ll)), (i, ll[i], want_ll)
        assert greedy[i] == want_greedy
    assert len(requests.stream(*REQUESTS[4])[0]) == WINDOW + 1


def test_batched_token_scores_equal_one_request_at_a_time(tmp_path):
    from hnet.io.tokenizer import train_tokenizer
    from data.text import prepare as text_prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, (context, continuation) in enumerate(REQUESTS * 3):
        (docs / f"{i}.txt").write_text(context + continuation + f" number {i}\n")
    text_prepare.main([str(docs), "--out", str(tmp_path / "corpus"), "--validation-fraction", "0.2"])
    tokenizer = train_tokenizer(tmp_path / "corpus", "train", 300)
    model = build_model(shrink(tiny_config("transformer_bpe_tiny", vocab_size=tokenizer.vocab_size)), seed=1)
    requests = RequestScorer(Scorer(model, window=WINDOW, batch_size=4, tokenizer=tokenizer))
    ll, greedy = requests.loglikelihoods(REQUESTS)
    for i, (context, continuation) in enumerate(REQUESTS):
        want_ll, want_greedy = reference_loglikelihood(model, tokenizer, context, continuation)
        assert abs(ll[i] - want_ll) < 1e-4 * max(1.0, abs(want_ll)), (i, ll[i], want_ll)
        assert greedy[i] == want_greedy
    # Token ids of the continuation: the whole string's ids after the context's.
    context_ids, continuation_ids = encode_pair(requests.encode, *REQUESTS[0])
    assert context_ids + continuation_ids == requests.encode("".join(REQUESTS[0]))


def test_lengths_compile_once_per_bucket(hnet_model):
    assert [bucket_length(n, 256) for n in (1, 64, 65, 128, 129, 256)] == [64, 64, 128, 128, 256, 256]
    assert bucket_length(300, 300) == 300 and bucket_length(257, 300) == 300
    requests = RequestScorer(Scorer(hnet_model, window=WINDOW, batch_size=2))
    requests.loglikelihoods([("a" * n, " b") for n in (5, 20, 70, 100, 130, 200, 250)])  # every bucket once
    before = score_batch._cache_size()
    requests.loglikelihoods([("c" * n, " d") for n in range(3, 240, 7)])  # 34 lengths, the same buckets
    assert score_batch._cache_size() == before


def test_uniform_model_metrics_by_hand():
    """A byte model with a zero head gives every byte log(1/256): a continuation of b bytes scores
    -b ln 256. acc picks the fewest bytes; acc_norm the fewest bytes per character."""
    model = build_model(shrink(tiny_config("transformer_byte_tiny")), seed=0)
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
    requests = RequestScorer(Scorer(model, window=WINDOW, batch_size=3))
    rows = [
        # Scored: " abcd" 5 bytes, " é" 3 bytes, " ab" 3 bytes; choices (no space): 4, 1 and 2 characters.
        {"question": "q", "choices": {"text": ["abcd", "é", "ab"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"question": "q", "choices": {"text": ["abcd", "é", "ab"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    ]
    result = evaluate_task(requests, TASKS["arc_easy"], examples(TASKS["arc_easy"], rows))
    # acc: " é" and " ab" tie at 3 bytes, the first wins (B); acc_norm, per character of the choice:
    # "abcd" -5/4 ln 256 beats "ab" -3/2 and "é" -3/1 (A).
    assert result.metrics["acc"] == (0.5, pytest.approx(0.5))
    assert result.metrics["acc_norm"] == (0.5, pytest.approx(0.5))
    words = [{"text": "one two"}, {"text": "three four five"}, {"text": "six seven"}]
    result = evaluate_task(requests, TASKS["lambada_openai"], examples(TASKS["lambada_openai"], words))
    mean_bytes = np.mean([len(" two"), len(" five"), len(" seven")])
    perplexity, stderr = result.metrics["perplexity"]
    assert perplexity == pytest.approx(256.0**mean_bytes, rel=1e-5)
    assert stderr == pytest.approx(perplexity * math.log(256) * np.std([4, 5, 6], ddof=1) / math.sqrt(3), rel=1e-5)
    assert result.metrics["acc"][0] == 0.0  # every byte ties: argmax is byte 0, never the word


def test_task_metrics_pick_the_first_of_ties_and_normalise_by_characters():
    rows = [{"goal": "g", "sol1": "aaaa", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}]
    exs = examples(TASKS["piqa"], rows)
    ll = np.array([-4.0, -2.0, -3.0, -3.0])  # example 0: acc picks 1, acc_norm 0 (-1/char vs -2); example 1: a tie
    metrics = task_metrics(TASKS["piqa"], exs, ll, np.zeros(4, bool))
    assert metrics["acc"][0] == 0.0 and metrics["acc_norm"][0] == 0.5


# ---- a model trained to continue one way ------------------------------------------------------

TRAINED_TEXT = "red green blue. " * 64


@pytest.fixture(scope="module")
def trained():
    """A tiny byte Transformer trained until it continues 'red green blue. ' without doubt."""
    model = build_model(shrink(tiny_config("transformer_byte_tiny")), seed=0)
    data = np.frombuffer(TRAINED_TEXT.encode(), np.uint8).astype(np.int32)
    rows = np.stack([data[i : i + 65] for i in range(0, 16 * 16, 16)])
    rows[:, 0] = BOS_ID  # documents start from a BOS, mid-sentence
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(rows[:, :-1]).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimizer.init(params)
    for _ in range(150):
        params, opt_state, value = step(params, opt_state)
    assert value < 0.2, value
    return nnx.merge(graphdef, params, rest)


def test_a_trained_model_picks_the_continuation_it_was_forced_to(trained, tmp_path):
    requests = RequestScorer(Scorer(trained, window=WINDOW, batch_size=2))
    rows = [
        {"question_stem": "red green blue. red green", "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
        for c, k in ((["green", "blue.", "red"], "B"), (["blue.", "red", "green"], "A"))
    ]
    result = evaluate_task(requests, TASKS["openbookqa"], examples(TASKS["openbookqa"], rows))
    assert result.metrics["acc"][0] == 1.0 and result.metrics["acc_norm"][0] == 1.0
    lambada = [{"text": "red green blue. red green blue"}, {"text": "blue. red green blue. red"}]
    result = evaluate_task(requests, TASKS["lambada_openai"], examples(TASKS["lambada_openai"], lambada))
    assert result.metrics["acc"][0] == 1.0 and result.metrics["perplexity"][0] < 1.5


# ---- the command line ------------------------------------------------------------------------


def test_eval_cli_scores_tasks_from_local_files(trained, tmp_path, capsys):
    run = write_run_folder(tmp_path / "run", trained)
    rows = {name: [row] * 3 for name, row in ROWS.items()}
    rows["lambada_openai"] = [{"text": "red green blue. red green blue"}] * 3
    data = write_task_data(tmp_path / "tasks", rows)
    results = tmp_path / "results.json"
    code = eval_cli.main(
        ["--checkpoint", str(run), "--tasks", ",".join(TASKS), "--task-data", str(data), "--limit", "2"]
        + ["--results", str(results), "--batch-size", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| run | lambada_openai | perplexity |" in out and "| run | winogrande | acc |" in out
    saved = json.loads(results.read_text())
    (model,) = saved["models"]
    assert list(model["tasks"]) == list(TASKS)
    assert all(task["examples"] == 2 for task in model["tasks"].values())
    assert model["tasks"]["lambada_openai"]["metrics"]["acc"] == {"value": 1.0, "stderr": 0.0}
    assert set(model["tasks"]["hellaswag"]["metrics"]) == {"acc", "acc_norm"}
    assert model["tasks"]["hellaswag"]["split"] == "validation"


def test_eval_cli_task_errors_are_one_line(tmp_path, capsys):
    assert eval_cli.main(["--checkpoint", str(tmp_path), "--tasks", "nope"]) == 2
    assert eval_cli.main(["--checkpoint", str(tmp_path), "--limit", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --limit and --task-data go with --tasks"
    assert len(err) == 2 and err[0].startswith("error: ")


def test_offline_without_the_dataset_cached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(EvalError, match=r"^piqa: cannot read baber/piqa \(default\) split validation: "):
        load_rows(TASKS["piqa"], limit=1)
