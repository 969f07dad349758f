"""Training: the run config, the jitted train and eval steps, the optimizer, and the loop around them
(metrics, evaluation, checkpoints, resume, TensorBoard, profiling, one job per run folder, the
compile cache a restart loads).

May import: the model core (hnet/*.py, hnet.layers), hnet.parallel and hnet.io; never hnet.inference,
hnet.evaluation or hnet.perf (tests/core/test_structure.py checks it).
"""
