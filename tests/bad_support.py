"""What the bad-input corpus' entry points share (tests/test_bad_inputs.py and tests/bad_entries_*.py)."""
from __future__ import annotations

import pytest


def raised(fn, *args):
    """The exception `fn(*args)` raises; a bad input that is accepted fails the test."""
    try:
        fn(*args)
    except Exception as e:  # the type is the assertion: the caller compares it with the manifest
        return e
    pytest.fail("the bad input was accepted")
