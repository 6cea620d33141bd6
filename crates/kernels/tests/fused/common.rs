//! What every kernel test compares with: host values and a tolerance relative to the largest
//! expected magnitude.

use align_kernels::burn::tensor::Tensor;
use align_kernels::burn::tensor::backend::Backend;

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

pub fn close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

/// The tolerance on GPU backends, relative to the largest expected magnitude: f32 with
/// other summation orders and fused kernels (the measured worst cases are in
/// docs/backends.md).
#[allow(dead_code)]
pub const GPU_REL: f64 = 1e-4;
