"""Makes tests/fixtures/adamw_torch.txt: three torch.optim.AdamW steps (foreach path, on the GPU when
there is one) from zero moments, for the configs the Rust test `ops::adamw::tests::twin_matches_torch_adamw`
replays with our CPU twin. Lines are `name hex hex ...`, values as f32 bit patterns.

    python3 benches/torch_adamw.py [out_path]
"""
import math
import sys

import torch

N = 257
CONFIGS = {  # name: (lr, weight_decay, max_grad_norm); betas (0.9, 0.999), eps 1e-8
    "plain": (0.05, 0.1, None),
    "sd": (2e-5, 1e-2, None),
    "clip": (1e-3, 1e-2, 0.05),
}


def bits(t):
    return " ".join(f"{v & 0xFFFFFFFF:08x}" for v in t.detach().cpu().contiguous().view(torch.int32).tolist())


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/adamw_torch.txt"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p0 = torch.tensor([math.sin(0.37 * i + 0.1) for i in range(N)], dtype=torch.float32)
    grads = [torch.tensor([0.01 * math.cos(0.11 * i + 0.7 * k) * (1 + i % 5) for i in range(N)], dtype=torch.float32) for k in (1, 2, 3)]
    lines = [f"# torch {torch.__version__} on {dev}: torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8) + clip_grad_norm_",
             f"p0 {bits(p0)}"] + [f"g{k} {bits(g)}" for k, g in enumerate(grads, 1)]
    for name, (lr, wd, clip) in CONFIGS.items():
        p = torch.nn.Parameter(p0.clone().to(dev))
        opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        for k, g in enumerate(grads, 1):
            p.grad = g.clone().to(dev)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
            st = opt.state[p]
            lines += [f"{name}_p{k} {bits(p)}", f"{name}_m{k} {bits(st['exp_avg'])}", f"{name}_v{k} {bits(st['exp_avg_sq'])}"]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(lines)} lines, torch {torch.__version__}, {dev})")


if __name__ == "__main__":
    main()
