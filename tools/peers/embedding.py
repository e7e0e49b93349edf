"""The `ember bench embedding` workload on the peers, with the same columns.

  python embedding.py --impl torch    # nn.EmbeddingBag(sparse=True) + row-wise AdaGrad in torch
  python embedding.py --impl fbgemm   # FBGEMM's CPU table-batched embedding, fused row-wise AdaGrad

Workload (the defaults match `ember bench embedding`): 8 tables x 1M rows x dim 64, batch 4096,
20 ids per bag, sum pooling, ids uniform or Zipf(1.05) over ranks scattered by a hash, 4 id sets
rotated, 3 warm-up steps, median of 20 timed steps, 2 threads. Row-wise AdaGrad as Ember runs it:
lr 0.01, eps 1e-8 outside the root, state += mean(g^2) over the row, w -= lr g / (sqrt(state) + eps).
With --gather-gb-per-s (the 2-thread 256-byte gather rate of `ember bench mem`) it also prints the
fused-backward floor and backward / floor, as `ember bench embedding` does.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def ids_sets(a, rng):
    """4 id sets: per set, per table, batch*bag ids (bag-major)."""
    n = a.batch_size * a.bag_size
    if a.zipf:
        ranks = min(a.rows, 1 << 22)
        cdf = np.cumsum(np.arange(1, ranks + 1, dtype=np.float64) ** -a.zipf)
        cdf /= cdf[-1]
    sets = []
    for _ in range(4):
        tabs = []
        for t in range(a.tables):
            if a.zipf:
                r = np.searchsorted(cdf, rng.random(n)).astype(np.uint64)
                # Scatter ranks over rows (a fixed odd multiplier and a per-table salt).
                with np.errstate(over="ignore"):
                    h = (r ^ np.uint64(t)) * np.uint64(0x9E3779B97F4A7C15)
                    h ^= h >> np.uint64(29)
                ids = (h % np.uint64(a.rows)).astype(np.int64)
            else:
                ids = rng.integers(0, a.rows, n, dtype=np.int64)
            tabs.append(ids)
        sets.append(tabs)
    return sets


def unique_rows(sets):
    return statistics.fmean(sum(len(np.unique(ids)) for ids in s) for s in sets)


class TorchRowwise:
    """nn.EmbeddingBag per table with sparse gradients, then row-wise AdaGrad on the
    coalesced sparse gradient (torch ops, in place)."""

    def __init__(self, a):
        self.a = a
        self.bags = [torch.nn.EmbeddingBag(a.rows, a.dim, mode="sum", sparse=True) for _ in range(a.tables)]
        for e in self.bags:
            torch.nn.init.uniform_(e.weight, -0.01, 0.01)
        self.state = [torch.zeros(a.rows) for _ in range(a.tables)]
        self.offsets = torch.arange(0, a.batch_size * a.bag_size, a.bag_size, dtype=torch.int64)

    def prepare(self, tabs):
        return [torch.from_numpy(ids) for ids in tabs]

    def forward(self, inp):
        return torch.cat([e(ids, self.offsets) for e, ids in zip(self.bags, inp)], dim=1)

    def backward(self, out, grad):
        out.backward(grad)
        with torch.no_grad():
            for e, st in zip(self.bags, self.state):
                g = e.weight.grad.coalesce()
                rows, vals = g.indices()[0], g.values()
                s = st.index_select(0, rows) + vals.pow(2).mean(dim=1)
                st.index_copy_(0, rows, s)
                e.weight.index_add_(0, rows, vals * (-self.a.lr / (s.sqrt() + self.a.eps)).unsqueeze(1))
                e.weight.grad = None


class FbgemmTbe:
    """FBGEMM's CPU table-batched embedding bags, row-wise AdaGrad fused into the backward."""

    def __init__(self, a):
        import fbgemm_gpu  # noqa: F401  (registers the ops)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        self.a = a
        specs = [(a.rows, a.dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for _ in range(a.tables)]
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            specs,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=a.lr,
            eps=a.eps,
            pooling_mode=PoolingMode.SUM,
        )

    def prepare(self, tabs):
        a = self.a
        idx = torch.from_numpy(np.concatenate(tabs))
        offs = torch.arange(0, a.tables * a.batch_size * a.bag_size + 1, a.bag_size, dtype=torch.int64)
        return idx, offs

    def forward(self, inp):
        return self.tbe(inp[0], inp[1])

    def backward(self, out, grad):
        out.backward(grad)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["torch", "fbgemm"], required=True)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--bag-size", type=int, default=20)
    p.add_argument("--zipf", type=float, nargs="?", const=1.05, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gather-gb-per-s", type=float, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    a.lr, a.eps = 0.01, 1e-8
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    sets = ids_sets(a, rng)
    u = unique_rows(sets)
    try:
        impl = TorchRowwise(a) if a.impl == "torch" else FbgemmTbe(a)
    except ImportError as e:
        print(f"# peers: {a.impl} skipped ({e})")
        return 0
    inputs = [impl.prepare(s) for s in sets]
    grad = (torch.rand(a.batch_size, a.tables * a.dim) - 0.5) * 1e-3
    fwd, bwd, tot = [], [], []
    for it in range(a.warmup + a.steps):
        inp = inputs[it % len(inputs)]
        t0 = time.perf_counter()
        out = impl.forward(inp)
        t1 = time.perf_counter()
        impl.backward(out, grad)
        t2 = time.perf_counter()
        if it >= a.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            tot.append((t2 - t0) * 1e3)
    B, F, D, L = a.batch_size, a.tables, a.dim, a.bag_size
    ms = statistics.median(tot)
    fms, bms = statistics.median(fwd), statistics.median(bwd)
    nbytes = 2.0 * (B * F * D * 4 + B * F * D * L * 4)
    floor_bytes = u * (2 * D * 4 + 2 * 4) + B * F * D * 4 + B * F * L * 8
    name = {"torch": f"torch {torch.__version__} EmbeddingBag", "fbgemm": "fbgemm-gpu-cpu TBE"}[a.impl]
    print(f"# {name}: {F} tables x {a.rows} rows x dim {D}, batch {B}, {L} ids/bag, "
          f"{'zipf' if a.zipf else 'uniform'} ids, rowwise-adagrad, {a.threads} threads")
    print(f"# median of {a.steps} steps after {a.warmup} warm-up")
    print(f"{'ms/step':>12} {'fwd ms':>12} {'bwd+opt ms':>12} {'steps/s':>12} {'GB/s':>10}")
    print(f"{ms:12.2f} {fms:12.2f} {bms:12.2f} {1e3 / ms:12.2f} {nbytes / (ms * 1e-3) / 1e9:10.2f}")
    res = {"impl": a.impl, "torch": torch.__version__, "ms_per_step": ms, "steps_per_s": 1e3 / ms,
           "forward_ms": fms, "backward_ms": bms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9,
           "unique_rows": u, "floor_bytes": floor_bytes, "zipf": a.zipf}
    line = f"# unique rows U {u:.0f}; fused-backward floor {floor_bytes / 1e6:.1f} MB"
    if a.gather_gb_per_s:
        floor_ms = floor_bytes / (a.gather_gb_per_s * 1e9) * 1e3
        res.update(floor_ms=floor_ms, backward_over_floor=bms / floor_ms, gather_gb_per_s=a.gather_gb_per_s)
        line += f" / {a.gather_gb_per_s:.2f} GB/s = {floor_ms:.2f} ms; backward / floor {bms / floor_ms:.2f}"
    print(line)
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
