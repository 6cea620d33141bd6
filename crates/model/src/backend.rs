//! The backends align runs on, chosen once here so model, loss and trainer code stays
//! generic. The CPU default was picked by measurement (README, "CPU backend").

/// The default CPU backend: Burn's pure-Rust `flex` (SIMD + rayon, no system library).
pub type Cpu = burn::backend::Flex;

/// Burn's ndarray backend, kept for the backend comparison in `cargo xtask bench`.
pub type NdArray = burn::backend::NdArray;

/// CUDA through CubeCL (`--features cuda`). `cudarc` loads the driver at run time, so a
/// CUDA build starts anywhere and fails cleanly at first use where no driver exists.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Autodiff decorator for training on any of the above.
pub type Autodiff<B> = burn::backend::Autodiff<B>;

/// Which device a command runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" | "gpu" => {
                if cfg!(feature = "cuda") {
                    Ok(DeviceKind::Cuda)
                } else {
                    Err("this build has no CUDA support: rebuild with `--features cuda`".into())
                }
            }
            other => Err(format!("unknown device {other:?} (cpu, cuda)")),
        }
    }
}
