"""PyTorch reference timings for src/bench/norm.rs: F.group_norm and F.layer_norm in bf16, forward and
input-gradient backward (weights frozen: aten's native_*_norm_backward with only the input grad, the
kernels autograd runs), at the same shapes, plus a device copy for the bandwidth
floor. Each op twice: per call inside a CUDA graph of 20 calls (pure GPU time, comparable with our
rows without a suffix) and eagerly (`[eager]`: CUDA events around each call from Python, 10 warm-up, 100 timed, median). GroupNorm is timed on a channels_last
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
    gn_bwd = torch.ops.aten.native_group_norm_backward  # what autograd runs for F.group_norm's input grad
    ln_bwd = torch.ops.aten.native_layer_norm_backward
    for n, hw, c in [(1, 4096, 320), (1, 1024, 640), (1, 256, 1280), (1, 64, 1280), (1, 4096, 960), (1, 1024, 1920),
                     (1, 256, 2560), (2, 4096, 320), (2, 4096, 640)]:
        side = int(hw ** 0.5)
        w, b = torch.randn(c, device=dev, dtype=bf), torch.randn(c, device=dev, dtype=bf)
        nbytes = n * hw * c * 2
        for layout, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
            x = torch.randn(n, c, side, side, device=dev, dtype=bf).contiguous(memory_format=fmt)
            dy = torch.randn(n, c, side, side, device=dev, dtype=bf).contiguous(memory_format=fmt)
            h, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, n, c, hw, 32, 1e-5)
            mask = [True, False, False]
            shape = f"{n}x{hw}x{c}"
            both(f"group_norm_fwd[{layout}]", shape, 2 * nbytes, lambda: F.group_norm(x, 32, w, b, 1e-5))
            both(f"group_norm_silu_fwd[{layout}]", shape, 2 * nbytes, lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)))
            both(f"group_norm_bwd[{layout}]", shape, 3 * nbytes, lambda: gn_bwd(dy, x, mean, rstd, w, n, c, hw, 32, mask))
            both(f"group_norm_silu_bwd[{layout}]", shape, 3 * nbytes,
                 lambda: gn_bwd(torch.ops.aten.silu_backward(dy, h), x, mean, rstd, w, n, c, hw, 32, mask))
    for r, c in [(4096, 320), (1024, 640), (256, 1280), (64, 1280), (77, 768), (8192, 320)]:
        x = torch.randn(r, c, device=dev, dtype=bf)
        dy = torch.randn(r, c, device=dev, dtype=bf)
        w, b = torch.randn(c, device=dev, dtype=bf), torch.randn(c, device=dev, dtype=bf)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, (c,), w, b, 1e-5)
        both("layer_norm_fwd", f"{r}x{c}", 2 * r * c * 2, lambda: F.layer_norm(x, (c,), w, b, 1e-5))
        both("layer_norm_bwd", f"{r}x{c}", 3 * r * c * 2, lambda: ln_bwd(dy, x, (c,), mean, rstd, w, b, [True, False, False]))
    # GEGLU as diffusers computes it, and the ops autograd runs for its input grad.
    x = torch.randn(4096, 2560, device=dev, dtype=bf)
    dy = torch.randn(4096, 1280, device=dev, dtype=bf)
    hid, gate = x.chunk(2, dim=-1)
    gg = F.gelu(gate)
    both("geglu_fwd", "4096x2560", 3 * 4096 * 1280 * 2, lambda: hid * F.gelu(gate))
    both("geglu_bwd", "4096x2560", 5 * 4096 * 1280 * 2, lambda: (dy * gg, torch.ops.aten.gelu_backward(dy * hid, gate)))
    n = 25_509_888
    p = torch.nn.Parameter(torch.randn(n, device=dev))
    p.grad = torch.randn(n, device=dev)
    for name, kw in (("adamw_step[foreach]", dict(foreach=True)), ("adamw_step[fused]", dict(fused=True))):
        opt = torch.optim.AdamW([p], lr=2e-5, weight_decay=1e-2, **kw)
        report(name, f"{n} (1 tensor)", 7 * n * 4, time_ms(opt.step))


if __name__ == "__main__":
    main()
