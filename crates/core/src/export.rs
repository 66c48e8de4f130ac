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
    /// PyTorch tensors made of several Burn tensors stacked along the first dimension.
    pub stacks: Vec<Stacked>,
}

impl TorchNames {
    /// Burn's `burn` is PyTorch's `torch` (transposed when `transpose`: a linear weight).
    pub fn rename(&mut self, burn: String, torch: String, transpose: bool) {
        let name = TorchName {
            name: torch,
            transpose,
        };
        self.names.insert(burn, name);
    }

    /// A linear layer: `burn.weight` `[in, out]` is `torch.weight` `[out, in]`, `burn.bias`
    /// is `torch.bias`.
    pub fn linear(&mut self, burn: &str, torch: &str) {
        self.rename(format!("{burn}.weight"), format!("{torch}.weight"), true);
        self.rename(format!("{burn}.bias"), format!("{torch}.bias"), false);
    }
}

/// One PyTorch tensor that stacks Burn tensors: `nn.LSTM`'s `weight_ih_l0` is the input
/// weights of its four gates (i, f, g, o), each `[hidden, input]`, one above the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Stacked {
    pub name: String,
    /// The Burn tensors, in stacking order, all of one shape.
    pub parts: Vec<String>,
    /// Each part is a linear layer's weight: [in, out] → [out, in] before stacking.
    pub transpose: bool,
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
    // Parts of stacked tensors, by Burn name, until every part is read.
    let mut parts: BTreeMap<String, Values> = BTreeMap::new();
    let stacked = |name: &str| {
        torch.is_some_and(|m| m.stacks.iter().any(|s| s.parts.iter().any(|p| p == name)))
    };
    for (name, shape, values) in weights {
        if stacked(&name) {
            parts.insert(name, (shape, values));
            continue;
        }
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
                    (t.name.clone(), vec![c, r], transposed(&values, r, c))
                } else {
                    (t.name.clone(), shape, values)
                }
            }
        };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, shape, bytes, Dtype::F32));
    }
    if let Some(map) = torch {
        for stack in &map.stacks {
            let (shape, values) = stack_parts(stack, &parts)
                .with_context(|| format!("{}", run.file(MODEL_FILE).display()))?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((stack.name.clone(), shape, bytes, Dtype::F32));
        }
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
    meta.extend(run_metadata(run, torch)?);
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

/// `stack`'s parts, each transposed when it asks, one above the other: `[n·rows, cols]` (or
/// `[n·len]` for vectors).
fn stack_parts(stack: &Stacked, parts: &BTreeMap<String, Values>) -> Result<Values> {
    let mut shape: Option<Vec<usize>> = None;
    let mut values = Vec::new();
    for p in &stack.parts {
        let Some((s, v)) = parts.get(p) else {
            bail!("tensor {p} (part of {}) is missing", stack.name);
        };
        let (s, v) = match s[..] {
            [r, c] if stack.transpose => (vec![c, r], transposed(v, r, c)),
            _ => (s.clone(), v.clone()),
        };
        match &shape {
            Some(first) if *first != s => {
                bail!(
                    "tensor {p} is {s:?}, the other parts of {} {first:?}",
                    stack.name
                )
            }
            _ => shape = Some(s),
        }
        values.extend(v);
    }
    let mut shape = shape.unwrap_or_default();
    if let Some(rows) = shape.first_mut() {
        *rows *= stack.parts.len();
    }
    Ok((shape, values))
}

/// Metadata key: the run's resolved `config.toml`.
const META_CONFIG: &str = "kiln.config";
/// Metadata key: the run's small JSON files (`preprocessing.json`, `vocab.json`, `info.json`)
/// as one JSON object, file name → contents.
const META_FILES: &str = "kiln.files";
/// Metadata key: exported name → [Burn name, transposed], or `{"stack": [Burn names],
/// "transpose": bool}` for a stacked tensor, when PyTorch names were written.
const META_NAMES: &str = "kiln.names";

/// What an exported file carries besides its tensors, so that `kiln predict`, `sample` and
/// `play` take the file as they take the run directory: the resolved config, the run's JSON
/// files (everything but `summary.json`) and, under PyTorch names, the way back to Burn's.
fn run_metadata(
    run: &RunDir,
    torch: Option<&TorchNames>,
) -> Result<std::collections::HashMap<String, String>> {
    let mut meta = std::collections::HashMap::new();
    let config = run.file(crate::run::CONFIG_FILE);
    meta.insert(
        META_CONFIG.to_string(),
        std::fs::read_to_string(&config)
            .with_context(|| format!("{}: cannot read", config.display()))?,
    );
    let mut files = serde_json::Map::new();
    let entries =
        std::fs::read_dir(run.path()).with_context(|| format!("{}", run.path().display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".json") && name != crate::run::SUMMARY_FILE && entry.path().is_file() {
            let text = std::fs::read_to_string(entry.path())
                .with_context(|| format!("{}: cannot read", entry.path().display()))?;
            files.insert(name, serde_json::Value::String(text));
        }
    }
    meta.insert(
        META_FILES.to_string(),
        serde_json::Value::Object(files).to_string(),
    );
    if let Some(map) = torch {
        let mut back: serde_json::Map<String, serde_json::Value> = map
            .names
            .iter()
            .map(|(burn, t)| (t.name.clone(), serde_json::json!([burn, t.transpose])))
            .collect();
        for s in &map.stacks {
            back.insert(
                s.name.clone(),
                serde_json::json!({"stack": s.parts, "transpose": s.transpose}),
            );
        }
        meta.insert(
            META_NAMES.to_string(),
            serde_json::Value::Object(back).to_string(),
        );
    }
    Ok(meta)
}

/// Where an exported tensor goes back to (the metadata's `kiln.names`).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum BackTo {
    /// A Burn name, and whether the tensor was transposed.
    One(String, bool),
    /// Burn tensors stacked along the first dimension.
    Stack { stack: Vec<String>, transpose: bool },
}

/// A run rebuilt from a file `kiln export` wrote, in a temporary directory that is removed
/// when this is dropped: its config, its JSON files and its weights as `model.bpk`.
pub struct Unpacked {
    pub run: RunDir,
    _dir: tempfile::TempDir,
}

/// Rebuild the run an exported safetensors file came from (see [`Unpacked`]), so that
/// `kiln predict model.safetensors …` answers as `kiln predict <run> …` does.
pub fn unpack(file: &Path) -> Result<Unpacked> {
    let shown = file.display();
    if file.extension().is_some_and(|e| e == "onnx") {
        bail!(
            "{shown}: kiln reads back its safetensors export, not ONNX (`kiln export <run>` writes it; run the ONNX file with onnxruntime)"
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("{shown}: cannot read"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        anyhow::anyhow!("{shown}: neither a run directory nor a safetensors file: {e}")
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let Some(config) = meta.get(META_CONFIG) else {
        bail!(
            "{shown}: no kiln.config in its metadata (not written by `kiln export`; weights from elsewhere go in through params.pretrained)"
        );
    };
    let files: BTreeMap<String, String> = match meta.get(META_FILES) {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{shown}: metadata {META_FILES}: {e}"))?,
        None => BTreeMap::new(),
    };
    let names: BTreeMap<String, BackTo> = match meta.get(META_NAMES) {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{shown}: metadata {META_NAMES}: {e}"))?,
        None => BTreeMap::new(),
    };
    let dir = tempfile::Builder::new()
        .prefix("kiln-export-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("{}: cannot write", path.display()))
    };
    write(crate::run::CONFIG_FILE, config)?;
    for (name, text) in &files {
        if name.contains(['/', '\\']) || !name.ends_with(".json") {
            bail!("{shown}: metadata {META_FILES}: {name:?} is not a run file name");
        }
        write(name, text)?;
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{shown}: not a safetensors file: {e}"))?;
    let mut tensors = Vec::new();
    // The file's order is its header's (alphabetical); Burn loads by name.
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            continue; // PyTorch's num_batches_tracked counters
        }
        let shape = view.shape().to_vec();
        let values = f32s(view.data());
        let unpacked: Vec<NamedTensor> = match names.get(&name) {
            Some(BackTo::One(burn, true)) if shape.len() == 2 => {
                let (r, c) = (shape[0], shape[1]);
                vec![(burn.clone(), vec![c, r], transposed(&values, r, c))]
            }
            Some(BackTo::One(burn, _)) => vec![(burn.clone(), shape, values)],
            Some(BackTo::Stack { stack, transpose }) => {
                let n = stack.len().max(1);
                if shape.is_empty() || shape[0] % n != 0 {
                    bail!("{shown}: tensor {name} {shape:?} does not split into {n} parts");
                }
                let mut part_shape = shape.clone();
                part_shape[0] /= n;
                let len = values.len() / n;
                stack
                    .iter()
                    .zip(values.chunks(len.max(1)))
                    .map(|(burn, v)| match part_shape[..] {
                        [r, c] if *transpose => (burn.clone(), vec![c, r], transposed(v, r, c)),
                        _ => (burn.clone(), part_shape.clone(), v.to_vec()),
                    })
                    .collect()
            }
            None if !names.is_empty() => {
                bail!("{shown}: tensor {name} is not one of the exported network's")
            }
            None => vec![(name, shape, values)],
        };
        for (name, shape, values) in unpacked {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push(burn_pack::Tensor::new(
                name,
                burn_pack::DType::F32,
                shape,
                None,
                burn_pack::Bytes::from_bytes_vec(bytes),
            ));
        }
    }
    let model = dir.path().join(MODEL_FILE);
    burn_pack::Writer::new(tensors)
        .write_to_file(&model)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", model.display()))?;
    Ok(Unpacked {
        run: RunDir::open(dir.path())?,
        _dir: dir,
    })
}

/// A row-major `[r, c]` matrix as `[c, r]`.
fn transposed(values: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; values.len()];
    for i in 0..r {
        for j in 0..c {
            v[j * r + i] = values[i * c + j];
        }
    }
    v
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
