"""Reference for the full-size UNet parity check (`sdlora bench unet --reference DIR`).

Builds diffusers' UNet2DConditionModel with SD1.5's config and random weights, adds a PEFT LoRA
(r = 128, alpha = 128, to_q/to_k/to_v/to_out.0, B drawn non-zero so the adapters matter), and runs
one Min-SNR(γ = 5) training forward + backward at 512 px (64×64 latents), batch 1:
  - in f32 (the truth), and
  - under bf16 autocast (PyTorch's own mixed-precision error, the yardstick for ours).
Writes DIR/model_index.json, DIR/unet/ (f32 safetensors + config), DIR/lora/pytorch_lora_weights.safetensors
and DIR/reference.safetensors (inputs, outputs, loss and every LoRA gradient, both precisions).

    python3 benches/unet_reference.py DIR       # needs torch (CUDA), diffusers, peft
"""
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
)


def main(out):
    torch.manual_seed(0)
    dev = "cuda"
    unet = UNet2DConditionModel(**SD15_UNET).to(dev)
    with torch.no_grad():  # default init leaves zero-init convs: give every tensor some signal
        for n, p in unet.named_parameters():
            if n.endswith("conv_out.weight") or n.endswith("proj_out.weight"):
                p.normal_(0, 0.02)
    os.makedirs(out, exist_ok=True)
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
              open(os.path.join(out, "model_index.json"), "w"))

    unet.add_adapter(LoraConfig(r=128, lora_alpha=128, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    os.makedirs(os.path.join(out, "lora"), exist_ok=True)
    save_file({"unet." + k: v for k, v in lora.items()}, os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))

    g = torch.Generator(device=dev).manual_seed(1)
    x0 = torch.randn(1, 4, 64, 64, device=dev, generator=g)
    noise = torch.randn(1, 4, 64, 64, device=dev, generator=g)
    ctx = torch.randn(1, 77, 768, device=dev, generator=g)
    t = torch.tensor([501], device=dev)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[501].item()
    noisy = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise
    snr = abar / (1 - abar)
    w = min(snr, 5.0) / snr

    ref = {"noisy": noisy, "noise": noise, "context": ctx, "timesteps": t.float(), "snr_weight": torch.tensor([w])}
    for tag, autocast in (("f32", False), ("bf16", True)):
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            pred = unet(noisy, t, ctx).sample
        loss = w * ((pred.float() - noise) ** 2).mean()
        loss.backward()
        ref[f"out.{tag}"] = pred.float().detach()
        ref[f"loss.{tag}"] = loss.detach().reshape(1)
        for n, p in unet.named_parameters():
            if p.grad is not None:
                ref[f"grad.{tag}.{n.replace('.default', '')}"] = p.grad.float()
    save_file({k: v.contiguous().cpu() for k, v in ref.items()}, os.path.join(out, "reference.safetensors"))
    print(f"reference written to {out}: loss f32 {ref['loss.f32'].item():.6f}, bf16 {ref['loss.bf16'].item():.6f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd15-reference")
