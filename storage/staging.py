"""Stage outputs are written to a staging area and published under their final names only when complete.

A run writes everything (data, ledger, a stage's own files, ``manifest.json``) below
``OUTPUT/.staging/``. Once the pipeline has finished, ``publish`` moves every file the staged manifest
lists to its final name and moves ``manifest.json`` last: a run killed at any point before that leaves
nothing under a final name, and a run killed during the moves leaves no manifest, so readers (which
trust only the manifest) ignore the partial directory and the next run clears it.
"""

from __future__ import annotations

import logging
import os

from schemas.manifest import MANIFEST_NAME, Manifest
from storage.files import delete_tree, exists, is_remote, join, read_bytes, rename_over

STAGING_NAME = ".staging"

log = logging.getLogger("mmcorpus")


def staging_dir(output_dir: str) -> str:
    """Where a run into ``output_dir`` writes before publishing (one run at a time: see ``storage.lock``)."""
    return join(output_dir, STAGING_NAME)


def clear_staging(output_dir: str) -> None:
    delete_tree(staging_dir(output_dir))


def publish(output_dir: str) -> Manifest:
    """Move the staged files of ``output_dir`` to their final names, ``manifest.json`` last, and remove
    the staging area. Every listed file must be staged with its recorded size."""
    staged = staging_dir(output_dir)
    manifest_path = join(staged, MANIFEST_NAME)
    if not exists(manifest_path):
        raise RuntimeError(f"{staged}: the pipeline finished without writing {MANIFEST_NAME}; nothing published")
    manifest = Manifest.from_json(read_bytes(manifest_path).decode("utf-8"))
    staged_files = []
    for entry in manifest.files:
        src = join(staged, entry.path)
        if not exists(src):
            final = join(output_dir, entry.path)
            if exists(final) and (is_remote(final) or os.path.getsize(final) == entry.bytes):
                # a stage that wrote this file under its final name itself (not crash-safe: write it
                # under staging_dir(output_dir) instead); it is complete, so keep it
                log.warning("%s was written outside %s; it is kept, but such a stage is not crash-safe", final, staged)
                continue
            raise RuntimeError(f"{src} is listed in the staged manifest but was not written")
        if not is_remote(src) and os.path.getsize(src) != entry.bytes:
            raise RuntimeError(f"{src} has {os.path.getsize(src)} bytes, the staged manifest says {entry.bytes}")
        staged_files.append(entry.path)
    for rel in staged_files:
        rename_over(join(staged, rel), join(output_dir, rel))
    rename_over(manifest_path, join(output_dir, MANIFEST_NAME))
    delete_tree(staged)
    return manifest
