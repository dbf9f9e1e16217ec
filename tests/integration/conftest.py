"""Integration tests: the real sd-scripts engine on the tiny local model (CPU, 64 px)."""

import pytest

from spyke_lora.tiny_world import build_tiny_world


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"
