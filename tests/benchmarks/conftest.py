import pytest


def pytest_collection_modifyitems(items):
    """Benchmarks belong to the slow tier: `python -m pytest -m slow` (or tests/benchmarks with
    --benchmark-enable) runs them."""
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(pytest.mark.slow)
