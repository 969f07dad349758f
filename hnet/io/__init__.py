"""Data in and out of files: prepared corpora and their batches (data), the BPE tokenizer and token
corpora (tokenizer), training checkpoints with manifests (checkpoint), and the run folder's paths
(run_dir).

May import: the model core (hnet/*.py, hnet.layers) and hnet.parallel (the processes of a run agree
on what they read); never training, inference, evaluation or perf (tests/core/test_structure.py checks it).
"""
