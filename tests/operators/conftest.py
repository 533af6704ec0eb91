"""Fixtures the operator tests borrow: real agent worker processes."""

from tests.workers.conftest import start_worker  # noqa: F401 - the ListWorkers example uses it
