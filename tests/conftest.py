"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def medplan_env(tmp_path, monkeypatch):
    """Point MEDPLAN_RAW / MEDPLAN_PREPROCESSED / MEDPLAN_RESULTS at fresh folders under tmp_path."""
    for var, sub in (("MEDPLAN_RAW", "raw"), ("MEDPLAN_PREPROCESSED", "preprocessed"), ("MEDPLAN_RESULTS", "results")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the model tests: on 2 shared cores more threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
