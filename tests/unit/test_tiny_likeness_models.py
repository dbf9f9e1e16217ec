"""tiny_world.build_likeness_models: the notebook's stand-in DINO and CLIP, loaded as likeness() loads the real ones."""

import torch

from spyke_lora.tiny_world import build_likeness_models


def test_the_tiny_likeness_models_load_with_transformers_and_leave_the_random_state_alone(tmp_path):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dino, clip = build_likeness_models(tmp_path / "models")
    assert torch.equal(torch.rand(3), expected)  # the caller's generator: as it was
    assert (dino, clip) == (tmp_path / "models" / "dino", tmp_path / "models" / "clip")
    vit, processor = AutoModel.from_pretrained(dino), AutoImageProcessor.from_pretrained(dino)
    assert type(vit).__name__ == "ViTModel" and vit.pooler is not None  # as facebook/dino-vits16 is saved
    clip_model, clip_processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    assert clip_processor.tokenizer.model_max_length == 77
    image = torch.rand(1, 3, 64, 64)
    assert vit(pixel_values=image).last_hidden_state.shape == (1, 17, 32)  # [CLS] and 16 patches of 16 px
    assert processor(images=[image[0].numpy()], return_tensors="pt", do_rescale=False)["pixel_values"].shape[-1] == 64
    text = clip_processor(text=["person, standing"], padding=True, return_tensors="pt")
    assert clip_model.get_text_features(**text).shape == (1, 16)
    # seeded: made again elsewhere, the same weights; asked again, the folders are reused as they are
    again, _ = build_likeness_models(tmp_path / "other")
    first = (dino / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == first
    stamp = (dino / "model.safetensors").stat().st_mtime_ns
    build_likeness_models(tmp_path / "models")
    assert (dino / "model.safetensors").stat().st_mtime_ns == stamp
