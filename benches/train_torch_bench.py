"""The PyTorch training step sdlora is compared with, timed in the same GPU run as `sdlora bench train`.

diffusers UNet2DConditionModel (SD1.5 size, random weights from MODEL_DIR, e.g. benches/make_sd15_random.py)
in bf16 with SDPA attention, PEFT LoRA r = 128 / alpha 128 on to_q, to_k, to_v, to_out.0 (f32 LoRA
weights, autocast bf16), Min-SNR(γ = 5) MSE loss, torch.optim.AdamW — at 512 px, batch 1 — in three
configurations: eager, with gradient checkpointing, and torch.compile. Each: median wall time per step
(synchronized, after warm-up) and peak allocated / reserved memory. With --ours PATH it then runs
`PATH bench train` and prints sdlora's figures and the ratios.

    python3 benches/train_torch_bench.py MODEL_DIR [--steps 20] [--ours target/release/sdlora] [--no-compile]
"""
import argparse
import re
import subprocess
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def min_snr_loss(pred, eps, t, alphas_cumprod, gamma=5.0):
    ab = alphas_cumprod[t]
    snr = ab / (1 - ab)
    w = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    per_sample = F.mse_loss(pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3))
    return (w * per_sample).mean()


def bench(model_dir, mode, steps, warmup):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(f"{model_dir}/unet", torch_dtype=torch.bfloat16).cuda()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=128, lora_alpha=128, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if mode == "checkpointing":
        unet.enable_gradient_checkpointing()
    unet.train()
    forward = torch.compile(unet) if mode == "compile" else unet
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-2)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device="cuda") ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0 = torch.randn(1, 4, 64, 64, device="cuda")
    ctx = torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)

    def step():
        eps = torch.randn_like(x0)
        t = torch.randint(0, 1000, (1,), device="cuda")
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = forward(x_t, t, ctx).sample
        loss = min_snr_loss(pred, eps, t, alphas_cumprod)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    result = dict(median=times[len(times) // 2], min=times[0], max=times[-1],
                  alloc=torch.cuda.max_memory_allocated() / 2**30, reserved=torch.cuda.max_memory_reserved() / 2**30)
    del unet, forward, opt, params
    torch.cuda.empty_cache()
    return result


def ours(binary, steps):
    out = subprocess.run([binary, "bench", "train", "--steps", str(steps)], capture_output=True, text=True, check=True).stdout
    median = float(re.search(r"CUDA graph replay[^:]*: median ([0-9.]+) ms", out).group(1))
    eager = float(re.search(r"eager launches[^:]*: median ([0-9.]+) ms", out).group(1))
    peak = float(re.search(r"peak device memory ([0-9.]+) GiB in use", out).group(1))
    held = float(re.search(r"\(([0-9.]+) GiB held", out).group(1))
    return median, eager, peak, held


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ours", help="path of the sdlora binary to run `bench train` with")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}: train step, SD1.5 UNet, 512 px, batch 1, LoRA r = 128")
    modes = ["eager", "checkpointing"] + ([] if a.no_compile else ["compile"])
    results = {}
    for mode in modes:
        r = bench(a.model, mode, a.steps, warmup=10 if mode == "compile" else 3)
        results[mode] = r
        print(f"  torch {mode:13s}: median {r['median']:.1f} ms (min {r['min']:.1f}, max {r['max']:.1f}), "
              f"{1.88e3 / r['median']:.1f} TFLOP/s; peak {r['alloc']:.2f} GiB allocated, {r['reserved']:.2f} GiB reserved")
    if a.ours:
        median, eager, peak, held = ours(a.ours, a.steps)
        print(f"  sdlora (graphs)    : median {median:.2f} ms, {1.88e3 / median:.1f} TFLOP/s; peak {peak:.2f} GiB in use, {held:.2f} GiB held")
        print(f"  sdlora (eager)     : median {eager:.2f} ms")
        for mode, r in results.items():
            print(f"  vs torch {mode:13s}: sdlora {r['median'] / median:.1f}x faster; torch reserves {r['reserved'] / held:.2f}x the memory sdlora holds")


if __name__ == "__main__":
    main()
