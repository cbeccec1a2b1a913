"""Shared fixtures."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
FIXTURES = REPO / "tests" / "fixtures"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(scope="session")
def sample_dir() -> pathlib.Path:
    return SAMPLE


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
