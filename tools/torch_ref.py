#!/usr/bin/env python3
"""Torch reference for the embedding kernels: embedding_bag forward (sum), backward
with sparse gradients, coalesce, and the row-wise AdaGrad update by index_add, on the same GPU and
at the same sizes as `ember selftest --bench`. Bytes per pass: B*D*4 + B*L*D*4 (outputs plus rows read)."""
import argparse, math, sys
import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=65536)
p.add_argument("--bag-size", type=int, default=20)
p.add_argument("--rows", type=int, default=4_000_000)
p.add_argument("--iters", type=int, default=20)
p.add_argument("--md", default=None)
a = p.parse_args()

dev = torch.device("cuda")
B, L, R = a.batch_size, a.bag_size, a.rows
out = [f"Torch {torch.__version__} reference on {torch.cuda.get_device_name(0)}: B={B}, L={L}, rows={R}\n",
       "| D | ids | forward ms | forward GB/s | bwd + coalesce + row-wise AdaGrad ms | bwd GB/s |", "|---|---|---|---|---|---|"]

def zipf_ids(n, rows, s, g):
    # inverse CDF on ranks, scattered over the table
    ranks = torch.arange(1, rows + 1, device=dev, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-s), 0)
    u = torch.rand(n, device=dev, dtype=torch.float64, generator=g) * cdf[-1]
    r = torch.searchsorted(cdf, u).clamp_(max=rows - 1)
    return (r * 2654435761 + 12345) % rows

def timeit(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters

g = torch.Generator(device=dev); g.manual_seed(7)
for D in (64, 128):
    W = (torch.rand(R, D, device=dev) - 0.5)
    v = torch.zeros(R, device=dev)
    for dist in ("uniform", "zipf 1.05"):
        n = B * L
        ids = torch.randint(0, R, (n,), device=dev, generator=g) if dist == "uniform" else zipf_ids(n, R, 1.05, g)
        offsets = torch.arange(0, n, L, device=dev)
        grad_out = (torch.rand(B, D, device=dev) - 0.5) * 1e-3
        Wp = torch.nn.Parameter(W)

        def fwd():
            return F.embedding_bag(ids, Wp, offsets, mode="sum")

        def bwd():
            Wp.grad = None
            o = F.embedding_bag(ids, Wp, offsets, mode="sum", sparse=True)
            o.backward(grad_out)
            gr = Wp.grad.coalesce()
            idx = gr.indices()[0]
            val = gr.values()
            with torch.no_grad():
                v.index_add_(0, idx, (val * val).mean(1))
                rate = 0.01 / (v[idx].sqrt() + 1e-8)
                Wp.data.index_add_(0, idx, -rate[:, None] * val)

        tf = timeit(fwd, a.iters)
        tb = timeit(bwd, a.iters)   # includes a forward, as torch needs one to backprop
        by = B * D * 4 + B * L * D * 4
        out.append(f"| {D} | {dist} | {tf:.3f} | {by / tf / 1e6:.0f} | {tb:.3f} | {by / tb / 1e6:.0f} |")
    del W, v
    torch.cuda.empty_cache()

text = "\n".join(out) + "\n\nThe torch backward column includes the forward pass autograd needs.\n"
print(text)
if a.md:
    open(a.md, "w").write(text)
