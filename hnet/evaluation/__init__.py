"""Measuring models and runs: bits per byte of documents (evaluate), chunk boundaries in byte
coordinates (boundaries), noisy text (perturb), compressor baselines (compress), curves (plot) and
comparison and robustness reports (report).

May import: the model core (hnet/*.py, hnet.layers), hnet.parallel, hnet.io and hnet.inference; never
hnet.training or hnet.perf (tests/core/test_structure.py checks it).
"""
