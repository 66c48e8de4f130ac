//! Weights into kiln: `params.pretrained = "file.pth" | "file.safetensors"` loads a
//! checkpoint written by PyTorch (a `state_dict`, torchvision's layout) or by `kiln export`
//! into a kiln network, through Burn's `burn-store`.
//!
//! Names go through the family's [`TorchNames`] map backwards (torch name → Burn path), and
//! the PyTorch adapter transposes a `Linear` weight ([out, in] in PyTorch, [in, out] in Burn).
//! Every tensor of the network must be in the file with its shape, and every float tensor of
//! the file must have a place in the network — except batch norm's `num_batches_tracked`
//! counters and the tensors of the parts the caller replaces (`skip`, a new classifier
//! head). Anything else is an error naming the tensor, in PyTorch's names.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn_store::{
    ApplyError, KeyRemapper, ModuleSnapshot, PathFilter, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};

use crate::export::TorchNames;

/// Tensors already in Burn's names and layout, ready to apply to a freshly built network
/// (see [`apply`]); cheap to clone.
pub type Weights = Vec<burn_pack::Tensor>;

/// What [`load`] put into the network.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Tensors copied from the file.
    pub applied: usize,
    /// Tensors of the network left as initialised (the replaced parts).
    pub skipped: usize,
}

/// " (nor 3 others)" after the first of `n` names, or nothing when it is the only one.
fn more(n: usize, phrase: &str) -> String {
    if n > 1 {
        format!(" ({phrase} {} others)", n - 1)
    } else {
        String::new()
    }
}

fn under(path: &str, prefixes: &[String]) -> bool {
    prefixes
        .iter()
        .any(|p| path == p || path.starts_with(&format!("{p}.")))
}

/// Load `file` into `module`, leaving the Burn paths under any of `skip` (e.g. `fc`) as they
/// are. With `names` (the family's map to its PyTorch twin) the file holds PyTorch's names
/// and layout; without, Burn's own (`kiln export --burn-names`, or a family without a twin).
/// Errors are one line without the file name (the caller adds it with the config field).
pub fn load<M: ModuleSnapshot>(
    module: &mut M,
    file: &Path,
    names: Option<&TorchNames>,
    skip: &[String],
) -> Result<Loaded> {
    let torch_of: BTreeMap<&str, &str> = names
        .map(|n| {
            n.names
                .iter()
                .map(|(burn, t)| (burn.as_str(), t.name.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let mut remapper = KeyRemapper::new();
    for (burn, t) in names.iter().flat_map(|n| &n.names) {
        remapper = remapper
            .add_pattern(format!("^{}$", regex::escape(&t.name)), burn.clone())
            .map_err(|e| anyhow!("name map: {e}"))?;
    }
    let all = tensor_names(module);
    let wanted: Vec<String> = all.iter().filter(|b| !under(b, skip)).cloned().collect();
    let filter = PathFilter::new().with_full_paths(wanted.clone());
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !file.is_file() {
        bail!("no such file");
    }
    let result = match ext.as_str() {
        "pth" | "pt" | "bin" => {
            let mut store = PytorchStore::from_file(file)
                .remap(remapper)
                .filter(filter)
                .map_indices_contiguous(false)
                .validate(false)
                .allow_partial(true);
            module
                .load_from(&mut store)
                .map_err(|e| anyhow!("not a readable PyTorch checkpoint ({e})"))?
        }
        "safetensors" => {
            let store = SafetensorsStore::from_file(file);
            let store = if names.is_some() {
                store.with_from_adapter(PyTorchToBurnAdapter)
            } else {
                store
            };
            let mut store = store
                .remap(remapper)
                .filter(filter)
                .map_indices_contiguous(false)
                .validate(false)
                .allow_partial(true);
            module
                .load_from(&mut store)
                .map_err(|e| anyhow!("not a readable safetensors file ({e})"))?
        }
        other => bail!(
            "unknown weights format {other:?} (expected .pth, .pt or .safetensors with PyTorch's names)"
        ),
    };
    let torch = |burn: &str| torch_of.get(burn).copied().unwrap_or(burn).to_string();
    if let Some(e) = result.errors.first() {
        bail!(match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "tensor {} is {:?} in the file, the network needs {:?}",
                torch(path),
                found.as_slice(),
                expected.as_slice()
            ),
            ApplyError::DTypeMismatch {
                path,
                expected,
                found,
            } => format!(
                "tensor {} is {found:?} in the file, the network needs {expected:?}",
                torch(path)
            ),
            ApplyError::AdapterError { path, message }
            | ApplyError::LoadError { path, message } => {
                format!("tensor {}: {message}", torch(path))
            }
        });
    }
    let missing: Vec<String> = result
        .missing
        .iter()
        .map(|(p, _)| p)
        .filter(|p| !under(p, skip))
        .map(|p| torch(p))
        .collect();
    if let Some(first) = missing.first() {
        bail!(
            "the file has no tensor {first}{} that the network needs",
            more(missing.len(), "nor")
        );
    }
    let unused: Vec<&String> = result
        .unused
        .iter()
        .filter(|p| !p.ends_with("num_batches_tracked") && !under(p, skip))
        .collect();
    if let Some(first) = unused.first() {
        bail!(
            "tensor {first} of the file has no place in the network{} (a different architecture or size?)",
            more(unused.len(), "nor have")
        );
    }
    Ok(Loaded {
        applied: result.applied.len(),
        skipped: all.len() - wanted.len(),
    })
}

/// A network's tensors as [`Weights`], with their bytes read now (so that they no longer
/// depend on the network or its device).
pub fn snapshot<M: ModuleSnapshot>(module: &M) -> Result<Weights> {
    module
        .collect(None, None, false)
        .into_iter()
        .map(|t| {
            let bytes = t
                .to_bytes()
                .map_err(|e| anyhow!("tensor {}: {e}", t.name))?;
            Ok(burn_pack::Tensor::new(
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                None,
                bytes,
            ))
        })
        .collect()
}

/// Put [`snapshot`]'s tensors into a freshly built network of the same shape.
pub fn apply<M: ModuleSnapshot>(module: &mut M, weights: &Weights) -> Result<()> {
    let result = module.apply(weights.clone(), None, None, false);
    if let Some(e) = result.errors.first() {
        bail!("{e}");
    }
    if let Some((p, _)) = result.missing.first() {
        bail!("no weights for {p}");
    }
    Ok(())
}

/// The Burn paths of a network's tensors (parameters and running averages), in module order.
pub fn tensor_names<M: ModuleSnapshot>(module: &M) -> Vec<String> {
    module
        .collect(None, None, false)
        .into_iter()
        .map(|t| t.name)
        .collect()
}
