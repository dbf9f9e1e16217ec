"""Helpers for the integration tests."""

from safetensors import safe_open


def read_lora(path):
    """(tensors, metadata) of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_tensors(a, b):
    ta, _ = read_lora(a)
    tb, _ = read_lora(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert (ta[key] == tb[key]).all(), f"{key} differs"
