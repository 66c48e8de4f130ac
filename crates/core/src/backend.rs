//! Backend by name: the config's `backend` key becomes a Burn `Device` at run time.
//!
//! Model code never names a backend. CPU backends (flex, ndarray) are always compiled in;
//! GPU backends are cargo features of `kiln-core` (and of the runner): `wgpu`, `cuda`; so is
//! `tch`, LibTorch on the CPU, which needs libtorch (`scripts/setup-libtorch.sh`).

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

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

    /// The plain (inference) device for this backend, or a one-line error: the cargo feature
    /// that would compile it in, or — for the GPU backends — what was looked for and not found
    /// (see [`BackendName::probe`]).
    pub fn device(self) -> Result<Device, String> {
        let device = self.unchecked_device()?;
        if !self.is_cpu() {
            self.probe()?;
        }
        Ok(device)
    }

    /// Whether this backend has a usable device on this machine: `Ok(())`, or one line naming
    /// the backend, what was looked for and why it failed. CPU backends always answer; a GPU
    /// backend is asked to compute `sum(ones(4))` once per process (the answer is kept), with
    /// any panic from inside CubeCL (no adapter, no driver library, no GPU) caught and turned
    /// into that line instead of ending the program.
    pub fn probe(self) -> Result<(), String> {
        static ANSWERS: [OnceLock<Result<(), String>>; 5] = [const { OnceLock::new() }; 5];
        let slot = &ANSWERS[Self::ALL.iter().position(|b| *b == self).unwrap_or(0)];
        slot.get_or_init(|| {
            let device = self.unchecked_device()?;
            if self.is_cpu() {
                return Ok(());
            }
            self.probe_device(device, self.what_it_needs())
        })
        .clone()
    }

    /// Ask `device` for `sum(ones(4))`, any panic caught: `Ok(())` or one line naming the
    /// backend and `looked_for`.
    fn probe_device(self, device: Device, looked_for: &str) -> Result<(), String> {
        let answer = quietly(move || {
            burn::tensor::Tensor::<1>::ones([4], &device)
                .sum()
                .into_scalar::<f32>()
        });
        match answer {
            Ok(4.0) => Ok(()),
            Ok(other) => Err(format!(
                "backend {:?}: the device computed 1+1+1+1 = {other}",
                self.as_str()
            )),
            Err(cause) => Err(format!(
                "backend {:?}: no usable device — looked for {looked_for} ({cause})",
                self.as_str()
            )),
        }
    }

    /// The devices `train.devices` names, each probed (see [`BackendName::probe`]); no
    /// indices means the backend's one default device ([`BackendName::device`]). Index `i`
    /// is CUDA device `i` on `cuda` and the `i`-th discrete GPU wgpu finds on `wgpu`; the CPU
    /// backends have one device, `0`, so several are a one-line error naming `train.devices`.
    pub fn devices(self, indices: &[usize]) -> Result<Vec<Device>, String> {
        if indices.is_empty() {
            return Ok(vec![self.device()?]);
        }
        let list = format!(
            "train.devices = [{}]",
            indices
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(i) = indices
            .iter()
            .enumerate()
            .find_map(|(k, i)| indices[..k].contains(i).then_some(i))
        {
            return Err(format!("{list}: device {i} is listed twice"));
        }
        if self.is_cpu() {
            if indices == [0] {
                return Ok(vec![self.device()?]);
            }
            return Err(format!(
                "{list}: backend {:?} has one device (0); training on several devices needs \
                 backend \"cuda\" or \"wgpu\"",
                self.as_str()
            ));
        }
        indices
            .iter()
            .map(|&i| {
                let (device, looked_for) = self.indexed_device(i)?;
                self.probe_device(device.clone(), &looked_for)
                    .map_err(|e| format!("{list}: {e}"))?;
                Ok(device)
            })
            .collect()
    }

    /// Device `i` of a GPU backend and what it is, for [`BackendName::devices`].
    fn indexed_device(self, i: usize) -> Result<(Device, String), String> {
        match self {
            #[cfg(feature = "wgpu")]
            BackendName::Wgpu => Ok((
                Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(i)),
                format!("discrete GPU {i} through wgpu (Vulkan, Metal or DX12)"),
            )),
            #[cfg(feature = "cuda")]
            BackendName::Cuda => Ok((
                Device::cuda(i),
                format!("CUDA device {i} (`nvidia-smi` lists the GPUs and their numbers)"),
            )),
            other => {
                let _ = i; // only the GPU backends number their devices
                other.unchecked_device().map(|d| (d, "a CPU".to_string()))
            }
        }
    }

    /// What a GPU backend needs of the machine, for error messages.
    fn what_it_needs(self) -> &'static str {
        match self {
            BackendName::Wgpu => {
                "a Vulkan, Metal, DX12 or OpenGL adapter through wgpu; without a GPU, Mesa's \
                 lavapipe (Debian package mesa-vulkan-drivers) provides a Vulkan one on the CPU"
            }
            BackendName::Cuda => {
                "CUDA device 0: an NVIDIA GPU and its driver's libcuda (`nvidia-smi` lists both)"
            }
            _ => "a CPU",
        }
    }

    fn unchecked_device(self) -> Result<Device, String> {
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

/// Runs `f`, turning a panic (from any thread of the call) into the first line of its message
/// while keeping Rust's default "thread panicked" report off stderr.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static MESSAGE: Mutex<Option<String>> = Mutex::new(None);
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let mut slot = MESSAGE.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(text);
    }));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous);
    let message = MESSAGE.lock().unwrap_or_else(|e| e.into_inner()).take();
    result.map_err(|_| {
        let text = message.unwrap_or_else(|| "a panic without a message".into());
        let line = text.lines().next().unwrap_or("").trim();
        let mut line: String = line.chars().take(300).collect();
        if line.len() < text.trim().len() {
            line.push('…');
        }
        line
    })
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
    fn device_lists() {
        assert_eq!(BackendName::Flex.devices(&[]).unwrap().len(), 1);
        assert_eq!(BackendName::Flex.devices(&[0]).unwrap().len(), 1);
        let err = BackendName::Flex.devices(&[0, 1]).unwrap_err();
        assert!(
            err.starts_with("train.devices = [0, 1]: backend \"flex\" has one device"),
            "{err}"
        );
        let err = BackendName::Ndarray.devices(&[1]).unwrap_err();
        assert!(err.contains("has one device (0)"), "{err}");
        let err = BackendName::Cuda.devices(&[0, 2, 0]).unwrap_err();
        assert_eq!(err, "train.devices = [0, 2, 0]: device 0 is listed twice");
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
    fn a_panic_becomes_its_first_line() {
        assert_eq!(quietly(|| 2 + 2), Ok(4));
        let err = quietly(|| -> u32 { panic!("no adapter found\nbacktrace follows") });
        assert_eq!(err, Err("no adapter found…".to_string()));
        let err = quietly(|| -> u32 { std::thread::spawn(|| panic!("inside")).join().unwrap() });
        assert_eq!(err.unwrap_err(), "inside");
    }

    #[test]
    fn cpu_backends_probe_ok() {
        assert_eq!(BackendName::Flex.probe(), Ok(()));
        assert_eq!(BackendName::Ndarray.probe(), Ok(()));
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
