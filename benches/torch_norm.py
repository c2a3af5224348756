"""PyTorch reference timings for src/bench/norm.rs: F.group_norm and F.layer_norm in bf16, forward and
input-gradient backward (weights frozen: autograd.grad w.r.t. the input only; the backward is timed
as forward + backward, from which the forward is subtracted in benches/RESULTS.md), at the same shapes, plus a device copy for the bandwidth
floor. Each op twice: per call inside a CUDA graph of 20 calls (pure GPU time, comparable with our
rows without a suffix) and eagerly (`[eager]`: CUDA events around each call from Python, 10 warm-up, 100 timed, median). GroupNorm is timed on a channels_last
NCHW tensor (what our NHWC layout corresponds to) and on a contiguous NCHW one (torch's native layout).

    python3 benches/torch_norm.py            # the shapes of `sdlora bench kernels --filter norm`
    python3 benches/torch_norm.py --dram     # those of `--filter norm_dram`
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


def time_graph(fn, calls=20):
    """Per-call ms of fn replayed in a CUDA graph of `calls` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return tuple(v / calls for v in time_ms(graph.replay, 3, 30))


def both(kernel, shape, bytes_moved, fn):
    try:
        report(kernel, shape, bytes_moved, time_graph(fn))
    except RuntimeError as e:  # keep the eager number when an op cannot be captured
        print(f"torch {kernel:<28} {shape:<20} graph capture failed: {str(e).splitlines()[0]}")
    report(kernel + "[eager]", shape, bytes_moved, time_ms(fn))


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
        both("copy", f"{mib} MiB", 2 * (mib << 20), lambda: b.copy_(a))
    bf = torch.bfloat16
    grad = torch.autograd.grad

    def rnd(*shape):  # host RNG: keeps the CUDA generator out of the captures
        return torch.randn(*shape).to(dev, bf)

    for n, hw, c in [(1, 4096, 320), (1, 1024, 640), (1, 256, 1280), (1, 64, 1280), (1, 4096, 960), (1, 1024, 1920),
                     (1, 256, 2560), (2, 4096, 320), (2, 4096, 640)]:
        side = int(hw ** 0.5)
        w, b = rnd(c), rnd(c)
        nbytes = n * hw * c * 2
        for layout, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
            x = rnd(n, c, side, side).contiguous(memory_format=fmt).requires_grad_(True)
            dy = rnd(n, c, side, side).contiguous(memory_format=fmt)
            shape = f"{n}x{hw}x{c}"
            gn = lambda: F.group_norm(x, 32, w, b, 1e-5)
            gn_silu = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))
            both(f"group_norm_fwd[{layout}]", shape, 2 * nbytes, gn)
            both(f"group_norm_silu_fwd[{layout}]", shape, 2 * nbytes, gn_silu)
            both(f"group_norm_fwd+bwd[{layout}]", shape, 5 * nbytes, lambda: grad(gn(), x, dy))
            both(f"group_norm_silu_fwd+bwd[{layout}]", shape, 5 * nbytes, lambda: grad(gn_silu(), x, dy))
    for r, c in [(4096, 320), (1024, 640), (256, 1280), (64, 1280), (77, 768), (8192, 320)]:
        x = rnd(r, c).requires_grad_(True)
        dy = rnd(r, c)
        w, b = rnd(c), rnd(c)
        ln = lambda: F.layer_norm(x, (c,), w, b, 1e-5)
        both("layer_norm_fwd", f"{r}x{c}", 2 * r * c * 2, ln)
        both("layer_norm_fwd+bwd", f"{r}x{c}", 5 * r * c * 2, lambda: grad(ln(), x, dy))
    # GEGLU as diffusers computes it (chunk, gelu, multiply), forward and forward + input grad.
    x = rnd(4096, 2560).requires_grad_(True)
    dy = rnd(4096, 1280)
    geglu = lambda: (lambda h, g: h * F.gelu(g))(*x.chunk(2, dim=-1))
    both("geglu_fwd", "4096x2560", 3 * 4096 * 1280 * 2, geglu)
    both("geglu_fwd+bwd", "4096x2560", 8 * 4096 * 1280 * 2, lambda: grad(geglu(), x, dy))
    n = 25_509_888
    p = torch.nn.Parameter(torch.randn(n).to(dev))
    p.grad = torch.randn(n).to(dev)
    for name, kw in (("adamw_step[foreach]", dict(foreach=True)), ("adamw_step[fused]", dict(fused=True))):
        opt = torch.optim.AdamW([p], lr=2e-5, weight_decay=1e-2, **kw)
        report(name, f"{n} (1 tensor)", 7 * n * 4, time_ms(opt.step))


def main_dram():
    """The shapes of src/bench/norm.rs `bench_dram` (sdlora bench kernels --filter norm_dram): the VAE's
    GroupNorms at 512 px, a 4-image batch of 1024 px latents, LayerNorm over 1024 px tokens; graph timing."""
    dev = "cuda"
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    bf = torch.bfloat16
    grad = torch.autograd.grad

    def rnd(*shape):
        return torch.randn(*shape).to(dev, bf)

    a = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    report("copy", "256 MiB", 2 * (256 << 20), time_graph(lambda: b.copy_(a)))
    del a, b
    for n, hw, c, backward in [(1, 16384, 512, False), (1, 65536, 256, False), (1, 65536, 512, False),
                               (1, 262144, 128, False), (1, 262144, 256, False), (4, 16384, 320, True)]:
        side = int(hw ** 0.5)
        w, b = rnd(c), rnd(c)
        nbytes = n * hw * c * 2
        shape = f"{n}x{hw}x{c}"
        for layout, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
            x = rnd(n, c, side, side).contiguous(memory_format=fmt).requires_grad_(backward)
            gn = lambda: F.group_norm(x, 32, w, b, 1e-6)
            report(f"group_norm_fwd[{layout}]", shape, 2 * nbytes, time_graph(gn))
            report(f"group_norm_silu_fwd[{layout}]", shape, 2 * nbytes, time_graph(lambda: F.silu(gn())))
            if backward:
                dy = rnd(n, c, side, side).contiguous(memory_format=fmt)
                report(f"group_norm_fwd+bwd[{layout}]", shape, 5 * nbytes, time_graph(lambda: grad(gn(), x, dy)))
            del x
    for r, c in [(32768, 320), (65536, 320)]:
        x = rnd(r, c).requires_grad_(True)
        dy = rnd(r, c)
        w, b = rnd(c), rnd(c)
        ln = lambda: F.layer_norm(x, (c,), w, b, 1e-5)
        report("layer_norm_fwd", f"{r}x{c}", 2 * r * c * 2, time_graph(ln))
        report("layer_norm_fwd+bwd", f"{r}x{c}", 5 * r * c * 2, time_graph(lambda: grad(ln(), x, dy)))


if __name__ == "__main__":
    import sys
    main_dram() if "--dram" in sys.argv[1:] else main()
