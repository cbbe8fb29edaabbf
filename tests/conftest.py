"""The scripts live at the repository root as single files: make them importable as modules."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so runs/ is written there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
