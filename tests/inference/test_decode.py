"""Generation: cached decoding equals the parallel forward, sampling, stop rules, UTF-8 streaming,
export, and generate.py's errors.

Decode-vs-forward tolerance: 1e-4 on float32 logits. The step path computes the same float32
quantities as the forward in a different order (a recurrent SSM step instead of the chunked SSD
scan, a softmax over cache slots instead of a masked row), so results differ by rounding only
(about 1e-7 here); a wrong cache, position or boundary gives differences of order 0.1 to 1.
"""

import codecs
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import generate as generate_cli
import hnet
from hnet import chunking
from hnet.inference import decode
from hnet.config import AttnConfig, replace
from hnet.inference.decode import Generator, SamplingConfig, Utf8Stream
from hnet.inference.export import export
from hnet.inference.load import load_model
from conftest import ROOT, jit_forward, shrink, tiny_config, write_run_folder

LENGTH = 120  # > the shrunk sliding windows (7), so ring buffers wrap; > 4 capacity multiples (8)


def decode_config(kind: str) -> hnet.ModelConfig:
    """Small float32 configs at the training default capacity rule (untrained routing drops
    boundaries, which decoding must reproduce)."""
    if kind == "window":  # a flat Transformer whose only attention is a sliding window of 5
        config = tiny_config("transformer_byte_tiny")
        return replace(shrink(config), attn_cfg=AttnConfig(num_heads=(2,), rotary_emb_dim=(8,), window_size=(5,)))
    base = {"1stage": "hnet_1stage_tiny", "2stage": "hnet_2stage_tiny", "heuristic": "hnet_2stage_tiny"}[kind]
    config = shrink(tiny_config(base))
    if kind == "2stage":  # N = 3: untrained routing (about half the positions) drops only below slack 1.5
        config = replace(config, capacity_slack=1.25)
    if kind == "heuristic":  # both heuristic routing modes in one model: words, then every 3 words
        config = replace(config, routing=("space", "stride:3"))
    return config


def text_batch() -> np.ndarray:
    """(3, LENGTH) byte ids: BOS, then different text per row (more documents in rows 1 and 2)."""
    texts = [
        b"The quick brown fox jumps over the lazy dog, again and again. " * 2,
        "Grüße aus Zürich: 東京 and ünïcödé 😀 text! ".encode() * 3,
        b"def f(x):\n    return x * 2  # double it, then more code\n" * 3,
    ]
    ids = np.zeros((3, LENGTH), np.int32)
    for row, text in enumerate(texts):
        ids[row] = np.frombuffer((b"\xfe" + text)[:LENGTH], np.uint8)
    ids[1, 20] = ids[2, 57] = ids[2, 58] = hnet.BOS_ID  # a one-byte document in row 2
    return ids


@pytest.mark.parametrize("kind", ["1stage", "2stage", "heuristic", "window"])
def test_prefill_then_steps_equal_forward(kind):
    """Prompts of different lengths (longer than four capacity multiples), decoded past the
    prompt's chunk capacity, with caches sized for the row (LENGTH) and for more (2 * LENGTH)."""
    config = decode_config(kind)
    model = hnet.build_model(config, seed=1)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(text_batch())
    full = jit_forward(model)(ids)
    reference = np.asarray(full.logits)
    if config.depth and kind != "heuristic":
        assert float(full.stages[0].dropped) > 0  # the capacity rule is exercised
    prompt_lengths = np.asarray([40, 70, 9], np.int32)
    prompt_width = 72

    # Caches sized for the row and for more; once suffices for the heuristic and window kinds.
    for max_length in (LENGTH, 2 * LENGTH) if kind in ("1stage", "2stage") else (2 * LENGTH,):

        @jax.jit
        def prefill(params, ids, lengths):
            out, cache = nnx.merge(graphdef, params).prefill(ids, lengths, max_length)
            return out.logits, cache

        @jax.jit
        def step(params, ids, cache):
            return nnx.merge(graphdef, params).step(ids, cache)

        logits, cache = prefill(params, ids[:, :prompt_width], jnp.asarray(prompt_lengths))
        for row, k in enumerate(prompt_lengths):
            np.testing.assert_allclose(np.asarray(logits)[row, :k], reference[row, :k], atol=1e-4)
        position = prompt_lengths.copy()
        step_chunks = []
        while position.max() < LENGTH:
            current = np.asarray(ids)[np.arange(3), np.minimum(position, LENGTH - 1)]
            logits, cache, chunks = step(params, jnp.asarray(current), cache)
            for row in range(3):
                if position[row] < LENGTH:
                    np.testing.assert_allclose(
                        np.asarray(logits)[row],
                        reference[row, position[row]],
                        atol=1e-4,
                        err_msg=f"row {row} position {position[row]} max_length {max_length}",
                    )
                    for s, stage_chunks in enumerate(chunks[:1]):
                        assert bool(stage_chunks[row]) == bool(
                            np.asarray(full.stages[s].chunk_mask)[row, position[row]]
                        )
            step_chunks.append(np.asarray(chunks[0]) if chunks else None)
            position += 1
        if kind != "window":
            marks = np.stack(step_chunks)  # (steps, 3)
            assert marks.any() and not marks.all()  # chunks of several bytes
            assert not all((marks[:, 0] == marks[:, r]).all() for r in (1, 2))  # rows differ
        if kind in ("1stage", "2stage"):
            # Past the prompt's own chunk capacity: decoding kept feeding the inner stage.
            assert np.asarray(full.stages[0].chunk_mask)[2].sum() > chunking.CapacityRule.for_stage(
                config, 0
            ).row_capacity(prompt_width)


@pytest.fixture(scope="module")
def small_model():
    return hnet.build_model(decode_config("2stage"), seed=2)


def greedy_by_forward(model, prompt: bytes, new_bytes: int) -> bytes:
    """Reference: recompute the full forward for every new byte and take the argmax."""
    forward = jit_forward(model)
    sequence = [hnet.BOS_ID] + list(prompt)
    for _ in range(new_bytes):
        padded = np.zeros((1, 64), np.int32)
        padded[0, : len(sequence)] = sequence
        sequence.append(int(np.argmax(np.asarray(forward(jnp.asarray(padded)).logits)[0, len(sequence) - 1])))
    return bytes(sequence[len(prompt) + 1 :])


def test_greedy_generation_equals_forward_argmax(small_model):
    prompts = [b"Hello", "naïve café: ".encode()]
    result = Generator(small_model, chunk_steps=8).generate(
        prompts, max_new_bytes=12, sampling=SamplingConfig(temperature=0)
    )
    for prompt, output, marks in zip(prompts, result.outputs, result.boundaries):
        assert output == greedy_by_forward(small_model, prompt, 12)
        assert marks.shape == (12, 2)


def test_stop_string_eos_and_sampling_options(small_model):
    generator = Generator(small_model, chunk_steps=8)
    greedy = SamplingConfig(temperature=0)
    reference = generator.generate([b"Hello"], max_new_bytes=12, sampling=greedy).outputs[0]
    # A stop string ends the row right after it; EOS ends it before (and is not emitted).
    stopped = generator.generate([b"Hello"], max_new_bytes=12, sampling=greedy, stop=[reference[3:5]]).outputs[0]
    assert stopped == reference[: reference.index(reference[3:5]) + 2]
    ended = generator.generate([b"Hello"], max_new_bytes=12, sampling=greedy, eos_id=reference[2]).outputs[0]
    assert ended == reference[: reference.index(reference[2])]
    # Sampling is seeded (the seed does not recompile the loop).
    one = generator.generate([b"Hello"], max_new_bytes=12, sampling=SamplingConfig(temperature=1.0, seed=7)).outputs[0]
    again = generator.generate([b"Hello"], max_new_bytes=12, sampling=SamplingConfig(temperature=1.0, seed=7)).outputs[
        0
    ]
    other = generator.generate([b"Hello"], max_new_bytes=12, sampling=SamplingConfig(temperature=1.0, seed=8)).outputs[
        0
    ]
    assert one == again and one != other


def test_sample_respects_top_k_and_top_p():
    logits = jax.random.normal(jax.random.key(0), (4, 256))
    greedy = np.asarray(jnp.argmax(logits, axis=-1))
    for sampling in (SamplingConfig(temperature=1.5, top_k=1), SamplingConfig(temperature=1.5, top_p=1e-6)):
        np.testing.assert_array_equal(np.asarray(decode.sample(logits, jax.random.key(3), sampling)), greedy)
    logits = jax.random.normal(jax.random.key(0), (4, 256)) * 2.0
    keys = jax.random.split(jax.random.key(1), 200)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    draws = np.stack([np.asarray(decode.sample(logits, k, SamplingConfig(top_k=3))) for k in keys[:50]])
    assert all(set(draws[:, row]) <= set(top3[row]) for row in range(4))
    # top-p: only the smallest set of most likely bytes whose probability reaches p is kept.
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    order = np.argsort(-probs, axis=-1)
    draws = np.stack([np.asarray(decode.sample(logits, k, SamplingConfig(top_p=0.5))) for k in keys[50:]])
    for row in range(4):
        cumulative = np.cumsum(probs[row, order[row]])
        nucleus = set(order[row, : int(np.searchsorted(cumulative, 0.5)) + 1])
        assert set(draws[:, row]) <= nucleus and len(set(draws[:, row])) > 1


def test_row_limit_ends_right_after_a_stop_string_or_at_max_bytes():
    from hnet.inference.decode import RowLimit

    def feed(limit, pieces):
        return b"".join(piece[: limit.keep(piece)] for piece in pieces)

    # A stop string split across updates, and one inside a multi-byte piece (a BPE token).
    assert feed(RowLimit([b"\n\n"], 100), [b"ab\n", b"\ncd", b"ef"]) == b"ab\n\n"
    limit = RowLimit([b"END", b"x"], 100)
    assert feed(limit, [b"abcEN", b"Dxyz"]) == b"abcEND" and limit.done
    assert feed(RowLimit([b"cd", b"bc"], 100), [b"abcd"]) == b"abc"  # the stop that ends first wins
    assert feed(RowLimit([b"aa"], 100), [b"a", b"a"]) == b"aa"  # from the tail kept between updates
    limit = RowLimit([], 5)
    assert feed(limit, [b"abc", b"defg", b"h"]) == b"abcde" and limit.done  # max bytes
    limit = RowLimit([b"zz"], 100)
    assert feed(limit, [b"abz", b"yz"]) == b"abzyz" and not limit.done


def test_utf8_stream_holds_back_split_characters():
    text = "aé東😀b".encode()
    for split in range(1, 5):  # every feed size splits some multi-byte character
        stream = Utf8Stream()
        pieces = [stream.feed(text[i : i + split]) for i in range(0, len(text), split)]
        assert "".join(pieces) + stream.flush() == "aé東😀b"
        assert all(piece == codecs.decode(piece.encode(), "utf-8") for piece in pieces)
    stream = Utf8Stream()
    assert stream.feed(b"ok\xff\xfe") == "ok\ufffd\ufffd"  # invalid bytes: replacement, no error
    assert stream.feed(b"\xe6\x9d") == ""  # held back
    assert stream.flush() == "\ufffd"  # an unfinished character at the end


def test_export_generates_like_the_checkpoint(tmp_path, small_model, capsys):
    run_dir = write_run_folder(tmp_path / "run", small_model, step=3)
    assert (
        generate_cli.main(
            [
                "--checkpoint",
                str(run_dir),
                "--prompt",
                "Hi",
                "--max-bytes",
                "6",
                "--temperature",
                "0",
                "--show-boundaries",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Hi")
    assert generate_cli.main(["--checkpoint", str(run_dir), "--prompt", ""]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert generate_cli.main(["--checkpoint", str(run_dir), "--prompt", "abc", "--max-length", "3"]) == 2
    assert "does not fit" in capsys.readouterr().err
    export(run_dir, tmp_path / "export")
    export(run_dir, tmp_path / "export_bf16", dtype="bf16")
    with pytest.raises(Exception, match="already exists"):
        export(run_dir, tmp_path / "export")
    greedy = dict(max_new_bytes=10, sampling=SamplingConfig(temperature=0))
    from_run = load_model(run_dir)
    from_export = load_model(tmp_path / "export")
    assert from_run.step == from_export.step == 3 and from_export.kind == "export"
    prompts = [b"Hello", b"x = "]
    assert (
        Generator(from_export.model).generate(prompts, **greedy).outputs
        == Generator(from_run.model).generate(prompts, **greedy).outputs
    )
    bf16 = nnx.state(load_model(tmp_path / "export_bf16").model, nnx.Param)
    original = nnx.state(small_model, nnx.Param)
    for a, b in zip(jax.tree_util.tree_leaves(bf16), jax.tree_util.tree_leaves(original)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16).astype(jnp.float32)))


def test_generate_cli_bad_input(tmp_path, capsys):
    assert generate_cli.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text('{"model": {}}')
    assert generate_cli.main(["--checkpoint", str(tmp_path / "empty_run"), "--prompt", "x"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def docs_block(path: str, title: str) -> str:
    """The first ```python block after the heading `title` (any level) of the markdown file `path`."""
    text = (ROOT / path).read_text()
    section = text[re.search(rf"\n#+ {re.escape(title)}\n", text).start() :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_python_generation_example_runs(tmp_path, monkeypatch, capsys):
    # The example of docs/generation.md, on a tiny byte Transformer saved where it looks (runs/x).
    model = hnet.build_model(shrink(tiny_config("transformer_byte_tiny")), seed=0)
    write_run_folder(tmp_path / "runs" / "x", model)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(docs_block("docs/generation.md", "Python generation"), "docs/generation.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.startswith("def main(") and len(printed) > len("def main(")
    texts = namespace["texts"]
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # The example's greedy batch: the Generator's greedy bytes, cut right after the first stop
    # string, as text; the one-call form takes a folder's path as well.
    outputs = (
        Generator(load_model("runs/x"))
        .generate([b"import ", b"class "], max_new_bytes=100, sampling=SamplingConfig(temperature=0))
        .outputs
    )
    cut = [output.find(b"\n\n") for output in outputs]
    expected = [(o if c < 0 else o[: c + 2]).decode("utf-8", errors="replace") for o, c in zip(outputs, cut)]
    assert (
        texts
        == expected
        == hnet.generate("runs/x", ["import ", "class "], max_new_bytes=100, temperature=0, stop="\n\n")
    )
