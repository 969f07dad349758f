"""Evaluation: bits per byte accounting (bytes and BPE tokens), windowing, boundary mapping, statistics
and rendering, the robustness and comparison reports, and eval.py's command line."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eval as eval_cli
import hnet
from hnet.evaluation import boundaries as bnd
from hnet.io.checkpoint import Checkpointer
from hnet.evaluation.evaluate import Scorer, plan_windows, take_prefix
from conftest import shrink, tiny_config

WINDOW = 32
MULTIBYTE = "Grüße, naïve café — 日本語のテキスト; emoji 🙂 ok.\n".encode()
TEXT = (b"def f(x):\n    return x + 1  # add one\n" + MULTIBYTE) * 3  # 3 x 111 bytes: longer than WINDOW


@pytest.fixture(scope="module")
def learned():
    """A tiny untrained 1-stage H-Net at the default capacity rule (it drops boundaries; windows
    of different lengths still chunk, and so score, the same context the same way)."""
    config = shrink(tiny_config("hnet_1stage_tiny"))
    return hnet.build_model(config, seed=0)


@pytest.fixture(scope="module")
def heuristic():
    """A tiny 2-stage H-Net with "space" routing outside and "stride:2" inside: its boundaries
    are known in advance (word starts, then every other word)."""
    config = shrink(tiny_config("hnet_2stage_tiny", routing=("space", "stride:2")))
    return hnet.build_model(config, seed=0)


def zero_head(model):
    """The same model with a zero LM head: uniform next-token distribution."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.copy, state))
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
    return model


# ---- windows --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_targets,window,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 8), (50, 8, 1), (51, 16, 5)]
)
def test_windows_score_every_target_once(num_targets, window, stride):
    seen = np.zeros(num_targets + 1, int)  # targets are stream positions 1 .. n
    for start, score_from, length in plan_windows(num_targets, window, stride):
        assert length == min(window, num_targets) and start + length <= num_targets
        if start > 0:
            assert score_from >= window - stride  # context inside the window
        seen[start + score_from + 1 : start + length + 1] += 1
    assert seen[0] == 0 and np.all(seen[1:] == 1)


def test_take_prefix_cuts_at_a_character():
    docs = [b"abc", "é日本".encode()]  # 3 + 2 + 3 + 3 bytes
    assert take_prefix(docs, None) == docs
    assert take_prefix(docs, 3) == [b"abc"]
    assert take_prefix(docs, 7) == [b"abc", "é".encode()]  # not inside 日
    assert take_prefix(docs, 8) == [b"abc", "é日".encode()]


# ---- bits per byte --------------------------------------------------------------------------


def test_uniform_byte_model_scores_exactly_8_bits(learned):
    scorer = Scorer(zero_head(learned), window=WINDOW, batch_size=2)
    docs = [TEXT, b"x", MULTIBYTE]
    result = scorer.evaluate(docs)
    assert result.bytes == result.positions == sum(len(d) for d in docs) and result.documents == 3
    assert abs(result.bpb - 8.0) < 1e-5
    assert abs(result.nats_per_byte - math.log(256)) < 1e-5 and abs(result.perplexity - 256) < 1e-3


def test_windowed_scoring_matches_one_pass(learned):
    """Each byte is scored once; with a window covering the document the NLL is the model's own
    one-pass NLL, and shorter windows agree with it wherever they see the same context."""
    doc = TEXT[: WINDOW - 1]
    stream = np.concatenate([[hnet.BOS_ID], np.frombuffer(doc, np.uint8)]).astype(np.int32)
    whole = Scorer(learned, window=WINDOW, batch_size=2)
    windowed = Scorer(learned, window=WINDOW // 2, stride=WINDOW // 4, batch_size=2)

    # Reference: one forward over [BOS] + doc, by hand.
    ids, targets = np.zeros((2, WINDOW), np.int32), np.zeros((2, WINDOW), np.int32)
    ids[0, :WINDOW] = stream[:WINDOW]
    targets[0, : WINDOW - 1] = stream[1:]
    nll, _, _ = whole.score_rows(ids, targets)
    reference = np.asarray(nll)[0, : WINDOW - 1]

    (one,) = whole.score_streams([stream])
    np.testing.assert_allclose(one.nll, reference, rtol=1e-6, atol=1e-6)
    (parts,) = windowed.score_streams([stream])
    assert parts.nll.shape == (WINDOW - 1,) and np.all(parts.nll > 0)  # every byte scored
    first = WINDOW // 2
    np.testing.assert_allclose(parts.nll[:first], reference[:first], rtol=1e-4, atol=1e-4)
    assert not np.allclose(parts.nll[first:], reference[first:], atol=1e-4)  # less context after the first window
    result = windowed.evaluate([doc])
    assert result.bytes == result.positions == WINDOW - 1
    assert abs(result.nll - float(np.sum(parts.nll, dtype=np.float64))) < 1e-6


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a small text corpus, and the corpus folder."""
    from data.text import prepare as text_prepare
    from hnet.io.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bpe")
    docs = root / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i}.txt").write_bytes(TEXT + f"document number {i}\n".encode())
    text_prepare.main([str(docs), "--out", str(root / "corpus"), "--validation-fraction", "0.3"])
    return train_tokenizer(root / "corpus", "train", 300), root / "corpus"


def test_uniform_token_model_bpb_and_byte_accounting(bpe):
    tokenizer, _ = bpe
    config = shrink(tiny_config("transformer_bpe_tiny", vocab_size=tokenizer.vocab_size))
    scorer = Scorer(zero_head(hnet.build_model(config, seed=0)), window=WINDOW, batch_size=2, tokenizer=tokenizer)
    docs = [TEXT, MULTIBYTE, "ñ".encode()]
    result = scorer.evaluate(docs)
    tokens = sum(len(tokenizer.encode(d)) for d in docs)
    assert result.bytes == sum(len(d) for d in docs)  # bytes of the text, not tokens or characters
    assert result.positions == tokens < result.bytes
    assert abs(result.bpb - math.log2(tokenizer.vocab_size) * tokens / result.bytes) < 1e-5
    # Its tokens are its chunks when shown side by side with H-Nets.
    positions, stats = scorer.boundary_positions(MULTIBYTE)
    assert len(positions[0]) == len(tokenizer.encode(MULTIBYTE)) == stats[0].chunks
    assert "".join(bnd.split_chunks(MULTIBYTE, positions[0])) == MULTIBYTE.decode()


# ---- boundaries -----------------------------------------------------------------------------


def test_boundary_stats_on_a_handcrafted_mask():
    stream = np.frombuffer(b"ab cd,ef gh", np.uint8)
    boundary = np.zeros(len(stream), bool)
    boundary[[0, 3, 5, 6, 10]] = True  # 'a' (forced), 'c' after ' ', ',' after 'd', 'e' after ',', 'h' after 'g'
    stats = bnd.BoundaryStats()
    stats.add(stream, boundary)
    assert stats.chunks == 5 and stats.positions == 11 and stats.bytes_per_chunk == 11 / 5
    assert stats.chosen == 4 and stats.share_after_separator == 2 / 4
    assert stats.share_on_separator == 1 / 4  # only ',' begins its chunk (a cut before the separator)
    assert list(bnd.chunk_lengths(boundary)) == [3, 2, 1, 4, 1]
    assert stats.histogram[1] == 2 and stats.histogram[2] == 1 and stats.histogram[3] == 1 and stats.histogram[4] == 1
    long = np.zeros(100, bool)
    stats.add(np.zeros(100, np.uint8), long)  # one chunk of 100 bytes, pooled in the last bin
    assert stats.histogram[bnd.HIST_MAX] == 1 and stats.chunks == 6


def test_byte_boundaries_maps_inner_stages():
    # Stage 0 over 8 bytes; stage 1 over the 4 stage-0 chunks; stage 2 over 2.
    mask0 = np.array([[1, 0, 1, 1, 0, 0, 1, 0]], bool)
    chunk0 = np.array([[0, 2, 3, 6]])
    mask1 = np.array([[1, 0, 0, 1]], bool)
    chunk1 = np.array([[0, 3]])
    mask2 = np.array([[1, 1]], bool)
    stages = [(mask0, mask0, chunk0), (mask1, mask1, chunk1), (mask2, mask2, np.array([[0, 1]]))]
    chunk_starts, dropped = bnd.byte_boundaries(stages)
    assert [list(np.flatnonzero(b[0])) for b in chunk_starts] == [[0, 2, 3, 6], [0, 6], [0, 6]]
    assert not dropped.any()
    # The router chose 4 boundaries, the capacity rule kept 2: the other two are dropped.
    kept = np.array([[1, 0, 1, 0, 0, 0, 0, 0]], bool)
    chunk_starts, dropped = bnd.byte_boundaries([(mask0, kept, np.array([[0, 2]]))])
    assert list(np.flatnonzero(chunk_starts[0, 0])) == [0, 2] and list(np.flatnonzero(dropped[0, 0])) == [3, 6]


def test_show_boundaries_marks_the_models_positions(heuristic):
    text = "ça va? très bien, 日本 and 🙂x!".encode() * 2
    scorer = Scorer(heuristic, window=WINDOW, batch_size=2)
    positions, stats = scorer.boundary_positions(text)

    # The model's own stage outputs on [BOS] + text (+ one unscored byte), mapped by hand.
    stream = np.concatenate([[hnet.BOS_ID], np.frombuffer(text, np.uint8), [0]]).astype(np.int32)
    assert len(stream) - 1 > WINDOW  # windowed: stride WINDOW // 2
    expected0, expected1 = set(), set()
    for start, score_from, length in plan_windows(len(stream) - 1, WINDOW, WINDOW // 2):
        ids = np.zeros((2, WINDOW), np.int32)
        ids[0, :length] = stream[start : start + length]
        _, _, stages = scorer.score_rows(ids, ids)
        (_, chunks0, chunk0), (_, chunks1, _) = stages
        for i in np.flatnonzero(chunks0[0]):
            if score_from <= i < length:
                expected0.add(start + i - 1)
        for m in np.flatnonzero(chunks1[0]):
            if score_from <= chunk0[0, m] < length:
                expected1.add(start + chunk0[0, m] - 1)
    expected0.discard(-1), expected1.discard(-1)  # the BOS
    assert list(positions[0]) == sorted(expected0) and list(positions[1]) == sorted(expected1)

    # Word starts after separators (space routing), every other one of them inside (stride 2).
    words = [i for i in range(1, len(text)) if text[i - 1] in b" ,?!" and text[i] not in b" ,?!"]
    assert list(positions[0]) == words
    assert set(positions[1]) <= set(positions[0]) and len(positions[1]) >= len(words) // 2
    assert stats[0].share_after_separator == 1.0

    # Plain rendering: '|' exactly at the (character-snapped) positions, the text otherwise intact.
    plain = bnd.render_terminal(text, positions[1], colour=False)
    chunks = plain.split("|")
    assert "".join(chunks) == text.decode()
    offsets = np.cumsum([0] + [len(c.encode()) for c in chunks[:-1]])
    assert list(offsets) == bnd.character_starts(text, positions[1])
    coloured = bnd.render_terminal(text, positions[0], colour=True)
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == text.decode()


def test_boundaries_inside_a_character_are_drawn_before_it():
    text = "aé日b".encode()  # a | é (2 bytes) | 日 (3 bytes) | b
    assert bnd.character_starts(text, [2, 4, 5, 6]) == [0, 1, 3, 6]
    assert bnd.split_chunks(text, [2, 5]) == ["a", "é", "日b"]
    page = bnd.render_html(b"<a&b>", [bnd.ShownModel("m", "d", [np.array([2])], [bnd.BoundaryStats()], ["stage 0"])])
    assert '<meta charset="utf-8">' in page and "&lt;a</span>" in page and "&amp;b&gt;</span>" in page


def test_space_routing_boundaries_all_follow_separators(heuristic):
    result = Scorer(heuristic, window=WINDOW, batch_size=2).evaluate([TEXT, MULTIBYTE])
    inner = result.stages[1]
    assert result.stages[0].share_after_separator == 1.0 and result.stages[0].dropped == 0
    assert result.stages[0].chosen > 20
    assert result.stages[0].bytes_per_chunk < inner.bytes_per_chunk
    assert all(stats.histogram.sum() == stats.chunks for stats in result.stages)


# ---- reports and the command line -----------------------------------------------------------


def write_run(path, model, corpus, steps=(2, 4), bpb=(3.0, 2.5)):
    """A run folder as train.py leaves it: config.json, metrics.jsonl and one checkpoint."""
    path.mkdir()
    run = {
        "model": model.config.to_dict(),
        "data": {"corpus": str(corpus), "train_split": "train", "eval_split": "validation"},
        "train": {"seq_len": WINDOW, "batch_size": 2, "steps": steps[-1]},
    }
    (path / "config.json").write_text(json.dumps(run))
    rows = []
    depth = model.config.depth
    for step in range(1, steps[-1] + 1):
        rows.append(
            {
                "step": step,
                "bytes_seen": 64 * step,
                "loss": 3.0,
                "bpb": 4.0,
                **{f"stage{s}_bytes_per_chunk": 2.0 + s for s in range(depth)},
            }
        )
        if step in steps:
            rows.append(
                {
                    "step": step,
                    "bytes_seen": 64 * step,
                    "split": "validation",
                    "eval_bpb": bpb[steps.index(step)],
                    "eval_bytes": 4096,
                    "eval_tokens": 4096,
                    **{f"eval_stage{s}_bytes_per_chunk": 3.0 + s for s in range(depth)},
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpointer = Checkpointer(path, async_save=False)
    checkpointer.save(steps[-1], {"params": nnx.state(model, nnx.Param)}, {}, {"step": steps[-1]})
    checkpointer.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, learned, heuristic, bpe):
    _, corpus = bpe
    root = tmp_path_factory.mktemp("runs")
    return {
        "learned": write_run(root / "learned", learned, corpus),
        "uniform": write_run(root / "uniform", zero_head(learned), corpus, bpb=(8.0, 8.0)),
        "heuristic": write_run(root / "heuristic", heuristic, corpus, bpb=(3.5, 2.0)),
    }


def cli(args, capsys):
    code = eval_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_eval_cli_on_the_runs_own_data(runs, capsys):
    code, out, err = cli(
        [
            "--checkpoint",
            runs["uniform"],
            "--checkpoint",
            runs["learned"],
            "--window",
            WINDOW,
            "--batch-size",
            2,
            "--no-compressors",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert "split 'validation'" in result["data"] and result["bytes"] > 0
    uniform, learned = result["models"]
    assert abs(uniform["bpb"] - 8.0) < 1e-5 and uniform["bytes"] == learned["bytes"] == result["bytes"]
    assert len(learned["stages"]) == 1 and learned["stages"][0]["bytes_per_chunk"] >= 1.0
    assert learned["capacity_slack"] == learned["trained_capacity_slack"] == 2.0  # the model's own rule
    assert learned["stages"][0]["dropped_rate"] == learned["stages"][0]["dropped"] / (
        learned["stages"][0]["chunks"] + learned["stages"][0]["dropped"]
    )
    code, out, err = cli(
        [
            "--checkpoint",
            runs["learned"],
            "--window",
            WINDOW,
            "--batch-size",
            2,
            "--capacity-slack",
            "exact",
            "--max-bytes",
            40,
        ],
        capsys,
    )
    assert code == 0, err
    assert "scoring 40 bytes" in out and "bits per byte" in out and "stage 0:" in out and "chunk lengths" in out
    assert "capacity slack exact (overridden: trained with 2.0)" in out and "dropped boundaries 0.00%" in out
    assert "compressors on the same 40 bytes, each of the 1 documents alone (bits per byte): gzip -9 " in out
    assert (
        "compressors on the same 40 bytes, the documents concatenated (bits per byte): gzip -9 " in out
        and "xz -9e" in out
    )


def test_show_boundaries_cli_side_by_side(runs, tmp_path, capsys):
    page = tmp_path / "b.html"
    code, out, err = cli(
        [
            "--checkpoint",
            runs["learned"],
            "--checkpoint",
            runs["heuristic"],
            "--show-boundaries",
            "--text",
            "Hello, wörld! 日本",
            "--html",
            page,
            "--window",
            WINDOW,
            "--batch-size",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    assert "stage 0 (learned)" in out and "stage 0 (space)" in out and "stage 1 (stride:2)" in out
    assert "Hello, |wörld! |日本" in out  # not a tty: plain markers; space routing
    assert f"wrote {page}" in out and "wörld" in page.read_text(encoding="utf-8")


def test_robustness_table(runs, capsys):
    code, out, err = cli(
        [
            "--robustness",
            "--checkpoint",
            runs["uniform"],
            "--checkpoint",
            runs["heuristic"],
            "--kinds",
            "drop,case",
            "--rates",
            "0.1",
            "--max-bytes",
            300,
            "--window",
            WINDOW,
            "--batch-size",
            2,
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["kind"], r["rate"]) for r in rows] == [("clean", 0.0), ("drop", 0.1), ("case", 0.1)]
    assert rows[1]["bytes"] < rows[0]["bytes"] == 300
    for row in rows:  # a uniform model scores 8 bits on any bytes
        assert abs(row["bpb"]["uniform"] - 8.0) < 1e-5 and abs(row["ratio"]["uniform"] - 1.0) < 1e-5
    assert rows[0]["ratio"]["heuristic"] == 1.0 and rows[2]["bpb"]["heuristic"] != rows[0]["bpb"]["heuristic"]
    code, out, err = cli(
        [
            "--robustness",
            "--checkpoint",
            runs["uniform"],
            "--kinds",
            "drop",
            "--rates",
            "0.1",
            "--max-bytes",
            100,
            "--window",
            WINDOW,
            "--batch-size",
            2,
        ],
        capsys,
    )
    assert code == 0 and "| drop | 0.1 |" in out and "uniform bpb" in out


def test_compare_report(runs, tmp_path, capsys):
    code, out, err = cli(["--compare", runs["learned"], runs["heuristic"], "--out", tmp_path / "cmp"], capsys)
    assert code == 0, err
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith(("| heuristic", "| learned"))
    ]
    # run | model | final eval bpb | step | bytes seen | params | training FLOPs/byte; best bpb first.
    assert [row[0] for row in rows] == ["heuristic", "learned"] and [row[2] for row in rows] == ["2.0000", "2.5000"]
    assert all(row[3] == "4" and row[4] == "256" for row in rows)
    assert all(int(row[5].replace(",", "")) > 1000 and float(row[6]) > 0 for row in rows)
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bad_input_is_one_line_error(runs, tmp_path, capsys):
    for args in (
        ["--checkpoint", tmp_path / "absent"],
        ["--checkpoint", runs["learned"], "--data", tmp_path / "absent.txt"],
        ["--checkpoint", runs["learned"], "--stride", 0],
        ["--checkpoint", runs["learned"], "--robustness", "--kinds", "nonsense"],
        ["--compare", tmp_path],
        [],
    ):
        code, out, err = cli(args, capsys)
        assert code == 2 and err.startswith("error:") and "\n" not in err, (args, err)
