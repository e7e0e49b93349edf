//! Feature interaction and loss on the device: the bodies of `Backend::cross_combine_backward`
//! (DCN cross layer) and `Backend::bce_with_logits` (loss and its gradient, partial sums on the host).
use super::*;

impl Cuda {
    /// Body of `Backend::cross_combine_backward`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cross_combine_backward_impl(&self, x0: &DevBuf<f32>, uv: &DevBuf<f32>, bias: &DevBuf<f32>, dout: &DevBuf<f32>, rows: usize, cols: usize, duv: &mut DevBuf<f32>, dx0: &mut DevBuf<f32>) -> Result<()> {
        let n = Self::size("cross_combine_backward", &[rows, cols])?;
        check(x0.len() >= n && uv.len() >= n && dout.len() >= n && duv.len() >= n && dx0.len() >= n && bias.len() == cols, || {
            format!("cross_combine_backward: {rows}x{cols}")
        })?;
        let _g = self.lock()?;
        let (a, b, c, d, r, co, e, f) = (x0.ptr(), uv.ptr(), bias.ptr(), dout.ptr(), rows as i64, cols as i64, duv.ptr(), dx0.ptr());
        unsafe {
            self.gpu
                .launch("cross_combine_backward", self.grid(n), 256)
                .map_err(dev)?
                .arg(&a)
                .arg(&b)
                .arg(&c)
                .arg(&d)
                .arg(&r)
                .arg(&co)
                .arg(&e)
                .arg(&f)
                .go()
        }
        .map_err(dev)
    }

    /// Body of `Backend::bce_with_logits`.
    pub(super) fn bce_with_logits_impl(&self, logits: &DevBuf<f32>, labels: &DevBuf<f32>, scale: f32, dlogits: &mut DevBuf<f32>) -> Result<f64> {
        let n = labels.len();
        check(logits.len() >= n && dlogits.len() >= n, || format!("bce_with_logits: {} logits for {n} labels", logits.len()))?;
        if n == 0 {
            return Ok(0.0);
        }
        let _g = self.lock()?;
        let grid = self.grid(n).min(1024);
        let partial = self.scratch(grid as usize * 8)?;
        let (xp, yp, ni, dp) = (logits.ptr(), labels.ptr(), n as i64, dlogits.ptr());
        unsafe {
            self.gpu.launch("bce_with_logits", grid, 256).map_err(dev)?.arg(&xp).arg(&yp).arg(&ni).arg(&scale).arg(&dp).arg(&partial).go()
        }
        .map_err(dev)?;
        let mut host = vec![0f64; grid as usize];
        self.gpu.dtoh(&mut host, partial).map_err(dev)?;
        self.done()?;
        Ok(host.iter().sum())
    }
}
