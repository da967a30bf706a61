"""Assertions shared by the op test modules."""

import pytest


def assert_raises_naming(call, exc, words):
    """``call()`` raises ``exc`` whose message names every one of ``words``."""
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"
