"""Parity with the reference implementation (goombalab/hnet at 3673fe1), forward and backward.

tests/fixtures/reference/ holds two tiny H-Nets (1- and 2-stage) written by the reference PyTorch
code with its outputs: logits, boundary probabilities and boundaries of every stage, the training
loss and every parameter's gradient (its README says exactly how they were made). Each model is
converted with hnet.inference.convert (float32 parameters and compute) and must reproduce all of them.

Tolerances (what we measured on CPU, jax 0.10.2, in brackets; a real error is orders larger):
- logits: max |difference| <= 5e-6 (5e-7, 7e-7);
- boundary probabilities: max |difference| <= 1e-6 (1.2e-7); every boundary equal (the fixtures' closest
  probability to 0.5 is 4e-3 away, so a boundary flip means a wrong model, not rounding);
- loss, cross-entropy and the ratio losses: within 1e-6 relative (at most 8.5e-8);
- every gradient: max |difference| <= 1e-3 of the largest |value| of that tensor (at most 1.8e-4,
  the Mamba2 D of a few layers; under 4e-5 for every other tensor), and the gradient norm within
  1e-4 relative.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from hnet.inference import convert
from hnet.inference.export import flat_param_paths
from hnet.inference.load import load_model
from hnet.inference.reference import parameter_table, to_reference
from hnet.training.train_step import loss_and_metrics

FIXTURES = Path(__file__).parents[1] / "fixtures" / "reference"
MODELS = ["ci_1stage", "ci_2stage"]

LOGIT_ATOL = 5e-6
PROB_ATOL = 1e-6
LOSS_RTOL = 1e-6
GRAD_RELATIVE_TO_MAX = 1e-3
RATIO_LOSS_WEIGHT = 0.03  # the fixtures' alpha (grad_meta.json)


@pytest.fixture(scope="module", params=MODELS)
def converted(request, tmp_path_factory):
    """(name, fixture folder, loaded model) of a reference model converted with float32 compute."""
    name = request.param
    folder = FIXTURES / name
    work = tmp_path_factory.mktemp(name)
    config = json.loads((folder / "config.json").read_text())
    (work / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    out = convert.convert(folder / "model.safetensors", work / "config.json", work / "export", dtype="float32")
    return name, folder, load_model(out)


def test_forward_matches_the_reference_logits_and_boundaries(converted):
    _, folder, loaded = converted
    input_ids = jnp.asarray(np.load(folder / "input_ids.npy"), jnp.int32)
    graphdef, state = nnx.split(loaded.model)
    out = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, input_ids)
    reference_logits = np.load(folder / "logits.npy")
    assert out.logits.shape == reference_logits.shape
    assert np.max(np.abs(np.asarray(out.logits) - reference_logits)) <= LOGIT_ATOL  # False for NaN
    assert len(out.stages) == loaded.config.depth
    for s, stage in enumerate(out.stages):
        reference_prob = np.load(folder / f"boundary_prob_stage{s}.npy")
        reference_mask = np.load(folder / f"boundaries_stage{s}.npy")
        length = reference_mask.shape[1]  # stage s's own input: the chunks of stage s - 1
        # Our inner stages run on chunk slots; the real positions come first, padding after.
        prob, mask = np.asarray(stage.boundary_prob)[:, :length], np.asarray(stage.boundary_mask)[:, :length]
        assert not np.asarray(stage.boundary_mask)[:, length:].any()
        np.testing.assert_array_equal(mask, reference_mask)
        np.testing.assert_array_equal(np.asarray(stage.chunk_mask)[:, :length], reference_mask)  # nothing dropped
        assert np.max(np.abs(prob - reference_prob)) <= PROB_ATOL


def test_training_loss_and_every_gradient_match_the_reference(converted):
    name, folder, loaded = converted
    meta = json.loads((folder / "grad_meta.json").read_text())
    assert meta["alpha"] == RATIO_LOSS_WEIGHT
    ids = jnp.asarray(np.load(folder / "input_ids.npy"), jnp.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    graphdef, params = nnx.split(loaded.model, nnx.Param)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return loss_and_metrics(model, inputs, targets, jnp.ones(targets.shape, jnp.float32), RATIO_LOSS_WEIGHT)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert float(loss) == pytest.approx(meta["loss"], rel=LOSS_RTOL)
    assert float(metrics["ce"]) == pytest.approx(meta["ce"], rel=LOSS_RTOL)
    assert float(metrics["ratio_loss"]) == pytest.approx(sum(meta["ratio_losses"]), rel=LOSS_RTOL)

    reference_grads = load_file(folder / "grad.safetensors")
    ours = nnx.traversals.flatten_mapping(grads.to_pure_dict())
    paths = flat_param_paths(grads)
    table = [entry for entry in parameter_table(loaded.config) if not entry.tied]
    assert {entry.key for entry in table} == set(reference_grads), "every reference gradient is compared, once"
    worst = {}
    for entry in table:
        reference = reference_grads[entry.key]
        mine = to_reference(np.asarray(ours[paths[entry.path]]), entry.layout)
        assert mine.shape == reference.shape, entry.key
        scale = max(float(np.max(np.abs(reference))), 1e-12)
        worst[entry.key] = float(np.max(np.abs(mine - reference))) / scale
    bad = {key: value for key, value in worst.items() if not value <= GRAD_RELATIVE_TO_MAX}  # NaN is bad too
    assert not bad, f"{name}: gradients off by more than {GRAD_RELATIVE_TO_MAX} of their largest value: {bad}"
    norm = float(np.sqrt(sum(float(np.sum(np.square(np.asarray(g)))) for g in ours.values())))
    assert norm == pytest.approx(meta["grad_norm"], rel=1e-4)
