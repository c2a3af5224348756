"""A complete SD1.5-shaped diffusers folder with random weights (no download), for GPU end-to-end
runs of `sdlora train` and `sdlora sample` and for comparisons with diffusers on the same weights.

    python3 benches/make_sd15_random.py DIR      # needs torch, diffusers, transformers; ~2 GB written

The UNet comes from benches/unet_reference.py's config; the tokenizer is the CLIP BPE vocabulary the
repository ships (data/clip). Weights are PyTorch's default initialisation with the zero-initialised
output convolutions given small random values, so every layer contributes.
"""
import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from unet_reference import SD15_UNET  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(out):
    torch.manual_seed(0)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n.endswith("conv_out.weight") or n.endswith("proj_out.weight"):
                p.normal_(0, 0.02)
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    clip.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
    tok_dir = os.path.join(out, "tokenizer")
    os.makedirs(tok_dir)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(HERE, "..", "data", "clip", f), tok_dir)
    CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), model_max_length=77).save_pretrained(tok_dir)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).save_pretrained(os.path.join(out, "scheduler"))
    json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
               "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
               "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}, open(os.path.join(out, "model_index.json"), "w"), indent=2)
    print("random SD1.5 folder written to", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd15-random")
