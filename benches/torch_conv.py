"""cuDNN reference for sdlora's convolutions (src/bench/conv.rs): F.conv2d in bf16, channels_last, forward
(with bias) and input gradient (aten.convolution_backward, input mask only), at the same shapes, timed with CUDA
events around 50 back-to-back calls captured in a CUDA graph (median of 11).

Fused shapes have no cuDNN counterpart: for `+up` torch convolves the already-upsampled tensor and for `a+b`
the already-concatenated one (the upsample / concat copies are NOT timed: a conservative comparison for sdlora).

Usage (on the GPU machine, in the same call as sdlora's bench):
    sdlora bench kernels --filter conv > ours.txt
    python3 benches/torch_conv.py --ours ours.txt          # prints a markdown table: ours vs torch
"""
import argparse, json, re
import torch, torch.nn.functional as F

DT = torch.bfloat16
# (batch, conv input size, c1, c2, cout, kernel, stride, upsample): keep in sync with src/bench/conv.rs SHAPES
SHAPES = [
    (1, 64, 4, 0, 320, 3, 1, False), (1, 64, 320, 0, 320, 3, 1, False), (2, 64, 320, 0, 320, 3, 1, False),
    (1, 64, 320, 0, 320, 3, 2, False), (1, 32, 320, 0, 640, 3, 1, False), (1, 32, 640, 0, 640, 3, 1, False),
    (1, 32, 640, 0, 640, 3, 2, False), (1, 16, 640, 0, 1280, 3, 1, False), (1, 16, 1280, 0, 1280, 3, 1, False),
    (1, 16, 1280, 0, 1280, 3, 2, False), (1, 8, 1280, 0, 1280, 3, 1, False), (1, 8, 1280, 1280, 1280, 3, 1, False),
    (1, 16, 1280, 1280, 1280, 3, 1, False), (1, 16, 1280, 640, 1280, 3, 1, False), (1, 32, 1280, 640, 640, 3, 1, False),
    (1, 32, 640, 640, 640, 3, 1, False), (1, 32, 640, 320, 640, 3, 1, False), (1, 64, 640, 320, 320, 3, 1, False),
    (1, 64, 320, 320, 320, 3, 1, False), (1, 16, 1280, 0, 1280, 3, 1, True), (1, 32, 1280, 0, 1280, 3, 1, True),
    (1, 64, 640, 0, 640, 3, 1, True), (1, 32, 320, 0, 640, 1, 1, False), (1, 16, 640, 0, 1280, 1, 1, False),
    (1, 8, 1280, 1280, 1280, 1, 1, False), (1, 32, 1280, 640, 640, 1, 1, False), (1, 64, 640, 320, 320, 1, 1, False),
    (1, 64, 320, 0, 4, 3, 1, False),
]


def shape_name(b, hw, c1, c2, cout, k, st, up):
    cin = f"{c1}+{c2}" if c2 else str(c1)
    return f"b{b}_{hw}x{hw}_{cin}->{cout}_k{k}s{st}" + ("+up" if up else "")


def bench(fn, n=11, inner=50):
    st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(st); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner): fn()
    g.replay(); torch.cuda.synchronize(); ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / inner)
    ts.sort(); return ts[len(ts) // 2]


def torch_rows():
    rows = {}
    for (b, hw, c1, c2, co, k, st, up) in SHAPES:
        ci, p = c1 + c2, k // 2
        x = torch.randn(b, ci, hw, hw, device="cuda", dtype=DT).to(memory_format=torch.channels_last)
        w = torch.randn(co, ci, k, k, device="cuda", dtype=DT).to(memory_format=torch.channels_last)
        bias = torch.randn(co, device="cuda", dtype=DT)
        y = F.conv2d(x, w, bias, padding=p, stride=st); dy = torch.randn_like(y)
        f = bench(lambda: F.conv2d(x, w, bias, padding=p, stride=st))
        bw = bench(lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [st, st], [p, p], [1, 1], False, [0, 0], 1, [True, False, False]))
        ho = (hw + 2 * p - k) // st + 1
        fl = 2 * b * ho * ho * co * ci * k * k / 1e12
        rows[shape_name(b, hw, c1, c2, co, k, st, up)] = dict(fwd_ms=f, fwd_tflops=fl / f * 1e3, bwd_ms=bw, bwd_tflops=fl / bw * 1e3)
    return rows


def our_rows(path):
    """Parses `sdlora bench kernels` lines: kernel shape median min max rate unit."""
    ours = {}
    for line in open(path):
        f = line.split()
        if len(f) >= 7 and f[0] in ("conv_fwd", "conv_bwd_input") and re.match(r"^[0-9.]+$", f[2]):
            ours[(f[0], f[1])] = (float(f[2]), float(f[5]))
    return ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="output of `sdlora bench kernels --filter conv`")
    a = ap.parse_args()
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
    t = torch_rows()
    if not a.ours:
        for k, v in t.items(): print(json.dumps({"shape": k, **{kk: round(vv, 4) for kk, vv in v.items()}}))
        return
    o = our_rows(a.ours)
    print("| shape | ours fwd µs | cuDNN fwd µs | ours TFLOP/s | cuDNN TFLOP/s | fwd ours/cuDNN | ours dx µs | cuDNN dx µs | ours dx TFLOP/s | cuDNN dx TFLOP/s | dx ours/cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in t.items():
        of, ob = o.get(("conv_fwd", name)), o.get(("conv_bwd_input", name))
        if not of or not ob:
            print(f"| {name} | missing in our bench | | | | | | | | | |"); continue
        print(f"| {name} | {of[0]*1e3:.1f} | {r['fwd_ms']*1e3:.1f} | {of[1]:.0f} | {r['fwd_tflops']:.0f} | {r['fwd_ms']/of[0]:.2f} "
              f"| {ob[0]*1e3:.1f} | {r['bwd_ms']*1e3:.1f} | {ob[1]:.0f} | {r['bwd_tflops']:.0f} | {r['bwd_ms']/ob[0]:.2f} |")


if __name__ == "__main__":
    main()
