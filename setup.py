"""Shim for Beam's ``--setup_file ./setup.py``: the package metadata lives in pyproject.toml.

Remote runners (Dataflow, Flink, Spark) build an sdist from this file and pip-install it on every
worker, so the DoFns in ``transforms/`` and the records in ``schemas/`` import there too.
"""

from setuptools import setup

setup()
