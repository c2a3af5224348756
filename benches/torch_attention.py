"""PyTorch reference for src/bench/attention.rs: F.scaled_dot_product_attention (flash backend, bf16,
[batch, heads, L, d] as SDPA wants) at the same shapes, forward and forward + backward, CUDA events,
10 warm-up + 100 timed calls, median. Head dim 512 (VAE) is beyond the flash backend: there it uses
the memory-efficient backend and says so. Run: python3 benches/torch_attention.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, q_len, kv_len, heads, head_dim, causal, with_backward): same list as src/bench/attention.rs
SHAPES = [
    (1, 4096, 4096, 8, 40, False, True),
    (2, 4096, 4096, 8, 40, False, True),
    (1, 4096, 77, 8, 40, False, True),
    (1, 1024, 1024, 8, 80, False, True),
    (1, 1024, 77, 8, 80, False, True),
    (1, 256, 256, 8, 160, False, True),
    (1, 64, 64, 8, 160, False, True),
    (1, 256, 77, 8, 160, False, True),
    (1, 77, 77, 12, 64, True, False),
    (1, 4096, 4096, 1, 512, False, False),
]


def time_ms(fn, warmup=10, reps=100):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2], ms[0], ms[-1]


def main():
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'kernel':<28} {'shape':<28} {'median ms':>10} {'min ms':>10} {'max ms':>10} {'rate':>10}")
    for b, lq, lk, h, d, causal, with_bwd in SHAPES:
        backend = SDPBackend.FLASH_ATTENTION if d <= 256 else SDPBackend.EFFICIENT_ATTENTION
        mk = lambda L: torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16)
        q, k, v, dout = mk(lq), mk(lk), mk(lk), mk(lq)
        flops = 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0)
        desc = f"b{b} {lq}x{lk} h{h} d{d}{' causal' if causal else ''}"
        name = "sdpa_flash" if backend == SDPBackend.FLASH_ATTENTION else "sdpa_efficient"
        with sdpa_kernel(backend), torch.no_grad():
            t = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        print(f"{name + '_fwd':<28} {desc:<28} {t[0]:>10.4f} {t[1]:>10.4f} {t[2]:>10.4f} {flops / t[0] / 1e9:>8.1f} TFLOP/s")
        if with_bwd:
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

            def step():  # autograd.grad: the gradients without .grad accumulation kernels
                out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                torch.autograd.grad(out, (qg, kg, vg), dout)

            with sdpa_kernel(backend):
                t = time_ms(step)
            print(f"{name + '_fwd_bwd':<28} {desc:<28} {t[0]:>10.4f} {t[1]:>10.4f} {t[2]:>10.4f} {3.5 * flops / t[0] / 1e9:>8.1f} TFLOP/s")


if __name__ == "__main__":
    main()
