//! The system BLAS's `cblas_sgemm` for the CPU backend's 2-D f32 products, loaded at run
//! time, so the same binary runs where no BLAS is installed (flex's own gemm then).
//!
//! Why: on the AMD EPYC (AVX2) development VM, Debian's OpenBLAS 0.3.21 ran SmolLM2's
//! products at 118–186 GFLOP/s on 2 threads where gemm 0.19 (flex's matmul) reached 58–90
//! (`cargo run -p align-kernels --example products`; docs/performance.md). On an Intel
//! AVX-512 VM the order was the other way: gemm's AVX-512 kernels (Burn's `x86-v4`) reached
//! 154–297 and OpenBLAS 30–61. So by default a BLAS is used only on CPUs without AVX-512F.
//!
//! `ALIGN_BLAS`: unset, the default above; `off`, never; `on`, also with AVX-512; a path or
//! soname, that library. Libraries tried otherwise, in order: `libopenblas.so.0`,
//! `libopenblas.so`, `libblis.so.4`, `libmkl_rt.so.2`.

use std::sync::OnceLock;

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape, TensorData};

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// `cblas_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm =
    unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);

struct Blas {
    sgemm: Sgemm,
    name: String,
    // Keeps the library mapped for as long as `sgemm` may be called.
    _library: libloading::Library,
}

fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let setting = std::env::var("ALIGN_BLAS").ok();
        let chosen = match setting.as_deref() {
            Some("off") => return None,
            None if has_avx512() => return None,
            Some("on") | None => None,
            Some(library) => Some(library.to_string()),
        };
        let candidates = chosen
            .into_iter()
            .chain(["libopenblas.so.0", "libopenblas.so", "libblis.so.4", "libmkl_rt.so.2"].map(String::from));
        for name in candidates {
            // SAFETY: loading a BLAS runs its initialisers, which set up its thread pool only.
            let Ok(library) = (unsafe { libloading::Library::new(&name) }) else { continue };
            // SAFETY: `cblas_sgemm` has this C signature in every CBLAS.
            let sgemm = match unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") } {
                Ok(f) => *f,
                Err(_) => continue,
            };
            return Some(Blas { sgemm, name, _library: library });
        }
        None
    })
    .as_ref()
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The BLAS in use, if one loaded.
pub fn library() -> Option<&'static str> {
    blas().map(|b| b.name.as_str())
}

/// A 2-D f32 operand as CBLAS takes it: the data from its first element, whether it is
/// transposed (column-major in memory), and its leading dimension.
fn operand(t: &FlexTensor) -> Option<(&[f32], bool, usize)> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let layout = t.layout();
    let dims = layout.shape();
    let strides = layout.strides();
    if dims.num_dims() != 2 || strides.iter().any(|&s| s < 0) {
        return None;
    }
    let (rows, cols) = (dims[0], dims[1]);
    let (rs, cs) = (strides[0] as usize, strides[1] as usize);
    let (transposed, ld) = if cs == 1 || cols == 1 {
        (false, rs.max(cols))
    } else if rs == 1 || rows == 1 {
        (true, cs.max(rows))
    } else {
        return None;
    };
    let data = &t.storage::<f32>()[layout.start_offset()..];
    let needed = if transposed { (cols - 1) * ld + rows } else { (rows - 1) * ld + cols };
    (rows > 0 && cols > 0 && data.len() >= needed && ld <= i32::MAX as usize).then_some((data, transposed, ld))
}

/// `a · b` through the BLAS, for 2-D f32 operands that are row-major or transposed views;
/// `None` (the caller's own matmul) for anything else or without a BLAS.
pub(crate) fn matmul(a: &FlexTensor, b: &FlexTensor) -> Option<FlexTensor> {
    let blas = blas()?;
    let (m, k) = (a.layout().shape()[0], a.layout().shape()[1]);
    let n = b.layout().shape()[1];
    if b.layout().shape()[0] != k || m.max(n).max(k) > i32::MAX as usize {
        return None;
    }
    let ((ad, at, lda), (bd, bt, ldb)) = (operand(a)?, operand(b)?);
    let mut c = vec![0.0f32; m * n];
    // SAFETY: `operand` checked that each buffer holds the elements its leading dimension
    // and shape address; `c` is m × n with ldc = n.
    unsafe {
        (blas.sgemm)(
            ROW_MAJOR,
            if at { TRANS } else { NO_TRANS },
            if bt { TRANS } else { NO_TRANS },
            m as i32,
            n as i32,
            k as i32,
            1.0,
            ad.as_ptr(),
            lda as i32,
            bd.as_ptr(),
            ldb as i32,
            0.0,
            c.as_mut_ptr(),
            n as i32,
        );
    }
    Some(FlexTensor::from_data(TensorData::new(c, Shape::new([m, n]))))
}
