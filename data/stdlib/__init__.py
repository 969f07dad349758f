"""stdlib source for data.prepare (see prepare.py)."""
