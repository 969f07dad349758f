"""Pieces of the model timed alone at a run's shapes (`python -m hnet.perf.bench components`).

For each stage s of the model, at the length the stage computes (its static length,
hnet.chunking.stage_lengths(config, seq_len)[s]) and the run's micro-batch b:

- ssd_scan: hnet.layers.kernels.ssd.ssd_scan on x (b, L_s, H, P) in the config's dtype, dt (b, L_s, H)
  float32, A (H,), B and C (b, L_s, S), one document per row;
- attention: one CausalSelfAttention layer (qkv projection, RoPE, masked attention, output
  projection) on (b, L_s, D_s), one document per row;
- chunking (chunking stages only): the capacity rule's layout from boundary probabilities with
  about one boundary per N_s positions, the gather into chunk slots, the EMA dechunk back to
  (b, L_s, D_s) and the straight-through confidence.

Each piece is timed forward and forward + backward (jax.grad of the sum of its output with
respect to its float inputs), as the median of `steps` calls after one compile-and-run call, each
waited for with jax.block_until_ready. `layers` says how many of the piece the model runs at that
stage per step, so `layers x forward + backward` estimates its share of a training step.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def _timed(fn, args, steps: int) -> tuple[float, float]:
    """-> (compile + first call seconds, median seconds of `steps` calls) of jitted fn(*args)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _forward_and_backward(piece, args):
    """jit(piece) and jit(grad of sum(piece) w.r.t. every argument), for float arguments."""
    import jax
    import jax.numpy as jnp

    def loss(*args):
        return jnp.sum(piece(*args).astype(jnp.float32))

    return jax.jit(piece), jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))


def _ssd_piece(config, stage: int, batch: int, length: int, rng):
    import jax.numpy as jnp

    from hnet.layers.kernels.ssd import ssd_scan

    ssm, dtype = config.ssm_cfg, jnp.dtype(config.dtype)
    d_inner = ssm.expand * config.d_model[stage]
    heads = d_inner // ssm.head_dim
    x = jnp.asarray(rng.standard_normal((batch, length, heads, ssm.head_dim)), dtype)
    dt = jnp.asarray(rng.uniform(1e-3, 0.1, (batch, length, heads)), jnp.float32)
    A = -jnp.asarray(rng.uniform(1.0, 16.0, (heads,)), jnp.float32)
    B, C = (jnp.asarray(rng.standard_normal((batch, length, ssm.d_state)), dtype) for _ in range(2))

    def piece(x, dt, B, C):
        return ssd_scan(x, dt, A, B, C, ssm.chunk_size)[0]

    return piece, (x, dt, B, C), f"x ({batch}, {length}, {heads}, {ssm.head_dim}), state {ssm.d_state}"


def _attention_piece(config, stage: int, batch: int, length: int, rng):
    import jax.numpy as jnp
    from flax import nnx

    from hnet.layers.attention import CausalSelfAttention
    from hnet.segments import Segments

    attn, d_model = config.attn_cfg, config.d_model[stage]
    layer = CausalSelfAttention(
        d_model,
        attn.num_heads[stage],
        config.num_kv_heads(stage),
        attn.rotary_emb_dim[stage],
        attn.window_size[stage],
        dtype=jnp.dtype(config.dtype),
        out_scale=1.0,
        rngs=nnx.Rngs(params=0),
    )
    segments = Segments.from_starts(jnp.zeros((batch, length), bool))
    x = jnp.asarray(rng.standard_normal((batch, length, d_model)), jnp.dtype(config.dtype))

    def piece(x):
        return layer.forward(x, segments)[0]

    return (
        piece,
        (x,),
        f"x ({batch}, {length}, {d_model}), {attn.num_heads[stage]} heads, window {attn.window_size[stage]}",
    )


def _chunking_piece(config, stage: int, batch: int, length: int, rng):
    import jax.numpy as jnp

    from hnet import chunking
    from hnet.segments import Segments

    rule = chunking.CapacityRule.for_stage(config, stage)
    capacity = rule.row_capacity(length)
    d_model = config.d_model[stage]
    segments = Segments.from_starts(jnp.zeros((batch, length), bool))
    hidden = jnp.asarray(rng.standard_normal((batch, length, d_model)), jnp.float32)
    # About one boundary (p > 0.5) per N positions, as a trained router.
    selected = rng.random((batch, length)) < 1.0 / config.ratio(stage)
    prob = jnp.asarray(
        np.where(selected, rng.uniform(0.5, 1.0, (batch, length)), rng.uniform(0.0, 0.5, (batch, length))), jnp.float32
    )

    def piece(hidden, prob):
        layout = chunking.chunk_layout(chunking.is_boundary(prob), segments, rule, capacity)
        chunks = chunking.gather_chunks(hidden, layout)
        inner_start = chunking.gather_chunks(segments.start, layout) & layout.chunk_valid
        smoothed = chunking.dechunk(chunks, chunking.gather_chunks(prob, layout), inner_start, layout)
        return smoothed * chunking.straight_through(chunking.confidence(prob, layout.chunk_mask))[..., None]

    return piece, (hidden, prob), f"h ({batch}, {length}, {d_model}) -> {capacity} chunk slots"


PIECES = {"ssd_scan": _ssd_piece, "attention": _attention_piece, "chunking": _chunking_piece}


def stage_piece_counts(config, stage: int) -> dict[str, int]:
    """How many of each piece the model runs at `stage` in one forward pass."""
    from hnet.config import parse_layout

    counts = dict.fromkeys(PIECES, 0)
    for layout in config.stage_layout(stage):
        for letter, count in parse_layout(layout):
            counts["ssd_scan" if letter in "mM" else "attention"] += count
    counts["chunking"] = 1 if stage < config.depth else 0
    return counts


def time_components(run, steps: int) -> list[dict]:
    """Time every piece of every stage of a RunConfig's model -> rows in data-flow order."""
    from hnet import chunking

    config, train = run.model_config, run.train
    batch = train.batch_size // train.grad_accum
    rng = np.random.default_rng(0)
    rows = []
    for stage, length in enumerate(chunking.stage_lengths(config, train.seq_len)):
        for name, count in stage_piece_counts(config, stage).items():
            if not count:
                continue
            piece, args, shapes = PIECES[name](config, stage, batch, length, rng)
            forward, backward = _forward_and_backward(piece, args)
            forward_first, forward_s = _timed(forward, args, steps)
            backward_first, backward_s = _timed(backward, args, steps)
            rows.append(
                {
                    "stage": stage,
                    "piece": name,
                    "layers": count,
                    "shapes": shapes,
                    "forward_s": forward_s,
                    "forward_backward_s": backward_s,
                    "compile_s": forward_first + backward_first,
                }
            )
    return rows


def format_components_table(result: dict) -> str:
    header = (
        f"device: {result['device']}\n{result['model_config']} ({result['dtype']}), micro-batch "
        f"{result['micro_batch']}, seq_len {result['seq_len']}, median of {result['timed_calls']} calls\n"
    )
    lines = [f"{'stage':>5}  {'piece':<10}{'layers':>7}{'fwd ms':>10}{'fwd+bwd ms':>12}{'x layers ms':>13}  shapes"]
    for row in result["rows"]:
        lines.append(
            f"{row['stage']:>5}  {row['piece']:<10}{row['layers']:>7}{row['forward_s'] * 1e3:>10.2f}"
            f"{row['forward_backward_s'] * 1e3:>12.2f}{row['layers'] * row['forward_backward_s'] * 1e3:>13.1f}"
            f"  {row['shapes']}"
        )
    return header + "\n".join(lines)
