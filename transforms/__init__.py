"""Beam building blocks: ingest, filters, dedup, rewrite, packing and shard I/O."""
