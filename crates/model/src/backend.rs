//! The backends align runs on, chosen once here so model, loss and trainer code stays
//! generic. The CPU default was picked by measurement (README, "CPU backend"); what each
//! backend supports is in docs/backends.md.

use crate::FusedOps;

/// The default CPU backend: Burn's pure-Rust `flex` (SIMD + rayon, no system library).
pub type Cpu = burn::backend::Flex;

/// Burn's ndarray backend, kept for the backend comparison in `cargo xtask bench`.
pub type NdArray = burn::backend::NdArray;

/// CUDA through CubeCL (`--features cuda`). `cudarc` loads the driver at run time, so a
/// CUDA build starts anywhere and fails cleanly at first use where no driver exists.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// wgpu through CubeCL (`--features wgpu`): Vulkan on Linux and Windows, Metal on macOS,
/// f32 only. Runs the kernels' generic (composed) forms, with Burn's fusion and autotune.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

/// Autodiff decorator for training on any of the above.
pub type Autodiff<B> = burn::backend::Autodiff<B>;

/// Which device a command runs on. Only the backends compiled in are variants, so a value
/// of this type can always run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "wgpu")]
    Wgpu,
}

/// Work generic over the backend, run by [`DeviceKind::run`] on the one chosen at run time.
pub trait OnDevice {
    type Output;
    fn run<B: FusedOps>(self, device: &B::Device) -> Self::Output;
}

impl DeviceKind {
    /// Every kind compiled in.
    pub const ALL: &[DeviceKind] = &[
        DeviceKind::Cpu,
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda,
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu,
    ];

    /// The kind whose backend is `B` (the backend itself, not its autodiff decorator).
    pub fn of<B: 'static>() -> Option<DeviceKind> {
        Self::ALL.iter().copied().find(|k| k.backend() == std::any::TypeId::of::<B>())
    }

    fn backend(self) -> std::any::TypeId {
        match self {
            DeviceKind::Cpu => std::any::TypeId::of::<Cpu>(),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => std::any::TypeId::of::<Cuda>(),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => std::any::TypeId::of::<Wgpu>(),
        }
    }

    /// Opens this kind's default device ([`DeviceKind::check`]), then runs `job` on it: the
    /// first GPU; for wgpu, the adapter CubeCL ranks first (a discrete GPU, else an
    /// integrated one, else a CPU driver such as lavapipe).
    pub fn run<J: OnDevice>(self, job: J) -> Result<J::Output, String> {
        self.check()?;
        Ok(self.dispatch(job))
    }

    fn dispatch<J: OnDevice>(self, job: J) -> J::Output {
        match self {
            DeviceKind::Cpu => job.run::<Cpu>(&Default::default()),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => job.run::<Cuda>(&Default::default()),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => job.run::<Wgpu>(&Default::default()),
        }
    }

    /// Opens this kind's default device: a one-element tensor made and read back. A backend
    /// that cannot start (no CUDA driver, no Vulkan adapter) panics, on its own server thread
    /// and then on this one; that becomes an error saying what to install.
    pub fn check(self) -> Result<(), String> {
        struct Probe;
        impl OnDevice for Probe {
            type Output = ();
            fn run<B: FusedOps>(self, device: &B::Device) {
                let one = burn::tensor::Tensor::<B, 1>::ones([1], device);
                let _ = one.into_data();
            }
        }
        if self == DeviceKind::Cpu {
            return Ok(());
        }
        static FIRST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                let payload = info.payload();
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                *first = Some(msg);
            }
        }));
        let opened = std::panic::catch_unwind(|| self.dispatch(Probe));
        std::panic::set_hook(hook);
        opened.map_err(|_| {
            let why = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            let install = match self {
                DeviceKind::Cpu => "",
                #[cfg(feature = "cuda")]
                DeviceKind::Cuda => "an NVIDIA GPU with its driver (libcuda.so.1) is needed",
                #[cfg(feature = "wgpu")]
                DeviceKind::Wgpu => {
                    "a Vulkan driver is needed (on Linux: `apt-get install mesa-vulkan-drivers libvulkan1`; \
                     Mesa's lavapipe runs on the CPU)"
                }
            };
            format!("--device {self}: no device could be opened ({}); {install}", why.lines().next().unwrap_or(""))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => "cuda",
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => "wgpu",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let missing =
            |feature: &str| format!("this build has no {feature} support: rebuild with `--features {feature}`");
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            #[cfg(feature = "cuda")]
            "cuda" | "gpu" => Ok(DeviceKind::Cuda),
            #[cfg(not(feature = "cuda"))]
            "cuda" | "gpu" => Err(missing("cuda")),
            #[cfg(feature = "wgpu")]
            "wgpu" | "vulkan" | "metal" => Ok(DeviceKind::Wgpu),
            #[cfg(not(feature = "wgpu"))]
            "wgpu" | "vulkan" | "metal" => Err(missing("wgpu")),
            other => Err(format!("unknown device {other:?} (cpu, cuda, wgpu)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_names_its_backend() {
        for &kind in DeviceKind::ALL {
            assert_eq!(kind.name().parse::<DeviceKind>(), Ok(kind));
        }
        assert_eq!(DeviceKind::of::<Cpu>(), Some(DeviceKind::Cpu));
        assert_eq!(DeviceKind::of::<NdArray>(), None);
        assert_eq!(DeviceKind::Cpu.run(Name), Ok("cpu"));
    }

    struct Name;
    impl OnDevice for Name {
        type Output = &'static str;
        fn run<B: FusedOps>(self, _: &B::Device) -> &'static str {
            DeviceKind::of::<B>().map_or("?", DeviceKind::name)
        }
    }
}
