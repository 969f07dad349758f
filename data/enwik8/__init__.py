"""enwik8 source for data.prepare (see prepare.py)."""
