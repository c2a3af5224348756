#!/usr/bin/env python3
"""PyTorch reference for `sdlora bench kernels --filter linear|lora` (src/bench/gemm.rs).

Times, on the same GPU and the same shapes, with CUDA events (median over reps, each rep bracketed
by its own pair of events, after warm-up). Like src/bench/gemm.rs, the reps are queued behind a
spin kernel so that the events measure GPU time, not the host's launch latency:
  torch_linear          F.linear(x, W) in bf16 (cuBLAS)
  torch_linear_graph    the same replayed from a CUDA graph (a check on the above)
  torch_linear_input_grad  dy·W (torch.matmul), the input gradient of a frozen linear
  torch_lora_fwd_bwd    the unfused LoRA linear as PEFT runs it, bf16, forward + backward:
                        y = F.linear(x, W, b) + F.linear(F.linear(x, A), B) * scale; y.backward(dy)
                        (W, b frozen; grads for x, A, B; A/B grads accumulate)
  torch_lora_fwd_bwd_eager  the same, not queued: what eager PyTorch takes with its host overhead
  torch_lora_fwd_bwd_graph  the same captured in a CUDA graph
  torch_lora_fwd        the forward alone (no_grad)
Prints one row per measurement: kernel, shape, median ms, TFLOP/s.

Usage: python3 benches/torch_gemm.py [--reps 100]
"""
import argparse

import torch
import torch.nn.functional as F

LINEAR_SHAPES = [
    (4096, 320, 320), (4096, 320, 2560), (8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320),
    (1024, 640, 5120), (2048, 640, 640), (2048, 640, 5120), (2048, 2560, 640), (512, 1280, 1280),
    (512, 1280, 10240), (512, 5120, 1280), (128, 1280, 1280), (64, 1280, 1280), (154, 768, 320),
    (154, 768, 1280), (2, 1280, 1280),
]
LORA_SHAPES = [
    (4096, 320, 320), (8192, 320, 320), (1024, 640, 640), (2048, 640, 640), (512, 1280, 1280),
    (128, 1280, 1280), (154, 768, 320), (154, 768, 640), (154, 768, 1280),
]
RANK = 128
SPIN = 40_000_000  # clock cycles (~20 ms) to queue the timed reps behind


def time_events(fn, warmup, reps, spin=0):
    """Median ms of fn over reps. spin > 0: queue the reps behind torch.cuda._sleep(spin) (clock
    cycles), so each event pair measures GPU time only, without the host's launch latency."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if spin:
        torch.cuda._sleep(spin)
    events = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in events)
    return ms[len(ms) // 2]


def graphed(fn, inner=10):
    """A CUDA graph of `inner` calls of fn; returns a callable replaying it (time / inner per call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return g.replay, inner


def row(kernel, shape, ms, flop):
    print(f"{kernel:<28} {shape:<28} {ms:>10.4f} {flop / ms / 1e9:>8.1f} TFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bf = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    for m, k, n in LINEAR_SHAPES:
        x = torch.randn(m, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf) * k ** -0.5
        flop = 2.0 * m * k * n
        shape = f"{m}x{k}->{n}"
        row("torch_linear", shape, time_events(lambda: F.linear(x, w), 10, args.reps, SPIN), flop)
        replay, inner = graphed(lambda: F.linear(x, w))
        row("torch_linear_graph", shape, time_events(replay, 3, max(10, args.reps // 5)) / inner, flop)
        dy = torch.randn(m, n, device=dev, dtype=bf)
        row("torch_linear_input_grad", shape, time_events(lambda: torch.matmul(dy, w), 10, args.reps, SPIN), flop)

    for m, i, o in LORA_SHAPES:
        r, scale = RANK, 1.0
        w = torch.randn(o, i, device=dev, dtype=bf) * i ** -0.5
        b = torch.randn(o, device=dev, dtype=bf)
        a_ = (torch.randn(r, i, device=dev, dtype=bf) * i ** -0.5).requires_grad_()
        b_ = (torch.randn(o, r, device=dev, dtype=bf) * r ** -0.5).requires_grad_()
        x = torch.randn(m, i, device=dev, dtype=bf).requires_grad_()
        dy = torch.randn(m, o, device=dev, dtype=bf)

        def step():
            x.grad = None
            y = F.linear(x, w, b) + F.linear(F.linear(x, a_), b_) * scale
            y.backward(dy)

        fwd = 2.0 * m * (i * r + (i + r) * o)
        bwd = 2.0 * m * (o * r + (o + r) * i + o * r + r * i)
        shape = f"{m}x{i}->{o} r{r}"
        row("torch_lora_fwd_bwd", shape, time_events(step, 10, args.reps, 5 * SPIN), fwd + bwd)
        row("torch_lora_fwd_bwd_eager", shape, time_events(step, 10, args.reps), fwd + bwd)
        try:
            replay, inner = graphed(step, inner=5)
            row("torch_lora_fwd_bwd_graph", shape, time_events(replay, 3, max(10, args.reps // 5)) / inner, fwd + bwd)
        except Exception as e:  # graph capture of autograd can fail on some builds: say so
            print(f"torch_lora_fwd_bwd_graph {shape}: capture failed: {e}")

        def fwd_only():
            with torch.no_grad():
                return F.linear(x, w, b) + F.linear(F.linear(x, a_), b_) * scale

        row("torch_lora_fwd", shape, time_events(fwd_only, 10, args.reps, 2 * SPIN), fwd)


if __name__ == "__main__":
    main()
