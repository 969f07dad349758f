"""Project Gutenberg English (pg_en) source for data.prepare (see prepare.py)."""
