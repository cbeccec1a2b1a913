"""Plain file I/O below every other package (no Beam transforms): paths, atomic writes, manifests, run locks."""
