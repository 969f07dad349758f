"""Parallelism: the device mesh and array placement (sharding), multi-process start-up
(distributed) and agreement between the processes of a run (multihost).

May import: the model core (hnet/*.py, hnet.layers) only. The logical axis names and rules that the
model itself uses live in the core, in hnet.logical_axes (tests/core/test_structure.py checks it).
"""
