"""Fidelity to the reference implementation (goombalab/hnet at 3673fe1), read from its code."""

import numpy as np
import pytest

import hnet
from conftest import tiny_config


def stack_std(stack, name):
    """Empirical std of one kind of weight over a stack's blocks ("out_proj", "fc2", "in_proj", ...)."""
    values = []
    for block in stack.blocks:
        layer = block.mlp.fc2 if name == "fc2" else block.mlp.fc1 if name == "fc1" else getattr(block.mixer, name, None)
        if layer is not None and (name not in ("fc1", "fc2") or block.has_mlp):
            values.append(np.asarray(layer.kernel[...]).ravel())
    return float(np.concatenate(values).std())


def test_output_projections_are_scaled_by_the_residual_count_as_the_reference():
    """The reference's HNet._init_weights: a stage's encoder and decoder scale out_proj / fc2 by
    1/sqrt(n), n = the residual additions of all enclosing encoders and decoders plus its own
    encoder's and decoder's; the main network by n = all enclosing ones plus its own."""
    config = tiny_config("hnet_2stage_tiny")  # ["m2", ["t1", ["T2"], "t1"], "m2"]
    model = hnet.build_model(config, seed=0)
    stage0, stage1 = model.backbone, model.backbone.inner
    main = stage1.inner.main
    n_stage0 = 2 + 2  # m2 encoder, m2 decoder
    n_stage1 = n_stage0 + 1 + 1  # t1 encoder, t1 decoder
    n_main = n_stage1 + 2 * 2  # T2: a mixer and an MLP per block
    for stack, n in [
        (stage0.encoder, n_stage0),
        (stage0.decoder, n_stage0),
        (stage1.encoder, n_stage1),
        (stage1.decoder, n_stage1),
        (main, n_main),
    ]:
        assert stack_std(stack, "out_proj") == pytest.approx(0.02 / np.sqrt(n), rel=0.04)
    assert stack_std(main, "fc2") == pytest.approx(0.02 / np.sqrt(n_main), rel=0.04)
    # Every other linear weight: std 0.02; the residual projection starts at zero, bias included.
    assert stack_std(stage0.encoder, "in_proj") == pytest.approx(0.02, rel=0.04)
    assert stack_std(main, "wqkv") == pytest.approx(0.02, rel=0.04)
    assert stack_std(main, "fc1") == pytest.approx(0.02, rel=0.04)
    for stage in (stage0, stage1):
        assert not np.any(stage.residual_proj.kernel[...]) and not np.any(stage.residual_proj.bias[...])
