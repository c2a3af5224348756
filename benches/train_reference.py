"""PyTorch reference trainer (diffusers + PEFT, as the reference notebook trains) fed exactly what
`sdlora train --dump-draws FILE` used: its initial LoRA (OUT/step_0), and every step's x_t, noise,
timestep and caption states. Trains the same number of steps with Min-SNR loss and AdamW, then
compares the per-step losses and the final LoRA with sdlora's (OUT/step_N).

    sdlora train --model M --data D --out OUT --steps 200 --dump-draws OUT/draws.safetensors ...
    python3 benches/train_reference.py M OUT [--dtype bf16|f32] [--lr 2e-5] [--gamma 5]

Weights stay f32 (as the notebook keeps them) with autocast to `--dtype` on CUDA; f32 on the CPU.
"""
import argparse
import json
import os

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file


def lora_file(step_dir):
    return os.path.join(step_dir, "pytorch_lora_weights.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--gamma", default="5")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    draws = load_file(os.path.join(a.out, "draws.safetensors"))
    steps = draws["loss"].shape[0]
    init = load_file(lora_file(os.path.join(a.out, "step_0")))
    with safe_open(lora_file(os.path.join(a.out, "step_0")), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    r, alpha = int(meta["unet.r"]), float(meta["unet.lora_alpha"])

    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet")).to(dev)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = {n.replace(".default", ""): p for n, p in unet.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init["unet." + n])
            p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    gamma = None if a.gamma == "none" else float(a.gamma)
    batch = draws["t"].shape[0] // steps
    use_autocast = dev == "cuda" and a.dtype == "bf16"

    losses = []
    for k in range(steps):
        s = slice(k * batch, (k + 1) * batch)
        x_t, eps, t, ctx = (draws[n][s].to(dev) for n in ("x_t", "eps", "t", "context"))
        t = t.long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            pred = unet(x_t, t, ctx).sample
        abar = sched.alphas_cumprod.to(dev)[t]
        snr = abar / (1 - abar)
        w = torch.ones_like(snr) if gamma is None else torch.clamp(snr, max=gamma) / snr
        loss = (w * ((pred.float() - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    ours = draws["loss"].tolist()
    rel = [abs(x - y) / abs(y) for x, y in zip(ours, losses)]
    print(f"{steps} steps: mean |loss diff| {100 * sum(rel) / len(rel):.3f} % (max {100 * max(rel):.3f} %), "
          f"final loss ours {ours[-1]:.5f} / torch {losses[-1]:.5f}")
    final = load_file(lora_file(os.path.join(a.out, f"step_{steps}")))
    names = sorted(params)
    theirs = torch.cat([params[n].detach().float().cpu().flatten() for n in names])
    mine = torch.cat([final["unet." + n].flatten() for n in names])
    start = torch.cat([init["unet." + n].flatten() for n in names])
    print(f"final LoRA ({len(names)} tensors, {theirs.numel()} values): rel L2 vs torch {((mine - theirs).norm() / theirs.norm()).item():.3e}; "
          f"relative to the training change {((mine - theirs).norm() / (theirs - start).norm()).item():.3e}")
    per = []
    for n in names:
        t, m, s0 = params[n].detach().float().cpu(), final["unet." + n], init["unet." + n]
        if (t - s0).norm() > 1e-6 * t.norm().clamp_min(1e-30) and t.norm() > 0:
            per.append(((m - t).norm() / t.norm()).item())
    per.sort()
    print(f"per tensor (those training moved): median rel L2 {per[len(per) // 2]:.3e}, worst {per[-1]:.3e}; "
          f"{sum(e > 5e-2 for e in per)} of {len(per)} above 5e-2")


if __name__ == "__main__":
    main()
