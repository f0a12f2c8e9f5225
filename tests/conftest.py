"""Shared fixtures: a small slice of the digits data, cached for the session."""

import pytest

from dynamics.data import load_digits_dataset


@pytest.fixture(scope="session")
def digits():
    return load_digits_dataset()
