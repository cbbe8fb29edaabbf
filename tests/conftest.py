"""The scripts live at the repository root as single files: make them importable as modules."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("PYTEST_XDIST_WORKER"):  # two tests at a time (pytest -n 2): one CPU thread each, here and in the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # processes they start; more threads than cores thrash


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so runs/ is written there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the CUDA path (tests/test_cuda.py): `pytest -m cuda`, skipped without a GPU")
