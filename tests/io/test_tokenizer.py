"""The BPE baseline: exact byte-level tokenizer, token corpora, and token runs through the training
loop with honest byte accounting (bits per byte over the bytes the tokens cover)."""

import json
import math

import jax
import numpy as np
import pytest

import train as train_cli
from data.shards import CorpusWriter
from hnet.io import tokenizer as tokenizer_lib
from hnet.io.data import PreparedCorpus, eval_batches, make_dataset
from hnet.errors import ConfigError, DataError
from hnet.model import build_model, cross_entropy
from hnet.training.run_config import run_config_from_dict
from hnet.io.tokenizer import BPETokenizer, load_run_tokenizer, tokenize_corpus, train_tokenizer
from hnet.training.train_loop import train

VOCAB = 300

SAMPLES = [
    "Crème brûlée, façade, naïve señor; Ærøskøbing and Łódź.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🎉👍🏽 👩‍👩‍👧 ✨ and flags 🇫🇷🇯🇵.",
    "def f(x):\n    return x * 2  # tabs\tand\r\nCRLF lines\n\n\n",
    "The special token's text <|bos|> is just text here.",
]

INVALID = [
    b"\xff\xfe lone bytes",  # never valid in UTF-8
    b"cut \xe6\x97 short",  # truncated 3-byte sequence
    b"\x80 continuation first",  # stray continuation byte
    b"surrogate \xed\xa0\x80 end",  # UTF-8-encoded surrogate (invalid)
    b"caf\xc3",  # truncated at the very end
]


def documents(n: int) -> list[bytes]:
    """Varied text with repeats (so BPE finds merges) and multi-byte characters."""
    words = ["alpha", "beta", "gamma", "über", "naïve", "日本", "🎉", "def", "return", "    "]
    docs = []
    for i in range(n):
        body = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 13))
        docs.append(f"document {i}: {body}\n{SAMPLES[i % len(SAMPLES)]}\n".encode())
    return docs


def write_corpus(path, num_train=60, num_validation=8):
    with CorpusWriter(path, source="test", splits=("train", "validation")) as writer:
        for doc in documents(num_train):
            writer.add("train", doc)
        for doc in documents(num_train + num_validation)[num_train:]:
            writer.add("validation", doc)
    return PreparedCorpus(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("tok") / "corpus")


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, "train", VOCAB)


def test_round_trip_is_exact(tokenizer, monkeypatch):
    assert tokenizer.vocab_size == VOCAB and tokenizer.bos_id == 0
    texts = [s.encode() for s in SAMPLES] + INVALID + [b"", "".join(SAMPLES).encode() * 3]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert tokenizer.decode(ids) == text
        assert b"".join(tokenizer.token_bytes(ids)) == text
        assert tokenizer.byte_lengths[ids].sum() == len(text)
        assert tokenizer.bos_id not in ids.tolist()  # "<|bos|>" in text stays text
    # Merges learned from the corpus are used: fewer tokens than bytes.
    assert len(tokenizer.encode(b"alpha beta gamma")) < len(b"alpha beta gamma")
    assert tokenizer.encode("naïve").tolist() == tokenizer.encode("naïve".encode()).tolist()
    # Long documents are cut into pieces (here of 7 characters); still exact.
    monkeypatch.setattr(tokenizer_lib, "MAX_PIECE_CHARS", 7)
    long_text = b"".join(texts)
    ids = np.concatenate(list(tokenizer.encode_documents([long_text, INVALID[0]])))
    assert tokenizer.decode(ids) == long_text + INVALID[0]


def test_save_load_and_training_are_deterministic(tokenizer, corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.sha256 == tokenizer.sha256 == train_tokenizer(corpus, "train", VOCAB).sha256
    text = "".join(SAMPLES).encode() + INVALID[0]
    np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))
    np.testing.assert_array_equal(loaded.byte_lengths, tokenizer.byte_lengths)
    assert load_run_tokenizer(tmp_path) is not None and load_run_tokenizer(tmp_path / "absent") is None


def test_tokenizer_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="too little text"):
        train_tokenizer(corpus, "train", 100_000)
    with pytest.raises(DataError, match=">= 257"):
        train_tokenizer(corpus, "train", 200)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        BPETokenizer.load(bad)
    with pytest.raises(DataError, match="does not exist"):
        BPETokenizer.load(tmp_path / "absent.json")


def test_tokenizer_command_trains_measures_and_never_overwrites(corpus, tokenizer, tmp_path, capsys):
    out = tmp_path / "tok.json"
    args = ["--corpus", str(corpus.path), "--vocab-size", str(VOCAB), "--out", str(out)]
    assert tokenizer_lib.main(args) == 0
    printed = capsys.readouterr().out
    assert BPETokenizer.load(out).sha256 == tokenizer.sha256  # the recipe train.py uses
    num_bytes = sum(len(d) for d in documents(60))
    num_tokens = sum(len(tokenizer.encode(d)) for d in documents(60))
    assert (
        f"train: {num_bytes:,d} bytes / {num_tokens:,d} tokens = {num_bytes / num_tokens:.3f} bytes per token"
        in printed
    )
    assert (
        tokenizer_lib.main(["--corpus", str(corpus.path), "--load", str(out), "--measure", "validation", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    valid = report["splits"]["validation"]
    assert set(report["splits"]) == {"validation"} and valid["bytes"] == sum(len(d) for d in documents(68)[60:])
    assert valid["bytes_per_token"] == valid["bytes"] / valid["tokens"] > 1
    before = out.read_bytes()
    assert tokenizer_lib.main(args) == 2  # an existing file is kept
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def test_token_corpus_holds_the_documents(tokenizer, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HNET_DATA_DIR", str(tmp_path))
    tokens = tokenize_corpus(corpus, tokenizer, verbose=False)
    assert tokens.is_tokens and tokens.dtype == np.uint16 and tokens.bos_id == tokenizer.bos_id
    assert tokenize_corpus(corpus, tokenizer, verbose=False).path == tokens.path  # cached
    for split in ("train", "validation"):
        originals = [bytes(d) for d in corpus.documents(split)]
        decoded = [tokenizer.decode(ids) for ids in tokens.documents(split)]
        assert decoded == originals
        assert tokens.split_info(split).num_bytes == sum(map(len, originals))
        assert len(tokens.split_info(split).shard_sha256) == len(tokens.split_info(split).shards)
        tokens.verify_checksum(split)  # per shard and per split, as recorded while writing
    # Packing puts BOS before each document, as for bytes.
    batch = next(eval_batches(tokens, "train", 16, 1))
    assert batch["input_ids"][0, 0] == tokenizer.bos_id


def token_run(corpus_path, vocab=VOCAB, **train_overrides) -> dict:
    model = {
        "arch_layout": ["T1"],
        "d_model": [32],
        "d_intermediate": [64],
        "vocab_size": vocab,
        "attn_cfg": {"num_heads": [2], "rotary_emb_dim": [8], "window_size": [-1]},
        "dtype": "float32",
    }
    train = {
        "steps": 4,
        "batch_size": 4,
        "seq_len": 16,
        "lr": 3e-3,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "checkpoint_every": 2,
        **train_overrides,
    }
    return {"model": model, "data": {"corpus": str(corpus_path), "tokenizer": {"vocab_size": VOCAB}}, "train": train}


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_token_run_trains_resumes_and_counts_bytes(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HNET_DATA_DIR", str(tmp_path / "cache"))
    run = run_config_from_dict(token_run(corpus.path, eval_batches=100))  # the whole validation split
    straight = train(run, tmp_path / "straight", progress=False, verbose=False)
    train(run, tmp_path / "resumed", progress=False, verbose=False, max_steps=2)
    saved = (tmp_path / "resumed" / "tokenizer.json").read_bytes()
    train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False)
    assert (tmp_path / "resumed" / "tokenizer.json").read_bytes() == saved  # reused, not retrained
    straight_rows, resumed_rows = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r.get("loss") for r in straight_rows] == [r.get("loss") for r in resumed_rows]

    # Step 1's bpb and bytes, recomputed directly: summed token NLL of the first batch under the
    # initial parameters / (ln 2 x the bytes its target tokens decode to, BOS counting one byte).
    tokenizer = load_run_tokenizer(tmp_path / "straight")
    tokens = tokenize_corpus(corpus, tokenizer, verbose=False)
    batch = next(make_dataset(tokens, "train", 16, 4, seed=run.train.seed))
    model = build_model(run.model_config, seed=run.train.seed)
    nll = float(jax.numpy.sum(cross_entropy(model(batch["input_ids"]).logits, batch["targets"])))

    def covered(targets):
        return sum(1 if t == tokenizer.bos_id else len(tokenizer.decode([t])) for t in targets.ravel())

    first = straight_rows[0]
    assert first["step"] == 1 and first["bytes_seen"] == covered(batch["targets"])
    assert first["bpb"] == pytest.approx(nll / (math.log(2) * covered(batch["targets"])), rel=1e-5)
    assert first["bytes_seen"] > 4 * 16  # tokens cover several bytes each

    # Speed: tokens/s counts the targets, bytes/s the text bytes they cover (one step per window here).
    previous_bytes = 0
    for row in (r for r in straight_rows if "loss" in r):
        assert row["bytes_per_sec"] / row["tokens_per_sec"] == pytest.approx(
            (row["bytes_seen"] - previous_bytes) / (4 * 16)
        )
        previous_bytes = row["bytes_seen"]

    evals = [r for r in straight_rows if "eval_bpb" in r]
    assert len(evals) == 1 and straight["eval"]["bpb"] == evals[0]["eval_bpb"]
    eval_batch_list = list(eval_batches(tokens, "validation", 16, 4))
    eval_targets = np.concatenate([b["targets"][b["mask"] > 0] for b in eval_batch_list])
    assert tokenizer.bos_id in eval_targets  # the BOS convention is exercised
    assert evals[0]["eval_bytes"] == covered(eval_targets) and evals[0]["eval_tokens"] == eval_targets.size
    assert evals[0]["bytes_seen"] == straight_rows[3]["bytes_seen"] == straight["bytes_seen"]


def test_vocab_mismatch_is_a_clear_error(corpus, tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HNET_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="differs from the model's vocab_size 512"):
        run_config_from_dict(token_run(corpus.path, vocab=512))
    bytes_run = token_run(corpus.path, vocab=512)
    bytes_run["data"]["tokenizer"] = None
    with pytest.raises(ConfigError, match="data.tokenizer is null"):
        run_config_from_dict(bytes_run)
    # A tokenizer file whose size differs from the model's: one line, exit 2, nothing trained.
    tokenizer.save(tmp_path / "tok.json")
    run = token_run(corpus.path, vocab=512)
    run["data"]["tokenizer"] = "tok.json"  # found next to the run config
    (tmp_path / "run.json").write_text(json.dumps(run))
    code = train_cli.main(["--config", str(tmp_path / "run.json"), "--workdir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err
    assert f"{VOCAB} ids" in err and "vocab_size is 512" in err
    assert not (tmp_path / "r" / "checkpoints").exists()
    # A token corpus is not a training corpus by itself: data.corpus takes the byte corpus.
    bytes_run["model"]["vocab_size"] = 256
    bytes_run["data"]["corpus"] = str(tokenize_corpus(corpus, tokenizer, verbose=False).path)
    (tmp_path / "bytes.json").write_text(json.dumps(bytes_run))
    code = train_cli.main(
        ["--config", str(tmp_path / "bytes.json"), "--workdir", str(tmp_path / "r2"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds tokens" in err and "\n" not in err


# --------------------------------------------------------------------------
# Generation from a token model


@pytest.fixture(scope="module")
def token_model(tokenizer):
    from conftest import shrink, tiny_config

    return build_model(shrink(tiny_config("transformer_bpe_tiny", vocab_size=tokenizer.vocab_size)), seed=1)


def greedy_tokens_by_forward(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Reference: recompute the full forward for every new token and take the argmax; a row
    ends when it picks BOS (the start of the next document)."""
    from conftest import jit_forward

    forward = jit_forward(model)
    sequence = list(prompt_ids)
    for _ in range(new_tokens):
        padded = np.zeros((1, 64), np.int32)
        padded[0, : len(sequence)] = sequence
        token = int(np.argmax(np.asarray(forward(jax.numpy.asarray(padded)).logits)[0, len(sequence) - 1]))
        if token == model.config.bos_id:
            break
        sequence.append(token)
    return sequence[len(prompt_ids) :]


def test_token_generation_equals_forward_argmax_and_stops_on_bytes(token_model, tokenizer):
    from hnet.inference.decode import Generator, SamplingConfig
    from hnet.errors import GenerationError

    generator = Generator(token_model, tokenizer=tokenizer, chunk_steps=8)
    prompts = [b"alpha beta", "naïve 日本".encode()]
    greedy = SamplingConfig(temperature=0)
    result = generator.generate(prompts, max_new_bytes=16, sampling=greedy)
    for prompt, output, marks in zip(prompts, result.outputs, result.boundaries):
        assert generator.encode(prompt) == [tokenizer.bos_id] + tokenizer.encode(prompt).tolist()
        tokens = greedy_tokens_by_forward(token_model, generator.encode(prompt), 16)
        assert output == tokenizer.decode(tokens)[:16]  # max_new_bytes counts bytes
        assert len(output) == 16 or len(tokens) < 16
        token_starts = np.cumsum([0] + [len(b) for b in tokenizer.token_bytes(tokens)])[:-1]
        assert marks.shape == (len(output), 1)
        np.testing.assert_array_equal(np.flatnonzero(marks[:, 0]), token_starts[token_starts < len(output)])

    # A stop string is matched on the decoded bytes, here ending inside a multi-byte token.
    reference = result.outputs[0]
    tokens = greedy_tokens_by_forward(token_model, generator.encode(prompts[0]), 16)
    offsets = np.cumsum([0] + [len(b) for b in tokenizer.token_bytes(tokens)])
    inside = next(int(start) + 1 for start, end in zip(offsets, offsets[1:]) if end - start >= 2 and end <= 16)
    stopped = generator.generate(prompts[:1], max_new_bytes=16, sampling=greedy, stop=[reference[:inside]]).outputs[0]
    assert stopped == reference[:inside]

    with pytest.raises(GenerationError, match="give its tokenizer"):
        Generator(token_model)


def test_token_run_folder_generates_from_the_command_line(token_model, tokenizer, tmp_path, capsys):
    import generate as generate_cli
    import hnet
    from conftest import write_run_folder

    run_dir = write_run_folder(tmp_path / "run", token_model, tokenizer=tokenizer)
    expected = tokenizer.decode(
        greedy_tokens_by_forward(token_model, [tokenizer.bos_id] + tokenizer.encode(b"alpha").tolist(), 16)
    )[:16]
    assert (
        generate_cli.main(
            ["--checkpoint", str(run_dir), "--prompt", "alpha", "--max-bytes", "16", "--temperature", "0"]
        )
        == 0
    )
    assert capsys.readouterr().out == "alpha" + expected.decode("utf-8", errors="replace") + "\n"
    assert hnet.generate(str(run_dir), "alpha", max_new_bytes=16, temperature=0) == expected.decode(
        "utf-8", errors="replace"
    )
    (run_dir / "tokenizer.json").unlink()
    assert generate_cli.main(["--checkpoint", str(run_dir), "--prompt", "alpha"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no tokenizer.json" in err and "\n" not in err
