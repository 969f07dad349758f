"""The zero-shot downstream tasks of the H-Net paper's main table, as lm-evaluation-harness poses them.

Each task reads the Hugging Face dataset the harness reads (same path, config and split) with the
`datasets` library, and turns every row into an Example the way the harness's task file does
(same prompt, same answer choices, same target delimiter " "), so that the numbers compare with
published harness numbers:

    task            dataset (config)                    split       kind             metrics
    lambada_openai  EleutherAI/lambada_openai (default) test        last word        perplexity, acc
    hellaswag       Rowan/hellaswag                     validation  multiple choice  acc, acc_norm
    piqa            baber/piqa                          validation  multiple choice  acc, acc_norm
    arc_easy        allenai/ai2_arc (ARC-Easy)          test        multiple choice  acc, acc_norm
    arc_challenge   allenai/ai2_arc (ARC-Challenge)     test        multiple choice  acc, acc_norm
    winogrande      allenai/winogrande (winogrande_xl)  validation  partial context  acc
    openbookqa      allenai/openbookqa (main)           test        multiple choice  acc, acc_norm

Where the rows come from (load_rows): one call, datasets.load_dataset(source, config, split), with
the Hub dataset as the source (through the datasets cache; HF_DATASETS_OFFLINE=1 reads the cache
only), or a local folder TASK_DATA/<task>/ holding the split as one .jsonl, .json, .parquet or
.csv file named after it, in the dataset's own schema (e.g. TASK_DATA/piqa/validation.jsonl).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hnet.errors import EvalError

TARGET_DELIMITER = " "  # the harness puts it between a multiple-choice context and each choice
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Example:
    """One scored item. requests: (context, continuation) strings, one per answer choice (one for
    LAMBADA); gold: the index of the right request; choice_lengths: characters of each choice,
    the harness's acc_norm divisor."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    choice_lengths: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """A task: where its rows are, how a row becomes an Example, and what is reported."""

    name: str
    dataset: str  # the Hub dataset the harness reads
    config: str | None  # its configuration (datasets' `name`)
    split: str
    kind: str  # "multiple_choice" or "last_word"
    metrics: tuple[str, ...]
    to_example: Callable[[dict], Example]


def multiple_choice(context: str, choices: list[str], gold: int) -> Example:
    """Each choice continues the same context after the target delimiter."""
    return Example(
        requests=tuple((context, TARGET_DELIMITER + choice) for choice in choices),
        gold=gold,
        choice_lengths=tuple(len(choice) for choice in choices),
    )


def lambada(row: dict) -> Example:
    """The passage without its last word, and " " + that word (split on single spaces, as the harness)."""
    words = row["text"].split(" ")
    return Example(requests=((" ".join(words[:-1]), " " + words[-1]),), gold=0, choice_lengths=(len(words[-1]),))


def hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag preprocessing (drops the WikiHow "[header]"-style artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Example:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return multiple_choice(
        hellaswag_clean(row["activity_label"] + ": " + context),
        [hellaswag_clean(ending) for ending in row["endings"]],
        int(row["label"]),
    )


def piqa(row: dict) -> Example:
    return multiple_choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def arc(row: dict) -> Example:
    choices = row["choices"]
    return multiple_choice(
        f"Question: {row['question']}\nAnswer:", list(choices["text"]), list(choices["label"]).index(row["answerKey"])
    )


def openbookqa(row: dict) -> Example:
    choices = row["choices"]
    return multiple_choice(
        row["question_stem"], list(choices["text"]), list(choices["label"]).index(row["answerKey"].lstrip())
    )


def winogrande(row: dict) -> Example:
    """Partial evaluation: each option fills the blank to make a context, and the sentence's rest
    after the blank is the one continuation scored under each."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    options = [row["option1"], row["option2"]]
    return Example(
        requests=tuple((sentence[:blank] + option, TARGET_DELIMITER + rest) for option in options),
        gold={"1": 0, "2": 1}[str(row["answer"])],
        choice_lengths=tuple(len(sentence[:blank] + option) for option in options),
    )


ACC_NORM = ("acc", "acc_norm")
TASKS = {
    task.name: task
    for task in (
        Task(
            "lambada_openai",
            "EleutherAI/lambada_openai",
            "default",
            "test",
            "last_word",
            ("perplexity", "acc"),
            lambada,
        ),
        Task("hellaswag", "Rowan/hellaswag", None, "validation", "multiple_choice", ACC_NORM, hellaswag),
        Task("piqa", "baber/piqa", None, "validation", "multiple_choice", ACC_NORM, piqa),
        Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "multiple_choice", ACC_NORM, arc),
        Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "multiple_choice", ACC_NORM, arc),
        Task(
            "winogrande", "allenai/winogrande", "winogrande_xl", "validation", "multiple_choice", ("acc",), winogrande
        ),
        Task("openbookqa", "allenai/openbookqa", "main", "test", "multiple_choice", ACC_NORM, openbookqa),
    )
}


def parse_tasks(text: str) -> list[Task]:
    """--tasks: comma-separated task names, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise EvalError(f"--tasks: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(TASKS)})")
    return [TASKS[name] for name in dict.fromkeys(names)]


def local_split_file(task: Task, task_data: Path) -> Path:
    """TASK_DATA/<task>/<split>.<suffix>: the one file of the task's split in a local folder."""
    folder = task_data / task.name
    found = [
        folder / f"{task.split}{suffix}" for suffix in DATA_SUFFIXES if (folder / f"{task.split}{suffix}").is_file()
    ]
    if len(found) != 1:
        expected = f"{folder}/{task.split}.{{{','.join(s[1:] for s in DATA_SUFFIXES)}}}"
        raise EvalError(f"{task.name}: {'no' if not found else 'more than one'} split file {expected}")
    return found[0]


def load_rows(task: Task, task_data: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The task's rows (the first `limit`), read with datasets.load_dataset: from TASK_DATA/<task>/
    if given, else from the Hub dataset (its cache when HF_DATASETS_OFFLINE=1)."""
    try:
        import datasets
    except ImportError:
        raise EvalError("downstream tasks read their data with `datasets`: pip install 'hnet-jax[eval]'") from None
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # its per-split bars, in a log file
    split = task.split if limit is None else f"{task.split}[:{limit}]"
    source, config = task.dataset, task.config
    if task_data is not None:  # a folder is a dataset too: datasets finds the split in the file's name
        source, config = str(local_split_file(task, Path(task_data)).parent), None
    try:
        data = datasets.load_dataset(source, config, split=split)
    except Exception as err:  # the Hub unreachable, not cached offline, a bad file: one line
        where = f"{task_data}/{task.name}" if task_data is not None else f"{task.dataset} ({task.config or 'default'})"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalError(f"{task.name}: cannot read {where} split {task.split}: {first[:300]}") from None
    return [dict(row) for row in data]


def examples(task: Task, rows: list[dict]) -> list[Example]:
    """Every row as an Example; a row that does not fit the task's schema is one error line."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(task.to_example(row))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise EvalError(f"{task.name}: row {i} does not fit {task.dataset}'s schema ({type(err).__name__}: {err})")
    return out
