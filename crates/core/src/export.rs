//! Weights out of kiln: `kiln export <run>` writes a run's final weights (`model.bpk`) as a
//! [safetensors](https://huggingface.co/docs/safetensors) file, which PyTorch
//! (`safetensors.torch.load_file`), NumPy, JAX and Burn itself read.
//!
//! Names are Burn's module paths (`blocks.0.conv.weight`) unless the family maps them to its
//! PyTorch twin's ([`TorchNames`]): then `model.load_state_dict(load_file(path))` works on the
//! twin in `scripts/reference/`. A `Linear` layer's weight is stored [in, out] by Burn and
//! [out, in] by PyTorch, so a mapped linear weight is transposed on the way out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::run::{MODEL_FILE, RunDir};

/// How one Burn tensor appears in the PyTorch twin's `state_dict`.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchName {
    pub name: String,
    /// A linear layer's weight: [in, out] → [out, in].
    pub transpose: bool,
}

/// A family's map from Burn's parameter names to its PyTorch twin's, with the extra entries
/// the twin's `state_dict` holds (batch norm's `num_batches_tracked`).
#[derive(Debug, Clone, Default)]
pub struct TorchNames {
    pub names: BTreeMap<String, TorchName>,
    /// Names of int64 scalars to add (PyTorch's `num_batches_tracked`; 0: unknown).
    pub counters: Vec<String>,
}

/// One tensor of an exported file.
#[derive(Debug, Clone)]
pub struct Exported {
    pub name: String,
    pub shape: Vec<usize>,
}

/// A tensor's shape and its values.
pub type Values = (Vec<usize>, Vec<f32>);

/// A tensor's name, shape and values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The final weights of a run: (Burn name, shape, f32 values) in the module's order.
pub fn read_weights(run: &RunDir) -> Result<Vec<NamedTensor>> {
    let path = run.file(MODEL_FILE);
    if !path.is_file() {
        bail!(
            "{}: no final weights (has the run finished?)",
            path.display()
        );
    }
    let reader = burn_pack::Reader::from_file_exact(&path)
        .map_err(|e| anyhow::anyhow!("{}: not a Burn weights file: {e}", path.display()))?;
    let mut out = Vec::new();
    for t in reader
        .into_tensors()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    {
        let (name, dtype, shape, _, bytes) = t
            .into_parts()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let values: Vec<f32> = match dtype {
            burn_pack::DType::F32 => f32s(&bytes),
            other => bail!(
                "{}: tensor {name}: {other:?} is not exported (f32 only)",
                path.display()
            ),
        };
        out.push((name, shape.to_vec(), values));
    }
    Ok(out)
}

/// Write `run`'s final weights to `out` as safetensors, renamed by `torch` when given.
/// Returns the tensors written (name and shape), in file order.
pub fn safetensors(run: &RunDir, out: &Path, torch: Option<&TorchNames>) -> Result<Vec<Exported>> {
    let weights = read_weights(run)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for (name, shape, values) in weights {
        let (name, shape, values) = match torch {
            None => (name, shape, values),
            Some(map) => {
                let Some(t) = map.names.get(&name) else {
                    bail!(
                        "{}: tensor {name} has no PyTorch name in this family's map",
                        run.file(MODEL_FILE).display()
                    );
                };
                if t.transpose && shape.len() == 2 {
                    let (r, c) = (shape[0], shape[1]);
                    let mut v = vec![0.0f32; values.len()];
                    for i in 0..r {
                        for j in 0..c {
                            v[j * r + i] = values[i * c + j];
                        }
                    }
                    (t.name.clone(), vec![c, r], v)
                } else {
                    (t.name.clone(), shape, values)
                }
            }
        };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, shape, bytes, Dtype::F32));
    }
    if let Some(map) = torch {
        for c in &map.counters {
            tensors.push((c.clone(), vec![], 0i64.to_le_bytes().to_vec(), Dtype::I64));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b, d)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("producer".to_string(), "kiln".to_string());
    let bytes = safetensors::serialize(views, Some(meta))?;
    crate::run::write_atomic(out, &bytes)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    Ok(tensors
        .iter()
        .map(|(n, s, ..)| Exported {
            name: n.clone(),
            shape: s.clone(),
        })
        .collect())
}

/// Write named f32 tensors as a safetensors file.
pub fn write_safetensors(out: &Path, tensors: &[NamedTensor]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let data = safetensors::serialize(views, None)?;
    crate::run::write_atomic(out, &data).with_context(|| format!("{}: cannot write", out.display()))
}

/// Read a safetensors file back: (name, shape, f32 values) of every float tensor, by name.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Values>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() == Dtype::F32 {
            out.insert(name, (view.shape().to_vec(), f32s(view.data())));
        }
    }
    Ok(out)
}

/// Little-endian f32 bytes as values.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The default file of an export: `<run>/model.safetensors`.
pub fn default_path(run: &RunDir) -> PathBuf {
    run.file("model.safetensors")
}
