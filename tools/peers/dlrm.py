"""The `ember bench dlrm` model trained by TorchRec on the CPU, with the same columns.

  python dlrm.py --json                                    # 1 rank, 2 threads
  python -m torch.distributed.run --nproc-per-node 2 dlrm.py --threads 1 --json   # 2 ranks x 1 thread

Model (the defaults match `ember bench dlrm`): 8 tables x 1M rows x dim 64, 20 ids per bag (sum
pooling), 13 dense features, bottom MLP 13-512-256-64, dot interaction (TorchRec's DLRM: the 36
pairs of the 9 vectors beside the dense one: 100 inputs), top MLP 512-256-1, BCE loss; global
batch 4096 split evenly over the ranks; uniform ids, random dense features and labels, 4 batches
rotated. Embeddings: TorchRec's DistributedModelParallel on the CPU (gloo), FBGEMM's CPU
table-batched kernel with its fused row-wise AdaGrad (lr 0.01, eps 1e-8); dense: Adagrad (lr 0.01,
eps 1e-8). 3 warm-up steps, the median of 20 timed steps (rank 0 prints; samples/s = global batch /
median step time).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--bag-size", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.models.dlrm import DLRM
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if a.batch_size % world:
        sys.exit(f"dlrm.py: global batch {a.batch_size} does not split over {world} ranks")
    b = a.batch_size // world
    dev = torch.device("cpu")

    tables = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=a.dim, num_embeddings=a.rows, feature_names=[f"f{t}"]) for t in range(a.tables)]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[512, 256, a.dim], over_arch_layer_sizes=[512, 256, 1], dense_device=dev)
    # The fused row-wise AdaGrad of FBGEMM's table-batched kernel, applied in the backward.
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.01, "eps": 1e-8})
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=dev, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.Adagrad(ps, lr=0.01, eps=1e-8))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    loss_fn = torch.nn.BCEWithLogitsLoss()

    g = torch.Generator().manual_seed(1 + rank)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, a.rows, (a.tables * b * a.bag_size,), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{t}" for t in range(a.tables)], values=ids, lengths=torch.full((a.tables * b,), a.bag_size, dtype=torch.int32))
        batches.append((torch.rand(b, 13, generator=g), kjt, torch.randint(0, 2, (b,), generator=g).float()))

    times = []
    for i in range(a.warmup + a.steps):
        dense_x, kjt, y = batches[i % 4]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = dmp(dense_x, kjt).squeeze(-1)
        loss = loss_fn(logits, y)
        loss.backward()
        opt.step()
        dist.barrier()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    # The slowest rank's median (the step ends when every rank's does: the barrier above).
    med = torch.tensor([statistics.median(times)])
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    ms = med.item() * 1e3
    if rank == 0:
        row = {"impl": "torchrec", "ranks": world, "threads": a.threads, "batch_size": a.batch_size, "ms_per_step": ms, "samples_per_s": a.batch_size / (ms / 1e3), "loss": loss.item()}
        if a.json:
            print(json.dumps(row))
        else:
            print(f"torchrec DLRM: {world} rank(s) x {a.threads} thread(s), batch {a.batch_size}: {ms:.1f} ms/step, {row['samples_per_s']:.0f} samples/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
