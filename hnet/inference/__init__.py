"""Using a trained model: load it from a run or export folder (load), generate from it (decode),
export its parameters (export), and convert the reference implementation's checkpoints (reference,
convert).

May import: the model core (hnet/*.py, hnet.layers), hnet.parallel and hnet.io; never hnet.training
(loading a model needs no run config, optimizer or training loop), hnet.evaluation or hnet.perf
(tests/core/test_structure.py checks it).
"""
