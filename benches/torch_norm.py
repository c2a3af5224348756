"""PyTorch reference timings for src/bench/norm.rs: F.group_norm and F.layer_norm in bf16, forward and
input-gradient backward (weights frozen), at the same shapes, CUDA events around each call (10 warm-up,
100 timed, median), plus a device copy for the bandwidth floor. GroupNorm is timed on a channels_last
NCHW tensor (what our NHWC layout corresponds to) and on a contiguous NCHW one (torch's native layout).

    python3 benches/torch_norm.py
"""
import torch
import torch.nn.functional as F


def time_ms(fn, warmup=10, reps=100):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in pairs)
    return ms[len(ms) // 2], ms[0], ms[-1]


def report(kernel, shape, bytes_moved, t):
    med, lo, hi = t
    print(f"torch {kernel:<28} {shape:<20} {med:>9.4f} {lo:>9.4f} {hi:>9.4f} {bytes_moved / med / 1e6:>8.1f} GB/s")


def main():
    dev = "cuda"
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"torch {'kernel':<28} {'shape':<20} {'median ms':>9} {'min':>9} {'max':>9} rate")
    for mib in (5, 256):
        a = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        report("copy", f"{mib} MiB", 2 * (mib << 20), time_ms(lambda: b.copy_(a)))
    bf = torch.bfloat16
    for n, hw, c in [(1, 4096, 320), (1, 1024, 640), (1, 256, 1280), (1, 64, 1280), (1, 4096, 960), (1, 1024, 1920),
                     (1, 256, 2560), (2, 4096, 320), (2, 4096, 640)]:
        side = int(hw ** 0.5)
        w, b = torch.randn(c, device=dev, dtype=bf), torch.randn(c, device=dev, dtype=bf)
        nbytes = n * hw * c * 2
        for layout, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
            x = torch.randn(n, c, side, side, device=dev, dtype=bf).contiguous(memory_format=fmt).requires_grad_(True)
            dy = torch.randn(n, c, side, side, device=dev, dtype=bf).contiguous(memory_format=fmt)
            shape = f"{n}x{hw}x{c}"
            report(f"group_norm_fwd[{layout}]", shape, 2 * nbytes, time_ms(lambda: F.group_norm(x, 32, w, b, 1e-5)))
            report(f"group_norm_silu_fwd[{layout}]", shape, 2 * nbytes, time_ms(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))))
            y = F.group_norm(x, 32, w, b, 1e-5)
            report(f"group_norm_bwd[{layout}]", shape, 3 * nbytes, time_ms(lambda: torch.autograd.grad(y, x, dy, retain_graph=True)))
            ys = F.silu(F.group_norm(x, 32, w, b, 1e-5))
            report(f"group_norm_silu_bwd[{layout}]", shape, 3 * nbytes, time_ms(lambda: torch.autograd.grad(ys, x, dy, retain_graph=True)))
    for r, c in [(4096, 320), (1024, 640), (256, 1280), (64, 1280), (77, 768), (8192, 320)]:
        x = torch.randn(r, c, device=dev, dtype=bf).requires_grad_(True)
        dy = torch.randn(r, c, device=dev, dtype=bf)
        w, b = torch.randn(c, device=dev, dtype=bf), torch.randn(c, device=dev, dtype=bf)
        report("layer_norm_fwd", f"{r}x{c}", 2 * r * c * 2, time_ms(lambda: F.layer_norm(x, (c,), w, b, 1e-5)))
        y = F.layer_norm(x, (c,), w, b, 1e-5)
        report("layer_norm_bwd", f"{r}x{c}", 3 * r * c * 2, time_ms(lambda: torch.autograd.grad(y, x, dy, retain_graph=True)))
    # The small kernels' torch equivalents at the bench shapes.
    x = torch.randn(4096, 2560, device=dev, dtype=bf).requires_grad_(True)
    dy = torch.randn(4096, 1280, device=dev, dtype=bf)
    geglu = lambda: (lambda h, g: h * F.gelu(g))(*x.chunk(2, dim=-1))
    report("geglu_fwd", "4096x2560", 3 * 4096 * 1280 * 2, time_ms(geglu))
    y = geglu()
    report("geglu_bwd", "4096x2560", 5 * 4096 * 1280 * 2, time_ms(lambda: torch.autograd.grad(y, x, dy, retain_graph=True)))
    n = 25_509_888
    p = torch.nn.Parameter(torch.randn(n, device=dev))
    p.grad = torch.randn(n, device=dev)
    for name, kw in (("adamw_step[foreach]", dict(foreach=True)), ("adamw_step[fused]", dict(fused=True))):
        opt = torch.optim.AdamW([p], lr=2e-5, weight_decay=1e-2, **kw)
        report(name, f"{n} (1 tensor)", 7 * n * 4, time_ms(opt.step))


if __name__ == "__main__":
    main()
