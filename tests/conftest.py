"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture
def medplan_env(tmp_path, monkeypatch):
    """Point MEDPLAN_RAW / MEDPLAN_PREPROCESSED / MEDPLAN_RESULTS at fresh folders under tmp_path."""
    for var, sub in (("MEDPLAN_RAW", "raw"), ("MEDPLAN_PREPROCESSED", "preprocessed"), ("MEDPLAN_RESULTS", "results")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path
