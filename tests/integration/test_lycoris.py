"""LyCORIS through the `lycoris` extra: lycoris-lora 3.4.0 trains LoCon in-process with the pinned sd-scripts.

Issue 22 measured 4.1.3 failing in sd-scripts v0.10.1 ("duplicated lora name") and 3.4.0 training; plan() refuses
the versions known to fail (tests/unit/test_preflight_names.py). This is the working version, trained 2 steps.
"""

import importlib.metadata

import pytest
from safetensors import safe_open

from spyke_lora import plan, train
from spyke_lora._engine import LYCORIS_WORKS

pytest.importorskip("lycoris", reason="the lycoris extra is not installed: pip install 'spyke-lora[lycoris]'")


def test_locon_trains_two_steps_with_the_pinned_lycoris(world, out):
    assert importlib.metadata.version("lycoris-lora") == LYCORIS_WORKS
    cfg = world.config(
        output_dir=out,
        reg_dir=None,
        max_train_steps=2,
        save_every_n_steps=None,
        network_module="lycoris.kohya",
        network_dim=4,
        network_alpha=1.0,
        extra_args={"network_args": ["algo=locon", "conv_dim=4", "conv_alpha=1"]},
    )
    assert not [w for w in plan(cfg).warnings if "lycoris" in w]  # the tested version: no warning
    result = train(cfg)
    assert (result.status, result.steps) == ("completed", 2)
    with safe_open(str(result.final_path), "pt") as f:
        keys = set(f.keys())
    # LoCon: the attention and linear layers, and (conv_dim) the ResNets' 3x3 convolutions too
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any("_resnets_" in k and "_conv1." in k for k in keys)
