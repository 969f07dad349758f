"""Corpus preparation: turns raw sources into the "hnet-bytes-v1" shard format read by hnet.io.data."""
