import pytest

from shoal.core.swarm.backoff import Backoff


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_a_success():
    b = Backoff(5.0, 60.0)
    assert [b.failed() for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    b.succeeded()
    assert b.failed() == 5.0


def test_backoff_never_overflows():
    b = Backoff(1.0, 300.0)
    assert [b.failed() for _ in range(2000)][-1] == 300.0


@pytest.mark.parametrize("first, cap", [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_backoff_refuses_nonsense(first, cap):
    with pytest.raises(ValueError):
        Backoff(first, cap)
