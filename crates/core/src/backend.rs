//! Backend by name: the config's `backend` key becomes a Burn `Device` at run time.
//!
//! Model code never names a backend. CPU backends (flex, ndarray) are always compiled in;
//! GPU backends are cargo features of `kiln-core` (and of the runner): `wgpu`, `cuda`; so is
//! `tch`, LibTorch on the CPU, which needs libtorch (`scripts/setup-libtorch.sh`).

use std::fmt;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// Flush subnormal floats (|x| < 1.18·10⁻³⁸) to zero on this thread and on the rayon threads
/// that Burn's CPU backends compute on, as PyTorch's `torch.set_flush_denormal(True)` does.
/// Late in training, gradients and Adam's moments hold such tiny numbers, and x86 CPUs take
/// a slow path for every operation on one: the default CNN's 16th epoch on flex took
/// 30.0–31.2 s with them and 25.2–26.4 s without. Call it once, first thing in `main`, before
/// any tensor work builds rayon's pool. On other architectures it does nothing.
pub fn flush_denormals() {
    fn this_thread() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: sets MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) bits,
        // which only change how SSE/AVX float operations round subnormal numbers.
        #[allow(deprecated)]
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
    }
    this_thread();
    // Fails only when the pool already exists; its threads then keep subnormals.
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| this_thread())
        .build_global();
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    /// Burn's pure-Rust CPU backend (the default).
    #[default]
    Flex,
    /// The ndarray CPU backend (deprecated in Burn 0.22; slow convolutions).
    Ndarray,
    /// Any GPU through wgpu (Vulkan, Metal, DX12). Cargo feature `wgpu`.
    Wgpu,
    /// NVIDIA GPUs through CUDA. Cargo feature `cuda`.
    Cuda,
    /// LibTorch (PyTorch's C++ library) on the CPU. Cargo feature `tch`.
    Tch,
}

impl BackendName {
    pub const ALL: [BackendName; 5] = [
        BackendName::Flex,
        BackendName::Ndarray,
        BackendName::Wgpu,
        BackendName::Cuda,
        BackendName::Tch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendName::Flex => "flex",
            BackendName::Ndarray => "ndarray",
            BackendName::Wgpu => "wgpu",
            BackendName::Cuda => "cuda",
            BackendName::Tch => "tch",
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|b| b.as_str()).collect();
                format!(
                    "unknown backend {name:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }

    /// Whether this backend runs on the CPU (what `kiln bench` measures by default).
    pub fn is_cpu(self) -> bool {
        matches!(
            self,
            BackendName::Flex | BackendName::Ndarray | BackendName::Tch
        )
    }

    pub fn is_compiled(self) -> bool {
        match self {
            BackendName::Flex | BackendName::Ndarray => true,
            BackendName::Wgpu => cfg!(feature = "wgpu"),
            BackendName::Cuda => cfg!(feature = "cuda"),
            BackendName::Tch => cfg!(feature = "tch"),
        }
    }

    pub fn compiled() -> Vec<BackendName> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// The plain (inference) device for this backend, or a one-line error naming the cargo
    /// feature that would compile it in.
    pub fn device(self) -> Result<Device, String> {
        match self {
            BackendName::Flex => Ok(Device::flex()),
            #[allow(deprecated)]
            BackendName::Ndarray => Ok(Device::ndarray()),
            #[cfg(feature = "wgpu")]
            BackendName::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            BackendName::Cuda => Ok(Device::cuda(0)),
            #[cfg(feature = "tch")]
            BackendName::Tch => Ok(Device::libtorch()),
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "backend {:?} is not compiled into this kiln; rebuild with `--features {}` \
                 (e.g. `cargo build --release -p kiln-runner --features {}`)",
                other.as_str(),
                other.as_str(),
                other.as_str()
            )),
        }
    }
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After `flush_denormals`, an operation whose result is subnormal gives 0 (on x86-64).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn subnormals_flush_to_zero() {
        use std::hint::black_box;
        let tiny = black_box(f32::MIN_POSITIVE);
        std::thread::spawn(move || {
            assert!(black_box(tiny) / black_box(4.0) > 0.0, "subnormal before");
            flush_denormals();
            assert_eq!(black_box(tiny) / black_box(4.0), 0.0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cpu_backends_are_compiled() {
        assert!(BackendName::Flex.device().is_ok());
        assert!(BackendName::Ndarray.device().is_ok());
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn missing_backend_names_the_feature() {
        let err = BackendName::Wgpu.device().unwrap_err();
        assert!(err.contains("--features wgpu"), "{err}");
    }

    #[test]
    fn parse_rejects_unknown() {
        assert_eq!(BackendName::parse("flex"), Ok(BackendName::Flex));
        assert_eq!(
            BackendName::parse("tpu").unwrap_err(),
            "unknown backend \"tpu\" (expected one of: flex, ndarray, wgpu, cuda, tch)"
        );
        assert!(BackendName::Tch.is_cpu() && !BackendName::Wgpu.is_cpu());
    }
}
