# Writes the small TorchRec/MLPerf-layout files beside this script with NumPy (run once; the
# outputs are committed, and tests/tests/data_npy.rs recomputes every value from the same
# formulas). Layouts: TorchRec torchrec/datasets/criteo.py (tsv_to_npys: dense float32 [N, 13]
# = ln(x + 3), sparse int32 [N, 26], labels int32 [N, 1]) and MLPerf DLRMv2
# materialize_synthetic_multihot_dataset.py (np.savez of members "0".."25", int32 [N, size_f]).
import numpy as np

MULTI_HOT = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
for day, n in [(0, 5), (1, 3)]:
    i = np.arange(n, dtype=np.int64)[:, None]
    dense = np.log((day * 100 + i * 13 + np.arange(13)[None, :]) + 3, dtype=np.float32)
    f = np.arange(26, dtype=np.int64)[None, :]
    sparse = ((day * 7 + i) * 1000003 + f * 7919) * np.where((i + f) % 3 == 0, -1, 1)
    labels = ((day + i) % 2).astype(np.int32).reshape(-1, 1)
    np.save(f"day_{day}_dense.npy", dense.astype(np.float32))
    np.save(f"day_{day}_sparse.npy", sparse.astype(np.int32))
    np.save(f"day_{day}_labels.npy", labels)
    members = {}
    for k, h in enumerate(MULTI_HOT):
        j = np.arange(h, dtype=np.int64)[None, :]
        members[str(k)] = ((day * 7 + i) * 31 + k * 1009 + j * 65537).astype(np.int32)
    np.savez(f"day_{day}_sparse_multi_hot.npz", **members)
