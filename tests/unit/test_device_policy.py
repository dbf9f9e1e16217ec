"""The device policy is a pure function: tested for mps, cuda and cpu on any machine."""

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from spyke_lora import ConfigError, DeviceError, SpykeLoraWarning, TrainConfig, sd_scripts_argv
from spyke_lora._device import choose_device, resolve_device


@pytest.fixture
def cfg(tmp_path):
    return TrainConfig(
        base_model=tmp_path / "m.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        reg_dir=tmp_path / "1_person",
        output_dir=tmp_path / "out",
        output_name="spyke_plasma_v1",
    )


def value(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_prefers_cuda_then_mps_then_cpu(cuda, mps, expected):
    assert resolve_device("auto", cuda_available=cuda, mps_available=mps) == expected


def test_an_unavailable_device_is_an_error():
    with pytest.raises(DeviceError, match="torch reports MPS unavailable"):
        resolve_device("mps", cuda_available=False, mps_available=False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda", cuda_available=False, mps_available=True)
    assert resolve_device("cpu", cuda_available=True, mps_available=True) == "cpu"


def test_mps_plan():
    plan = choose_device("mps", mixed_precision="fp16", optimizer_type="AdamW")
    assert (plan.mixed_precision, plan.full_precision_vae, plan.attention, plan.data_loader_workers) == (
        "no",
        True,
        "sdpa",
        0,
    )
    assert plan.corrections == ("mixed_precision 'fp16' changed to 'no' on mps: fp16 mixed precision requires a GPU",)
    assert choose_device("mps", mixed_precision="auto", optimizer_type="AdamW").corrections == ()


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit", "bitsandbytes.optim.AdEMAMix8bit"])
def test_8bit_optimizers_are_refused_off_cuda(optimizer):
    with pytest.raises(
        DeviceError, match=f"`optimizer_type` '{optimizer}' needs bitsandbytes.*use optimizer_type = 'AdamW'"
    ):
        choose_device("mps", mixed_precision="auto", optimizer_type=optimizer)
    assert choose_device("cuda", mixed_precision="auto", optimizer_type=optimizer).mixed_precision == "fp16"


def test_cuda_honours_the_requested_precision():
    assert choose_device("cuda", mixed_precision="auto", optimizer_type="AdamW").mixed_precision == "fp16"
    assert choose_device("cuda", mixed_precision="bf16", optimizer_type="AdamW").mixed_precision == "bf16"
    assert choose_device("cuda", mixed_precision="no", optimizer_type="AdamW").mixed_precision == "no"
    plan = choose_device("cuda", mixed_precision="fp16", optimizer_type="AdamW", xformers=True)
    assert plan.attention == "xformers" and plan.corrections == () and not plan.full_precision_vae


# --- the exact sd-scripts arguments, checked by sd-scripts' own parser ----------------------------------------------


def test_argv_on_mps(cfg):
    with pytest.warns(SpykeLoraWarning, match="mixed_precision 'fp16' changed to 'no' on mps"):
        argv = sd_scripts_argv(cfg.replace(mixed_precision="fp16"), device="mps")
    assert value(argv, "--mixed_precision") == "no"
    assert "--no_half_vae" in argv and "--sdpa" in argv and "--xformers" not in argv
    assert value(argv, "--max_data_loader_n_workers") == "0"
    assert value(argv, "--optimizer_type") == "AdamW"


def test_argv_on_cuda(cfg):
    argv = sd_scripts_argv(cfg, device="cuda")
    assert value(argv, "--mixed_precision") == "fp16"
    assert "--sdpa" in argv and "--xformers" not in argv and "--no_half_vae" not in argv
    assert "--max_data_loader_n_workers" not in argv  # sd-scripts' own default on CUDA
    argv = sd_scripts_argv(cfg.replace(extra_args={"xformers": True}), device="cuda")
    assert "--xformers" in argv and "--sdpa" not in argv


def test_argv_on_cpu(cfg):
    argv = sd_scripts_argv(cfg, device="cpu")
    assert value(argv, "--mixed_precision") == "no"
    assert "--sdpa" in argv and "--xformers" not in argv


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_the_defaults_are_the_fast_settings(cfg, device):
    """Issue 7's measured defaults (docs/benchmarks.md): sdpa attention, latents cached once in memory, data
    loading in the training process (no worker processes to start: with cached latents a batch is a lookup)."""
    argv = sd_scripts_argv(cfg, device=device)
    assert "--sdpa" in argv and "--cache_latents" in argv
    assert value(argv, "--max_data_loader_n_workers") == "0" and "--persistent_data_loader_workers" not in argv
    assert "--cache_latents_to_disk" not in argv  # it writes files into the user's dataset folders: opt-in
    assert "--cache_latents_to_disk" in sd_scripts_argv(cfg.replace(cache_latents_to_disk=True), device=device)
    assert "--cache_latents" not in sd_scripts_argv(cfg.replace(cache_latents=False), device=device)


def test_caching_latents_on_disk_needs_caching(cfg):
    with pytest.raises(ConfigError, match="`cache_latents_to_disk = true` needs `cache_latents = true`"):
        cfg.replace(cache_latents=False, cache_latents_to_disk=True)


def test_argv_carries_the_recipe(cfg):
    argv = sd_scripts_argv(cfg, device="cpu")
    assert value(argv, "--pretrained_model_name_or_path") == str(cfg.base_model)
    assert value(argv, "--dataset_config") == str(cfg.output_dir / "spyke_plasma_v1_dataset.toml")
    assert value(argv, "--output_name") == "spyke_plasma_v1"
    assert value(argv, "--save_model_as") == "safetensors"
    assert value(argv, "--network_dim") == "32" and float(value(argv, "--network_alpha")) == 16
    assert float(value(argv, "--learning_rate")) == 1e-4 and float(value(argv, "--text_encoder_lr")) == 5e-5
    assert value(argv, "--max_train_epochs") == "4" and "--max_train_steps" not in argv
    assert value(argv, "--save_every_n_steps") == "200" and value(argv, "--clip_skip") == "2"
    assert value(argv, "--keep_tokens") == "1" and value(argv, "--seed") == "42"
    for flag in ("--enable_bucket", "--shuffle_caption", "--gradient_checkpointing"):
        assert flag in argv
    assert "--flip_aug" not in argv
    steps = sd_scripts_argv(cfg.replace(max_train_steps=920), device="cpu")
    assert value(steps, "--max_train_steps") == "920" and "--max_train_epochs" not in steps  # steps win


def test_8bit_optimizer_on_mps_is_refused(cfg):
    with pytest.raises(DeviceError, match="bitsandbytes, which runs on CUDA only"):
        sd_scripts_argv(cfg.replace(optimizer_type="AdamW8bit"), device="mps")


def test_xformers_on_mps_is_refused(cfg):
    with pytest.raises(DeviceError, match="`extra_args.xformers` needs CUDA"):
        sd_scripts_argv(cfg.replace(extra_args={"xformers": True}), device="mps")


def test_extra_args_go_through_sd_scripts_parser(cfg):
    argv = sd_scripts_argv(cfg.replace(extra_args={"noise_offset": 0.05, "network_args": ["conv_dim=4"]}), device="cpu")
    assert value(argv, "--noise_offset") == "0.05"
    assert value(argv, "--network_args") == "conv_dim=4"
    with pytest.raises(
        ConfigError,
        match="`extra_args.noise_ofset` is not an sd-scripts train_network.py option; did you mean `noise_offset`",
    ):
        sd_scripts_argv(cfg.replace(extra_args={"noise_ofset": 0.05}), device="cpu")


def test_options_the_library_manages_cannot_be_overridden(cfg):
    with pytest.raises(
        ConfigError, match="`extra_args.pretrained_model_name_or_path` cannot be set: set `base_model` instead"
    ):
        sd_scripts_argv(cfg.replace(extra_args={"pretrained_model_name_or_path": "x"}), device="cpu")
    with pytest.raises(ConfigError, match="max_data_loader_n_workers` cannot be set on mps"):
        sd_scripts_argv(cfg.replace(extra_args={"max_data_loader_n_workers": 4}), device="mps")


def test_argv_with_a_users_dataset_toml(tmp_path):
    from spyke_lora._engine import write_dataset_toml

    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors",
        dataset_config=tmp_path / "my_dataset.toml",
        output_dir=tmp_path / "out",
        output_name="spyke_plasma_v1",
    )
    argv = sd_scripts_argv(cfg, device="cpu")
    assert value(argv, "--dataset_config") == str(tmp_path / "my_dataset.toml")
    assert "--train_data_dir" not in argv and "--reg_data_dir" not in argv
    # dataset-level options still go on the command line: sd-scripts uses them where the TOML is silent
    assert value(argv, "--resolution") == "512" and value(argv, "--keep_tokens") == "1"
    assert write_dataset_toml(cfg) is None and not (tmp_path / "out").exists()  # the user's file is never rewritten


def test_generated_dataset_toml(cfg):
    from spyke_lora._engine import write_dataset_toml

    path = write_dataset_toml(cfg)
    assert path == cfg.output_dir / "spyke_plasma_v1_dataset.toml"
    data = tomllib.loads(path.read_text())
    assert data["datasets"][0]["subsets"] == [
        {"image_dir": str(cfg.train_dir), "num_repeats": 10, "is_reg": False, "class_tokens": "spyke_plasma_v1"},
        {"image_dir": str(cfg.reg_dir), "num_repeats": 1, "is_reg": True, "class_tokens": "person"},
    ]


def test_the_device_is_named_from_the_machine_lora04():
    """The readers are injected: a Mac's chip from sysctl, a GPU's name from torch, a Linux CPU from /proc."""
    from spyke_lora._device import device_name

    asked = []

    def sysctl(key):
        asked.append(key)
        return "Apple M1 Pro"

    assert device_name("mps", platform_name="darwin", sysctl=sysctl) == "Apple M1 Pro"
    assert asked == ["machdep.cpu.brand_string"]
    assert device_name("cpu", platform_name="darwin", sysctl=sysctl) == "Apple M1 Pro"
    assert device_name("cuda", cuda_name=lambda: "NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    assert device_name("cpu", platform_name="linux", cpuinfo=lambda: "AMD EPYC 7B13") == "AMD EPYC 7B13"
    assert device_name("mps", platform_name="darwin", sysctl=lambda key: "") != ""  # falls back to the machine


def test_memory_in_use_on_the_cpu_is_the_resident_memory():
    import psutil

    from spyke_lora._device import memory_reader

    read = memory_reader("cpu")
    assert abs(read() - psutil.Process().memory_info().rss) < 256 * 2**20
