"""diffusers' side of the sampling comparisons, on the same model folder and LoRA as sdlora:

1. parity: StableDiffusionPipeline + pipe.load_lora_weights(LORA_DIR) from the initial latents in
   LATENTS (safetensors "latents", NCHW), PNDM, guidance 5.0, STEPS steps, output_type="latent":
   writes the final latents to OUT (compare with `sdlora sample --init-latents LATENTS --save-latents`),
   and the same without the LoRA, to show the LoRA changes the output;
2. speed: 30 PNDM steps with CFG + VAE decode at 512 px, batch 1, bf16, SDPA (diffusers' default),
   CUDA-event timed after a warm-up, with peak allocated / reserved memory.

    python3 benches/sample_reference.py MODEL_DIR LORA_DIR LATENTS OUT [STEPS]
"""
import sys
import time

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

PROMPT = "<cheburashka>, full body, waving hand, friendly smile"


def main(model, lora, latents_file, out, steps=30):
    latents = load_file(latents_file)["latents"].cuda()
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=5.0, latents=latents.clone(),
                       output_type="latent").images
    base = run()
    pipe.load_lora_weights(lora)
    with_lora = run()
    save_file({"latents": with_lora.float().cpu().contiguous(), "latents_without_lora": base.float().cpu().contiguous()}, out)
    print("diffusers f32 latents written; LoRA changes them by %.3e relative" % ((with_lora - base).norm() / base.norm()).item())

    pipe.to(torch.bfloat16)
    gen = lambda: pipe(PROMPT, num_inference_steps=30, guidance_scale=5.0, height=512, width=512,
                       generator=torch.Generator("cuda").manual_seed(0), output_type="pil")
    gen()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gen()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print("diffusers bf16 sampling, 30 PNDM steps + decode, 512 px: median %.1f ms (min %.1f, max %.1f); "
          "peak %.2f GiB allocated, %.2f GiB reserved" % (1e3 * sorted(times)[1], 1e3 * min(times), 1e3 * max(times),
                                                         torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30))


if __name__ == "__main__":
    main(*sys.argv[1:5], *(int(a) for a in sys.argv[5:6]))
