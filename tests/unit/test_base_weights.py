"""`extra_args.base_weights` are merged into the base model before validating or sampling files on disk, as
sd-scripts' train() merges them before training (train_network.py l.646-661)."""

import argparse
import inspect
import types

from spyke_lora._engine import _held_out, _sample_files
from spyke_lora._engine._base_weights import merge_base_weights


class _Network:
    def __init__(self, calls, multiplier, path):
        self.calls, self.multiplier, self.path = calls, multiplier, path

    def merge_to(self, text_encoder, unet, weights, dtype, device):
        self.calls.append(("merge_to", self.path, self.multiplier, text_encoder, unet, weights, dtype, device))


def _module(calls):
    def create_network_from_weights(multiplier, path, vae, text_encoder, unet, for_inference):
        calls.append(("create", path, multiplier, vae, text_encoder, unet, for_inference))
        return _Network(calls, multiplier, path), {"weights of": path}

    return types.SimpleNamespace(create_network_from_weights=create_network_from_weights)


def test_each_file_is_merged_with_its_multiplier_in_order_as_train_does():
    calls: list = []
    args = argparse.Namespace(
        base_weights=["a.safetensors", "b.safetensors"], base_weights_multiplier=[0.5], lowram=False
    )
    accelerator = types.SimpleNamespace(device="mps")
    merged = merge_base_weights(args, _module(calls), ("te", "vae", "unet"), "fp16", accelerator)
    assert merged == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]  # no multiplier given: 1.0, as train()
    assert calls == [
        ("create", "a.safetensors", 0.5, "vae", "te", "unet", True),
        ("merge_to", "a.safetensors", 0.5, "te", "unet", {"weights of": "a.safetensors"}, "fp16", "cpu"),
        ("create", "b.safetensors", 1.0, "vae", "te", "unet", True),
        ("merge_to", "b.safetensors", 1.0, "te", "unet", {"weights of": "b.safetensors"}, "fp16", "cpu"),
    ]


def test_lowram_merges_on_the_accelerators_device_and_nothing_is_merged_without_base_weights():
    calls: list = []
    args = argparse.Namespace(base_weights=["a.safetensors"], base_weights_multiplier=None, lowram=True)
    merge_base_weights(args, _module(calls), ("te", "vae", "unet"), "fp32", types.SimpleNamespace(device="cuda:0"))
    assert calls[-1][-1] == "cuda:0"
    calls.clear()
    none = argparse.Namespace(base_weights=None, base_weights_multiplier=None, lowram=False)
    assert merge_base_weights(none, _module(calls), ("te", "vae", "unet"), "fp32", None) == [] and calls == []


def test_validation_and_sampling_merge_after_loading_and_before_the_network():
    """Both loaders of files on disk merge right after `load_target_model` and before the LoRA network is made."""
    for function in (_held_out.validate_files, _sample_files.sample_files):
        source = inspect.getsource(function)
        loaded = source.index("load_target_model(")
        merged = source.index("merge_base_weights(")
        network = source.index("create_network_from_weights(")
        moved = source.index(".to(device")
        assert loaded < merged < network and merged < moved, function.__name__
