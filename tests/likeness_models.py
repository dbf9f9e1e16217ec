"""Small DINO and CLIP models of the real architectures, randomly initialised and saved with their processors: the
likeness tests' stand-ins for facebook/dino-vits16 and openai/clip-vit-base-patch32 (nothing downloads)."""

from __future__ import annotations

from pathlib import Path

from spyke_lora.tiny_world import write_tokenizer


def build_likeness_models(root: Path) -> tuple[Path, Path]:
    """A DINO (ViT, [CLS] of a 64 px image, 16 px patches, 2 layers of 32) and a CLIP (2+2 layers of 32, the tiny
    world's byte-level tokenizer), randomly initialised from their configs, saved with their processors into
    ``root/dino`` and ``root/clip``: what the likeness tests load, nothing downloaded."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(0)
        dino = root / "dino"
        vit = ViTModel(
            ViTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=64,
                patch_size=16,
            ),
            add_pooling_layer=False,
        )
        vit.save_pretrained(dino)
        ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(dino)

        clip = root / "clip"
        tokenizer_files = write_tokenizer(root / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_files))
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        }
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
            tokenizer=tokenizer,
        )
        processor.save_pretrained(clip)
    return dino, clip
