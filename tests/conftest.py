"""Shared test helpers."""
import pytest


def interrupt_at(call: int):
    """``wrap(f)``: ``f`` that raises KeyboardInterrupt (a simulated kill) at the ``call``-th call, counted over every
    function this ``wrap`` wrapped (e.g. the loss of each model a run trains)."""
    count = 0

    def wrap(f):
        def wrapped(*args, **kwargs):
            nonlocal count
            count += 1
            if count == call:
                raise KeyboardInterrupt
            return f(*args, **kwargs)
        return wrapped
    return wrap


@pytest.fixture
def kill_at():
    """:func:`interrupt_at`, for tests that kill a run and resume it."""
    return interrupt_at
