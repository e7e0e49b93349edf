//! Dense layers on the device: the bodies of `Backend::gemm` (cuBLAS, row-major through the
//! column-major transpose) and `Backend::dense_update` (SGD/Adagrad on a parameter buffer).
use super::*;

impl Cuda {
    /// Body of `Backend::gemm`.
    pub(super) fn gemm_impl(&self, g: Gemm, a: &DevBuf<f32>, b: &DevBuf<f32>, c: &mut DevBuf<f32>) -> Result<()> {
        use cudarc::cublas::{result as br, sys as bs};
        let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
        crate::backend::check_gemm(&g, a.len(), b.len(), c.len())?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        check(m.max(n).max(k) < i32::MAX as usize, || "gemm: dimension too large for cuBLAS".into())?;
        let _g = self.lock()?;
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
        let opb = if trans_b { bs::cublasOperation_t::CUBLAS_OP_T } else { bs::cublasOperation_t::CUBLAS_OP_N };
        let opa = if trans_a { bs::cublasOperation_t::CUBLAS_OP_T } else { bs::cublasOperation_t::CUBLAS_OP_N };
        let ldb = if trans_b { k } else { n } as i32;
        let lda = if trans_a { m } else { k } as i32;
        // SAFETY: sizes checked above; pointers are live device buffers; alpha/beta are host values.
        unsafe {
            br::sgemm(
                *self.gpu.blas.handle(),
                opb,
                opa,
                n as i32,
                m as i32,
                k as i32,
                &alpha,
                b.ptr() as *const f32,
                ldb.max(1),
                a.ptr() as *const f32,
                lda.max(1),
                &beta,
                c.ptr() as *mut f32,
                n as i32,
            )
        }
        .map_err(|e| Error::Device(format!("cublasSgemm {m}x{n}x{k}: {e:?}")))
    }

    /// Body of `Backend::dense_update`.
    pub(super) fn dense_update_impl(&self, param: &mut DevBuf<f32>, grad: &DevBuf<f32>, state: &mut DevBuf<f32>, upd: &DenseUpdate) -> Result<()> {
        check(param.len() == grad.len(), || format!("dense_update: param {} vs grad {}", param.len(), grad.len()))?;
        let (kind, lr, eps) = match upd.opt {
            DenseOptimizer::Sgd { lr } => (0i32, lr, 0.0f32),
            DenseOptimizer::Adagrad { lr, eps } => {
                check(state.len() == param.len(), || format!("dense_update: state {} vs param {}", state.len(), param.len()))?;
                (1, lr, eps)
            }
        };
        let _g = self.lock()?;
        let (p, g, s, n) = (param.ptr(), grad.ptr(), state.ptr(), param.len() as i64);
        unsafe {
            self.gpu
                .launch("dense_update", self.grid(param.len()), 256)
                .map_err(dev)?
                .arg(&p)
                .arg(&g)
                .arg(&s)
                .arg(&n)
                .arg(&kind)
                .arg(&lr)
                .arg(&eps)
                .arg(&upd.l2)
                .go()
        }
        .map_err(dev)
    }
}
