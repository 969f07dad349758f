"""Zero-shot downstream tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A request is a (context, continuation) pair of strings (hnet.evaluation.tasks makes them). Its
score is the log-likelihood of the continuation's ids given the context's, and whether every
continuation id is the model's most likely one ("greedy"). The ids follow the harness's rules at
the border (encode_pair): whitespace that ends the context moves to the start of the
continuation, the continuation's ids are those of encode(context + continuation) after the
context's, and the model reads the stream

    [BOS] + context ids + continuation ids        (the last W + 1 ids if longer: W = the window)

from a BOS, as every training document starts (the harness adds no BOS to an HF model unless the
context is empty; our models are trained from one). Byte models read UTF-8 bytes, token models
their BPE tokens (hnet.io.tokenizer); the metrics depend on the text only, so byte and token
models compare.

Requests are sorted longest first and batched in rows of the batch size, each batch padded on the
right to a length bucket (powers of two from MIN_BUCKET up to the window, then the window), so
the model compiles once per bucket, never per example; right padding never reaches real
positions (the models are causal).

Metrics (per task, over its examples; standard error of the mean with n - 1, as the harness):
    acc        the choice with the highest log-likelihood is the right one (first of ties)
    acc_norm   the same with each log-likelihood divided by the choice's length in characters
    LAMBADA    acc: the last word is the greedy continuation; perplexity: exp(-mean log-likelihood
               of the last word), its standard error by the delta method (the harness bootstraps)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hnet.errors import EvalError
from hnet.evaluation.evaluate import PAD_ID, Scorer
from hnet.evaluation.tasks import Example, Task

MIN_BUCKET = 64


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """-> (context ids, continuation ids) by the harness's rules: whitespace ending the context
    joins the continuation; the continuation's ids are encode(context + continuation)'s after
    encode(context)'s."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids) :]


def bucket_length(length: int, window: int) -> int:
    """The padded length of a batch whose longest row is `length` (<= window)."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, window)


class RequestScorer:
    """Scores (context, continuation) requests with a Scorer's model, window and batch size."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if self.scorer.tokenizer is not None:
            return [int(i) for i in self.scorer.tokenizer.encode(data)]
        return list(data)

    def stream(self, context: str, continuation: str) -> tuple[np.ndarray, int]:
        """-> (int32 stream of at most window + 1 ids, number of continuation ids at its end)."""
        context_ids, continuation_ids = encode_pair(self.encode, context, continuation)
        if len(continuation_ids) > self.scorer.window:
            raise EvalError(
                f"a continuation of {len(continuation_ids)} ids is longer than the window ({self.scorer.window})"
            )
        stream = [self.scorer.bos_id, *context_ids, *continuation_ids][-(self.scorer.window + 1) :]
        return np.asarray(stream, np.int32), len(continuation_ids)

    def loglikelihoods(self, requests: list[tuple[str, str]], progress=None) -> tuple[np.ndarray, np.ndarray]:
        """-> (log-likelihood float64 (n,), greedy bool (n,)) of each request's continuation."""
        streams = [self.stream(context, continuation) for context, continuation in requests]
        order = sorted(range(len(streams)), key=lambda i: -len(streams[i][0]))  # longest first, stable
        loglikelihood = np.zeros(len(streams), np.float64)
        greedy = np.zeros(len(streams), bool)
        rows = self.scorer.batch_size
        for first in range(0, len(order), rows):
            batch = order[first : first + rows]
            width = bucket_length(len(streams[batch[0]][0]) - 1, self.scorer.window)
            input_ids = np.full((rows, width), PAD_ID, np.int32)
            targets = np.full((rows, width), PAD_ID, np.int32)
            for r, i in enumerate(batch):
                stream = streams[i][0]
                input_ids[r, : len(stream) - 1] = stream[:-1]
                targets[r, : len(stream) - 1] = stream[1:]
            nll, is_greedy, _ = self.scorer.score_rows(input_ids, targets)
            for r, i in enumerate(batch):
                stream, scored = streams[i]
                span = slice(len(stream) - 1 - scored, len(stream) - 1)  # the continuation's targets
                loglikelihood[i] = -float(np.sum(nll[r, span], dtype=np.float64))
                greedy[i] = bool(np.all(is_greedy[r, span]))
            if progress is not None:
                progress(len(batch))
        return loglikelihood, greedy


def mean_stderr(values: np.ndarray) -> float | None:
    """Standard error of the mean (sample standard deviation with n - 1); None for one value."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


@dataclass
class TaskResult:
    """A task's metrics: {name: (value, standard error or None)}, over `examples` examples."""

    task: Task
    examples: int
    requests: int
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "task": self.task.name,
            "dataset": self.task.dataset,
            "config": self.task.config,
            "split": self.task.split,
            "examples": self.examples,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "metrics": {name: {"value": value, "stderr": stderr} for name, (value, stderr) in self.metrics.items()},
        }


def task_metrics(task: Task, examples: list[Example], loglikelihood: np.ndarray, greedy: np.ndarray) -> dict:
    """The task's metrics from each request's (log-likelihood, greedy), requests in example order."""
    if task.kind == "last_word":
        stderr = mean_stderr(loglikelihood)  # one request per example: the last word
        perplexity = math.exp(-float(np.mean(loglikelihood)))
        return {
            "perplexity": (perplexity, None if stderr is None else perplexity * stderr),
            "acc": (float(np.mean(greedy)), mean_stderr(greedy.astype(np.float64))),
        }
    acc, acc_norm, start = [], [], 0
    for example in examples:
        lls = loglikelihood[start : start + len(example.requests)]
        start += len(example.requests)
        acc.append(float(np.argmax(lls) == example.gold))
        acc_norm.append(float(np.argmax(lls / np.asarray(example.choice_lengths, np.float64)) == example.gold))
    values = {"acc": np.asarray(acc), "acc_norm": np.asarray(acc_norm)}
    return {name: (float(np.mean(values[name])), mean_stderr(values[name])) for name in task.metrics}


def evaluate_task(requests: RequestScorer, task: Task, examples: list[Example], progress=None) -> TaskResult:
    """Score every example of a task."""
    if not examples:
        raise EvalError(f"{task.name}: no examples to score")
    began = time.perf_counter()
    flat = [request for example in examples for request in example.requests]
    loglikelihood, greedy = requests.loglikelihoods(flat, progress)
    result = TaskResult(task, examples=len(examples), requests=len(flat))
    result.metrics = task_metrics(task, examples, loglikelihood, greedy)
    result.seconds = time.perf_counter() - began
    return result


def results_table(rows: list[tuple[str, TaskResult]]) -> str:
    """A markdown table: model, task, metric, value, standard error, examples."""
    lines = ["| model | task | metric | value | stderr | examples |", "|---|---|---|---:|---:|---:|"]
    for model, result in rows:
        for name, (value, stderr) in result.metrics.items():
            shown = f"{value:.3f}" if name == "perplexity" else f"{value:.4f}"
            err = "-" if stderr is None else (f"{stderr:.3f}" if name == "perplexity" else f"{stderr:.4f}")
            lines.append(f"| {model} | {result.task.name} | {name} | {shown} | {err} | {result.examples} |")
    return "\n".join(lines)
