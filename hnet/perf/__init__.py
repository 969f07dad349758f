"""Performance measurement: benchmarks of training, memory, components and decoding (bench,
bench_components) and what a compiled step executes (xla_stats).

May import anything in hnet: it measures every other part.
"""
