"""Fixtures shared by the compiler tests: one trained digits model and one key dir per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.examples import DigitsExample, train_digits
from signing.keyring import KeyDir, init_keys


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsExample:
    return train_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def release_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    path: Path = tmp_path_factory.mktemp("compiler-keys") / "keys"
    init_keys(path)
    return KeyDir(path)
