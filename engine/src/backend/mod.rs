//! The backend interface, in two traits, after candle's device/storage split:
//!
//! * [`Buffers`] — where buffers live (host memory for `cpu`, device memory for `cuda`) and how
//!   their bytes move: allocation, copies, and what the buffer transports need (addresses,
//!   staging memory, registration with a network endpoint, native collectives);
//! * [`Numerics`] — every numeric operation a training step needs, on those buffers.
//!
//! [`Backend`] is the two together; a new backend implements both, the CPU and CUDA ones side
//! by side in the traits' method order. Embedding operations work on *shards* (a table, a row
//! range, a column range), so the 2D scheduler hands each backend only its local pieces. The
//! CPU backend is the reference every other backend is tested against.
use crate::config::{DenseOptimizer, EmbOptimizer, WeightDecay};
use crate::Result;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod emulated;
pub use cpu::Cpu;
pub use emulated::Emulated;

/// Row-major GEMM: `C[m×n] = alpha · op(A)[m×k] · op(B)[k×n] + beta · C`.
/// `A` is stored (m×k), or (k×m) when `trans_a`; `B` is (k×n), or (n×k) when `trans_b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

/// Which columns of a wider row-major matrix an embedding output (or its gradient) occupies:
/// row `i` of the `cols`-wide block starts at element `i · stride + col`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub stride: usize,
    pub col: usize,
}

/// The product of `dims`, None on overflow (every size a backend checks is computed this way).
pub(crate) fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Bounds of a `gemm` (shared by the backends): A, B and C hold m×k, k×n and m×n floats.
pub(crate) fn check_gemm(g: &Gemm, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
    let fits = |len: usize, x: usize, y: usize| product(&[x, y]).is_some_and(|p| p <= len);
    if fits(a_len, g.m, g.k) && fits(b_len, g.k, g.n) && fits(c_len, g.m, g.n) {
        Ok(())
    } else {
        Err(crate::Error::Input(format!("gemm {}x{}x{}: buffers of {a_len}, {b_len}, {c_len} floats too small", g.m, g.n, g.k)))
    }
}

/// Sizes of a shard's buffers (shared by the backends): weights rows × cols, optimizer state
/// rows × `state_per_row`, as its spec says.
pub(crate) fn check_shard_bufs(what: &str, spec: &ShardSpec, weights: usize, state: Option<(usize, usize)>) -> Result<()> {
    let (rows, cols) = (spec.rows.end.checked_sub(spec.rows.start), spec.cols.end.checked_sub(spec.cols.start));
    let want = rows.and_then(|r| usize::try_from(r).ok()).zip(cols);
    let ok = want.is_some_and(|(r, c)| product(&[r, c]) == Some(weights) && state.map_or(true, |(len, spr)| product(&[r, spr]) == Some(len)));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Input(format!(
            "{what}: shard rows {:?} cols {:?} but {weights} weights{}",
            spec.rows,
            spec.cols,
            state.map_or(String::new(), |(len, spr)| format!(" and {len} state floats ({spr} per row)"))
        )))
    }
}

/// Bounds of the output (or gradient) matrix of `n` pooled bags (shared by the backends):
/// columns `layout.col..+cols` inside the stride, and `n` rows of it inside `buf_len` floats.
pub(crate) fn check_layout(what: &str, n: usize, cols: usize, layout: Layout, buf_len: usize) -> Result<()> {
    let end_col = layout.col.checked_add(cols);
    if !end_col.is_some_and(|e| e <= layout.stride) {
        return Err(crate::Error::Input(format!("{what}: columns {}..+{cols} exceed stride {}", layout.col, layout.stride)));
    }
    let need = if n == 0 { Some(0) } else { product(&[n - 1, layout.stride]).and_then(|x| x.checked_add(end_col?)) };
    if !need.is_some_and(|e| e <= buf_len) {
        return Err(crate::Error::Input(format!("{what}: buffer of {buf_len} floats too small for {n} rows of stride {}", layout.stride)));
    }
    Ok(())
}

/// Bounds of a `copy_2d` (shared by the backends): every row of both blocks inside its buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_copy_2d(src_len: usize, src_off: usize, src_stride: usize, dst_len: usize, dst_off: usize, dst_stride: usize, rows: usize, cols: usize) -> Result<()> {
    let end = |off: usize, stride: usize| off.checked_add(rows.checked_sub(1)?.checked_mul(stride)?)?.checked_add(cols);
    if src_stride >= cols && dst_stride >= cols && end(src_off, src_stride).is_some_and(|e| e <= src_len) && end(dst_off, dst_stride).is_some_and(|e| e <= dst_len) {
        Ok(())
    } else {
        Err(crate::Error::Input(format!("copy_2d: {rows}x{cols} from {src_off} (stride {src_stride}) of {src_len} into {dst_off} (stride {dst_stride}) of {dst_len}")))
    }
}

/// Bounds of a `scale_rows` (shared by the backends): every row of the block inside `x`, one
/// scale per row.
pub(crate) fn check_scale_rows(x_len: usize, off: usize, stride: usize, rows: usize, cols: usize, s_len: usize) -> Result<()> {
    let end = off.checked_add((rows - 1).saturating_mul(stride)).and_then(|e| e.checked_add(cols));
    if stride >= cols && s_len >= rows && end.is_some_and(|e| e <= x_len) {
        Ok(())
    } else {
        Err(crate::Error::Input(format!("scale_rows: {rows}x{cols} at {off} (stride {stride}) of {x_len} with {s_len} scales")))
    }
}

/// Sizes of a `gather_rows`/`put_rows` (shared by the backends): `ids` row indices, as many as
/// `num_rows` says, and their packed block of `num_rows · cols` floats at `off` inside a buffer
/// of `packed_len`. Returns the block's length. The rows themselves are the backend's to check.
pub(crate) fn check_packed_rows(what: &str, ids: usize, num_rows: usize, cols: usize, off: usize, packed_len: usize) -> Result<usize> {
    let n = product(&[num_rows, cols]);
    match n.and_then(|n| Some((n, off.checked_add(n)?))) {
        Some((n, end)) if ids == num_rows && end <= packed_len => Ok(n),
        _ => Err(crate::Error::Input(format!("{what}: {ids} row indices ({num_rows} said) of {cols} floats at {off} of a packed buffer of {packed_len}"))),
    }
}

/// Sizes of a `download_into`/`upload_into` (shared by the backends): host slice and buffer agree.
pub(crate) fn check_same_len(what: &str, buf_len: usize, host_len: usize) -> Result<()> {
    if buf_len == host_len {
        Ok(())
    } else {
        Err(crate::Error::Input(format!("{what}: buffer of {buf_len} floats, host slice of {host_len}")))
    }
}

/// Sizes of a `download_prefix_into`/`upload_prefix_into` (shared by the backends): the host
/// slice no longer than the buffer.
pub(crate) fn check_prefix(what: &str, host_len: usize, buf_len: usize) -> Result<()> {
    if host_len <= buf_len {
        Ok(())
    } else {
        Err(crate::Error::Input(format!("{what}: host slice of {host_len} floats, buffer of {buf_len}")))
    }
}

/// A shard of one embedding table: global rows `rows`, columns `cols` of a `table_rows × dim` table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardSpec {
    pub table: usize,
    pub table_rows: u64,
    pub dim: usize,
    pub rows: std::ops::Range<u64>,
    pub cols: std::ops::Range<usize>,
}

impl ShardSpec {
    /// The whole table as one shard.
    pub fn whole(table: usize, table_rows: u64, dim: usize) -> Self {
        ShardSpec { table, table_rows, dim, rows: 0..table_rows, cols: 0..dim }
    }
    /// Rows of the shard (0 for a reversed range).
    pub fn num_rows(&self) -> usize {
        self.rows.end.saturating_sub(self.rows.start) as usize
    }
    /// Columns of the shard (0 for a reversed range).
    pub fn num_cols(&self) -> usize {
        self.cols.end.saturating_sub(self.cols.start)
    }
}

/// A shard's weights (num_rows × num_cols) and optimizer state
/// (row-wise AdaGrad: num_rows; element-wise AdaGrad: num_rows × num_cols; SGD: empty).
pub struct Shard<B: Buffers + ?Sized> {
    pub spec: ShardSpec,
    pub weights: B::Buf,
    pub state: B::Buf,
}

/// Bags to pool on one shard: ids are *local* rows of the shard; bag `i` is
/// `ids[offsets[i]..offsets[i+1]]` and its pooled vector is `scale[i] · Σ rows` (scale 1 when None;
/// mean pooling passes 1/len of the whole bag, which for row-wise shards spans several ranks).
pub struct Bags<B: Buffers + ?Sized> {
    pub num_bags: usize,
    pub offsets: B::Ids,
    pub ids: B::Ids,
    pub scale: Option<B::Buf>,
}

/// Embedding optimizer with everything resolved (the momentum-scaling constant included).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbUpdate {
    pub kind: EmbKind,
    pub lr: f32,
    pub eps: f32,
    /// Momentum-scaling constant c: the accumulator is read as v / c.
    pub c: f32,
    /// lr / sqrt(v/c + eps) instead of lr / (sqrt(v/c) + eps).
    pub eps_inside: bool,
    /// L2 weight decay: adds `l2 · w` to the summed row gradient.
    pub l2: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbKind {
    Sgd,
    RowWiseAdagrad,
    Adagrad,
}

impl EmbUpdate {
    /// Resolve a config optimizer; `default_c` applies when the config leaves c unset.
    pub fn new(opt: &EmbOptimizer, wd: &WeightDecay, default_c: f32) -> Self {
        let l2 = match wd {
            WeightDecay::None => 0.0,
            WeightDecay::L2 { wd } => *wd,
        };
        match *opt {
            EmbOptimizer::Sgd { lr } => EmbUpdate { kind: EmbKind::Sgd, lr, eps: 0.0, c: 1.0, eps_inside: false, l2 },
            EmbOptimizer::RowWiseAdagrad { lr, eps, c, eps_inside } => {
                EmbUpdate { kind: EmbKind::RowWiseAdagrad, lr, eps, c: c.unwrap_or(default_c), eps_inside, l2 }
            }
            EmbOptimizer::Adagrad { lr, eps, c, eps_inside } => {
                EmbUpdate { kind: EmbKind::Adagrad, lr, eps, c: c.unwrap_or(default_c), eps_inside, l2 }
            }
        }
    }
    /// The step multiplier lr / (sqrt(v/c) + eps) (or the eps-inside form) for accumulator `v`.
    #[inline]
    pub fn rate(&self, v: f32) -> f32 {
        if self.eps_inside {
            self.lr / (v / self.c + self.eps).sqrt()
        } else {
            self.lr / ((v / self.c).sqrt() + self.eps)
        }
    }
    pub fn state_per_row(&self, cols: usize) -> usize {
        match self.kind {
            EmbKind::Sgd => 0,
            EmbKind::RowWiseAdagrad => 1,
            EmbKind::Adagrad => cols,
        }
    }
}

/// Dense optimizer with weight decay resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseUpdate {
    pub opt: DenseOptimizer,
    pub l2: f32,
}

/// Per-unique-row gradients of one shard: the first half of the fused update, used where a row's
/// columns live on several ranks (column-wise shards combine `sq` before `embedding_apply`).
pub struct RowGrads<B: Buffers + ?Sized> {
    /// Unique local rows, ascending.
    pub rows: B::Ids,
    pub num_rows: usize,
    /// (num_rows × shard cols): the summed gradient of each unique row.
    pub grads: B::Buf,
    /// (num_rows): Σ_d g_d² over this shard's columns, L2 term included.
    pub sq: B::Buf,
}

/// Activation applied after a bias add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
}

/// How [`Buffers::sum_from`] adds f32 contributions, always in contribution (rank) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// In f32, as the host transport sums f32 buffers.
    F32Sum,
    /// In f64, divided by the number of contributions, rounded once to f32 (replica sync's mean).
    F64Mean,
}

/// Bytes a backend moved between host and device memory, and inside device memory, as counted
/// by a backend that counts them (the emulated device: [`Buffers::host_device_bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostDeviceBytes {
    /// Host → device: uploads (values, ids).
    pub host_to_device: u64,
    /// Device → host: downloads, and scalars the host reads back (a loss, a row count).
    pub device_to_host: u64,
    /// Device → device: block, row and address copies, and the parts a reduction reads.
    pub device_to_device: u64,
}

impl HostDeviceBytes {
    /// `self − earlier` field by field (the bytes moved since `earlier` was read).
    pub fn since(&self, earlier: &HostDeviceBytes) -> HostDeviceBytes {
        HostDeviceBytes {
            host_to_device: self.host_to_device - earlier.host_to_device,
            device_to_host: self.device_to_host - earlier.device_to_host,
            device_to_device: self.device_to_device - earlier.device_to_device,
        }
    }
    /// Field-by-field sum.
    pub fn plus(&self, o: &HostDeviceBytes) -> HostDeviceBytes {
        HostDeviceBytes {
            host_to_device: self.host_to_device + o.host_to_device,
            device_to_host: self.device_to_host + o.device_to_host,
            device_to_device: self.device_to_device + o.device_to_device,
        }
    }
    /// Every count divided by `k` (per step; `k` of 0 counts as 1).
    pub fn per(&self, k: u64) -> HostDeviceBytes {
        let k = k.max(1);
        HostDeviceBytes { host_to_device: self.host_to_device / k, device_to_host: self.device_to_host / k, device_to_device: self.device_to_device / k }
    }
}

/// Collectives a backend runs natively on its own buffers (NCCL on CUDA), over the ranks of a
/// host communicator (which names the group and carries the setup, e.g. NCCL's unique id).
/// Generic over the buffer type alone, so an implementation needs nothing of the backend that
/// owns it. Counts are in floats, as in `parallel::xfer`.
pub trait NativeColl<Buf>: Send + Sync {
    fn name(&self) -> &'static str;
    fn all_to_all_v(&self, comm: &ember_transport::Comm, send: &Buf, scounts: &[usize], recv: &mut Buf, rcounts: &[usize]) -> Result<()>;
    fn all_gather(&self, comm: &ember_transport::Comm, send: &Buf, recv: &mut Buf) -> Result<()>;
    fn reduce_scatter_sum(&self, comm: &ember_transport::Comm, send: &Buf, recv: &mut Buf) -> Result<()>;
    fn all_reduce_sum(&self, comm: &ember_transport::Comm, buf: &mut Buf) -> Result<()>;
}

/// Buffers and how their bytes move: allocation, copies between host and backend memory and
/// inside it, and what the buffer transports (`parallel::xfer`, replica sync) need to move a
/// buffer between ranks — staging memory, addresses, copies out of a peer's buffer, memory
/// registration with a network endpoint, native collectives. Buffers are flat f32 (`Buf`) or
/// u64 (`Ids`) arrays.
pub trait Buffers: Send + Sync + 'static {
    type Buf: Send + Sync;
    type Ids: Send + Sync;
    /// Host memory for staging this backend's buffers through the host transport: page-locked
    /// (pinned) on CUDA, recycled from a pool (pinning costs milliseconds); a plain vector on the CPU.
    type Staging: std::ops::DerefMut<Target = [f32]> + Send;

    fn name(&self) -> &'static str;

    // ---- allocation and copies ----
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn upload_ids(&self, host: &[u64]) -> Result<Self::Ids>;
    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u64>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Copy `buf` into `out` (exactly `len(buf)` floats), finished when this returns.
    fn download_into(&self, buf: &Self::Buf, out: &mut [f32]) -> Result<()>;
    /// Copy `src` (exactly `len(buf)` floats) into `buf`; `src` may be reused when this returns.
    fn upload_into(&self, src: &[f32], buf: &mut Self::Buf) -> Result<()>;
    /// Copy the first `out.len()` floats of `buf` (at most `len(buf)`) into `out`, finished when
    /// this returns: a staged collective downloads only the part of a buffer it covers. By
    /// default that part is copied into a buffer of its own on the device, then downloaded.
    fn download_prefix_into(&self, buf: &Self::Buf, out: &mut [f32]) -> Result<()> {
        let (n, len) = (out.len(), self.len(buf));
        if n == len {
            return self.download_into(buf, out);
        }
        check_prefix("download_prefix_into", n, len)?;
        let mut part = self.zeros(n)?;
        self.copy_2d(buf, 0, n, &mut part, 0, n, 1, n)?;
        self.download_into(&part, out)
    }
    /// Copy `src` (at most `len(buf)` floats) into the first `src.len()` floats of `buf`; the
    /// rest of `buf` is kept. The mirror of [`download_prefix_into`](Self::download_prefix_into).
    fn upload_prefix_into(&self, src: &[f32], buf: &mut Self::Buf) -> Result<()> {
        let (n, len) = (src.len(), self.len(buf));
        if n == len {
            return self.upload_into(src, buf);
        }
        check_prefix("upload_prefix_into", n, len)?;
        let mut part = self.zeros(n)?;
        self.upload_into(src, &mut part)?;
        self.copy_2d(&part, 0, n, buf, 0, n, 1, n)
    }
    /// Host view of a buffer where the backend keeps it in host memory (zero-copy transports).
    fn host<'a>(&self, _buf: &'a Self::Buf) -> Option<&'a [f32]> {
        None
    }
    fn host_mut<'a>(&self, _buf: &'a mut Self::Buf) -> Option<&'a mut [f32]> {
        None
    }
    /// Wait for all queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Strided block copy: for `i < rows`,
    /// `dst[dst_off + i·dst_stride ..][..cols] = src[src_off + i·src_stride ..][..cols]`
    /// (a contiguous range is one row). The 2D step packs and unpacks its messages with it.
    #[allow(clippy::too_many_arguments)]
    fn copy_2d(&self, src: &Self::Buf, src_off: usize, src_stride: usize, dst: &mut Self::Buf, dst_off: usize, dst_stride: usize, rows: usize, cols: usize) -> Result<()>;
    /// `dst[dst_off + i·cols ..][..cols] = src[rows[i]·cols ..][..cols]` for `i < num_rows`: rows
    /// of a row-major `cols`-wide buffer packed one after another (replica sync packs the rows
    /// it averages). Every row must lie inside `src` and the packed block inside `dst`: checked
    /// (on the device for a device backend), an error writes nothing outside `dst`'s block.
    fn gather_rows(&self, src: &Self::Buf, rows: &Self::Ids, num_rows: usize, cols: usize, dst: &mut Self::Buf, dst_off: usize) -> Result<()>;
    /// The mirror of [`gather_rows`](Self::gather_rows): `dst[rows[i]·cols ..][..cols] =
    /// src[src_off + i·cols ..][..cols]`, packed rows written back. The rows must be strictly
    /// ascending and inside `dst`, the packed block inside `src`: checked before anything is
    /// written (on the device for a device backend).
    fn put_rows(&self, src: &Self::Buf, src_off: usize, rows: &Self::Ids, num_rows: usize, cols: usize, dst: &mut Self::Buf) -> Result<()>;

    // ---- movement between ranks ----
    /// `n` floats of staging memory (contents unspecified).
    fn staging(&self, n: usize) -> Result<Self::Staging>;
    /// Register the staging memory's blocks (pinned host memory on CUDA, pooled) with the
    /// network endpoint of `comm` from now on, so that staged messages register nothing of their
    /// own (RDMA). No-op where staging memory is not pooled (the CPU backend).
    fn register_staging(&self, _comm: &ember_transport::Comm) {}
    /// Register the device memory pool's chunks with the network endpoint of `comm` from now on
    /// (GPUDirect RDMA), so that device buffers register nothing of their own. No-op for host
    /// memory backends.
    fn register_device(&self, _comm: &ember_transport::Comm) {}
    /// Make what a NIC wrote into this backend's memory (GPUDirect RDMA) visible to work queued
    /// from now on; called after a collective whose data the NIC placed. No-op for host memory.
    fn flush_remote_writes(&self) -> Result<()> {
        Ok(())
    }
    /// Address of a buffer's first element in the memory every rank of this process shares
    /// (host address, or device address in the one CUDA context): in-process transports
    /// exchange these so a rank can copy straight out of a peer's buffer.
    fn addr(&self, buf: &Self::Buf) -> u64;
    /// Copy `len` floats from address `src` to address `dst` (see [`addr`](Self::addr)); the
    /// copy is complete when this returns. The buffer transports' copy hook.
    ///
    /// # Safety
    /// `src..+4·len` and `dst..+4·len` must lie in live buffers of this address space that do not
    /// overlap, `src` unchanged and `dst` untouched by others during the call.
    unsafe fn copy_addr(&self, src: u64, dst: u64, len: usize) -> Result<()>;
    /// `out[i] = Σ_p parts[p·len + i]` for `p < n`, added in the order p = 0, 1, ..., n−1 (which
    /// fixes the result bitwise) as `acc` says; complete when this returns. The buffer
    /// transports' reduce hook.
    ///
    /// # Safety
    /// `parts..+4·n·len` and `out..+4·len` must lie in live, non-overlapping buffers of this
    /// address space, unchanged (but for `out`) during the call.
    unsafe fn sum_from(&self, parts: u64, n: usize, len: usize, out: u64, acc: Accumulate) -> Result<()>;
    /// How in-process transports copy this backend's memory between ranks ([`copy_addr`](Self::copy_addr)
    /// as a function that outlives the borrow): the peers path's fabric moves device buffers with it.
    fn direct_copy(&self) -> ember_transport::fabric::DirectCopy;
    /// The backend's native collectives (NCCL on CUDA when built and loadable), if any.
    fn native(&self) -> Option<&dyn NativeColl<Self::Buf>> {
        None
    }

    /// The bytes this backend has moved between host and device so far, where it counts them
    /// (the emulated device backend); None for the others.
    fn host_device_bytes(&self) -> Option<HostDeviceBytes> {
        None
    }

    /// What the calling thread has moved between host and device so far, through any buffers
    /// of this backend's kind, where the backend counts it; None for the others. Attributes
    /// the bytes of work that runs beside other work (replica sync beside the dense update).
    fn thread_host_device_bytes(&self) -> Option<HostDeviceBytes> {
        None
    }
}

/// Every numeric operation a training step needs, on the buffers of [`Buffers`]. The CPU and
/// CUDA implementations list them in this order.
pub trait Numerics: Buffers {
    // ---- dense ----
    fn gemm(&self, g: Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()>;
    /// x (rows × cols) += bias (cols), then the activation, in place.
    fn bias_act(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize, act: Act) -> Result<()>;
    /// dy *= act'(y) where y is the activation's output.
    fn act_backward(&self, y: &Self::Buf, dy: &mut Self::Buf, act: Act) -> Result<()>;
    /// out (cols) = beta · out + Σ_rows x (rows × cols): bias gradients.
    fn col_sum(&self, x: &Self::Buf, rows: usize, cols: usize, beta: f32, out: &mut Self::Buf) -> Result<()>;
    /// Copy a (rows × cols) block into columns `dst.col..dst.col+cols` of a wider matrix,
    /// or back out of it (`to_wide == false`).
    fn copy_block(&self, narrow: &mut Self::Buf, wide: &mut Self::Buf, rows: usize, cols: usize, dst: Layout, to_wide: bool) -> Result<()>;
    /// `x[off + i·stride + j] *= s[i]` for `i < rows`, `j < cols` (per-sample gradient scaling).
    fn scale_rows(&self, x: &mut Self::Buf, off: usize, stride: usize, rows: usize, cols: usize, s: &Self::Buf) -> Result<()>;
    /// y += a · x
    fn axpy(&self, a: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    fn scale(&self, x: &mut Self::Buf, a: f32) -> Result<()>;
    /// DLRM dot interaction. `x` is (batch × (f+1) × d): the dense vector then `f` pooled
    /// embeddings per sample. out (batch × (d + (f+1)f/2)) = [dense, lower-triangle dots].
    fn dot_interaction(&self, x: &Self::Buf, batch: usize, f: usize, d: usize, out: &mut Self::Buf) -> Result<()>;
    /// Gradient of `dot_interaction`: dx from dout.
    fn dot_interaction_backward(&self, x: &Self::Buf, dout: &Self::Buf, batch: usize, f: usize, d: usize, dx: &mut Self::Buf) -> Result<()>;
    /// DCNv2 cross combine: out = x0 ⊙ (uv + bias) + xl, all (rows × cols), bias (cols).
    fn cross_combine(&self, x0: &Self::Buf, uv: &Self::Buf, bias: &Self::Buf, xl: &Self::Buf, rows: usize, cols: usize, out: &mut Self::Buf) -> Result<()>;
    /// Backward of `cross_combine` given dout: duv = dout ⊙ x0; dx0 += dout ⊙ (uv + bias).
    #[allow(clippy::too_many_arguments)]
    fn cross_combine_backward(&self, x0: &Self::Buf, uv: &Self::Buf, bias: &Self::Buf, dout: &Self::Buf, rows: usize, cols: usize, duv: &mut Self::Buf, dx0: &mut Self::Buf) -> Result<()>;
    /// Binary cross-entropy with logits: writes dlogits = scale · (σ(x) − y), returns Σ loss (f64).
    fn bce_with_logits(&self, logits: &Self::Buf, labels: &Self::Buf, scale: f32, dlogits: &mut Self::Buf) -> Result<f64>;
    /// One dense optimizer step on a parameter tensor.
    fn dense_update(&self, param: &mut Self::Buf, grad: &Self::Buf, state: &mut Self::Buf, upd: &DenseUpdate) -> Result<()>;

    // ---- embeddings ----
    /// New shard: weights from `init` (row-major local rows × cols), zeroed optimizer state.
    fn shard(&self, spec: ShardSpec, init: &[f32], upd: &EmbUpdate) -> Result<Shard<Self>> {
        let n = product(&[spec.num_rows(), upd.state_per_row(spec.num_cols())]).ok_or_else(|| crate::Error::Input(format!("shard {spec:?}: state size overflows")))?;
        let state = self.zeros(n)?;
        Ok(Shard { weights: self.upload(init)?, state, spec })
    }
    /// Pooled embedding bags: `out[i, layout.col..+cols] (=|+=) scale_i · Σ_j W[ids_j]`.
    /// With `accumulate` the result is added (row-wise shards of one table into one output).
    fn embedding_forward(&self, shard: &Shard<Self>, bags: &Bags<Self>, out: &mut Self::Buf, layout: Layout, accumulate: bool) -> Result<()>;
    /// Fused backward + optimizer: gradients of the pooled outputs (`grad`, laid out as the
    /// forward output) are summed per unique row and each touched row is updated once.
    /// No gradient tensor of table size is ever built.
    fn embedding_backward_update(&self, shard: &mut Shard<Self>, bags: &Bags<Self>, grad: &Self::Buf, layout: Layout, upd: &EmbUpdate) -> Result<()>;
    /// First half of the fused update (for column-wise shards): per-unique-row gradients.
    fn embedding_row_grads(&self, shard: &Shard<Self>, bags: &Bags<Self>, grad: &Self::Buf, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Self>>;
    /// Second half: apply `rg`; `row_sq` (num_rows), if given, replaces `rg.sq` as the whole-row
    /// Σ g² (the column shards' partial sums combined).
    fn embedding_apply(&self, shard: &mut Shard<Self>, rg: &RowGrads<Self>, row_sq: Option<&Self::Buf>, upd: &EmbUpdate) -> Result<()>;
}

/// A backend: its numerics and its buffers. Implemented for every type that has both, so a
/// new backend implements [`Buffers`] and [`Numerics`] and nothing else.
pub trait Backend: Numerics + Buffers {}

impl<T: Numerics + Buffers> Backend for T {}
