//! Models out of kiln as ONNX graphs (`kiln export <run> --format onnx`): the protobuf messages
//! an inference graph needs (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto,
//! ValueInfoProto, from onnx/onnx.proto3), encoded by hand — the wire format is stable and
//! the few messages are small — and a [`Graph`] builder with Burn's layers as ONNX operators
//! (opset 17): `Linear` → Gemm, `Conv2d` → Conv, `BatchNorm` → BatchNormalization (the
//! running averages: inference), `MaxPool2d` → MaxPool.
//!
//! [`read_graph`] decodes a file back (op types, initializer names and shapes, the opset), for
//! the tests; onnxruntime checks the numbers (`scripts/check_onnx.py`).

use anyhow::{Result, bail};
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};

use crate::data::to_vec;
use crate::proto::{Wire, fields, put_bytes, put_f32, put_int};

/// The ONNX operator set the graphs use.
pub const OPSET: i64 = 17;
/// ONNX IR version 8 (onnx 1.13+, what opset 17 ships with).
const IR_VERSION: u64 = 8;

/// An operator attribute.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(&'static str, i64),
    Ints(&'static str, Vec<i64>),
    Float(&'static str, f32),
}

impl Attr {
    /// AttributeProto: name = 1, f = 2, i = 3, ints = 8, type = 20 (FLOAT 1, INT 2, INTS 7).
    fn encode(&self) -> Vec<u8> {
        let mut a = Vec::new();
        match self {
            Attr::Int(name, v) => {
                put_bytes(&mut a, 1, name.as_bytes());
                put_int(&mut a, 3, *v);
                put_int(&mut a, 20, 2);
            }
            Attr::Ints(name, vs) => {
                put_bytes(&mut a, 1, name.as_bytes());
                for v in vs {
                    put_int(&mut a, 8, *v);
                }
                put_int(&mut a, 20, 7);
            }
            Attr::Float(name, v) => {
                put_bytes(&mut a, 1, name.as_bytes());
                put_f32(&mut a, 2, *v);
                put_int(&mut a, 20, 1);
            }
        }
        a
    }
}

/// ValueInfoProto of a float tensor: name = 1, type = 2 → TypeProto.tensor_type = 1 →
/// (elem_type = 1 FLOAT, shape = 2 → dim = 1 → dim_value = 1 | dim_param = 2).
fn value_info(name: &str, shape: &[Option<usize>]) -> Vec<u8> {
    let mut dims = Vec::new();
    for d in shape {
        let mut dim = Vec::new();
        match d {
            Some(v) => put_int(&mut dim, 1, *v as i64),
            None => put_bytes(&mut dim, 2, b"batch"),
        }
        put_bytes(&mut dims, 1, &dim);
    }
    let mut tensor = Vec::new();
    put_int(&mut tensor, 1, 1);
    put_bytes(&mut tensor, 2, &dims);
    let mut ty = Vec::new();
    put_bytes(&mut ty, 1, &tensor);
    let mut v = Vec::new();
    put_bytes(&mut v, 1, name.as_bytes());
    put_bytes(&mut v, 2, &ty);
    v
}

/// An inference graph under construction: one float input (batch dimension symbolic),
/// weights as initializers, nodes in order.
pub struct Graph {
    nodes: Vec<Vec<u8>>,
    initializers: Vec<Vec<u8>>,
    input: Vec<u8>,
    input_shape: Vec<usize>,
    count: usize,
}

impl Graph {
    /// A graph whose input `name` has `shape` after the batch dimension.
    pub fn new(name: &str, shape: &[usize]) -> Self {
        let mut full = vec![None];
        full.extend(shape.iter().map(|&d| Some(d)));
        Graph {
            nodes: Vec::new(),
            initializers: Vec::new(),
            input: value_info(name, &full),
            input_shape: shape.to_vec(),
            count: 0,
        }
    }

    /// The input's shape after the batch dimension (`[channels, h, w]` for images).
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.count += 1;
        format!("{hint}_{}", self.count)
    }

    /// A float initializer (TensorProto data_type 1); returns its name.
    pub fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, 1, &raw)
    }

    /// An int64 initializer (TensorProto data_type 7), as Reshape's shape; returns its name.
    pub fn constant_i64(&mut self, name: &str, values: &[i64]) -> String {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, &[values.len()], 7, &raw)
    }

    /// TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9 (little-endian).
    fn initializer(&mut self, name: &str, dims: &[usize], data_type: i64, raw: &[u8]) -> String {
        let mut t = Vec::new();
        for d in dims {
            put_int(&mut t, 1, *d as i64);
        }
        put_int(&mut t, 2, data_type);
        put_bytes(&mut t, 8, name.as_bytes());
        put_bytes(&mut t, 9, raw);
        self.initializers.push(t);
        name.to_string()
    }

    /// `x` reshaped to `shape` (−1: the batch, whatever it is).
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let name = self.fresh("shape");
        let shape = self.constant_i64(&name, shape);
        self.node("Reshape", &[x, &shape], &[])
    }

    /// A Burn `ConvTranspose2d` as ConvTranspose: its weight is `[in, out/groups, kh, kw]` in
    /// both, and its padding p removes p rows and columns on every side of the full output.
    pub fn conv_transpose(&mut self, name: &str, conv: &ConvTranspose2d, x: &str) -> String {
        let w = conv.weight.val();
        let dims = w.dims();
        let mut inputs = vec![
            x.to_string(),
            self.constant(&format!("{name}.weight"), &dims, &to_vec(w)),
        ];
        if let Some(bias) = &conv.bias {
            let c_out = dims[1] * conv.groups;
            inputs.push(self.constant(&format!("{name}.bias"), &[c_out], &to_vec(bias.val())));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let [ph, pw] = conv.padding.map(|p| p as i64);
        let ints = |v: [usize; 2]| v.iter().map(|&s| s as i64).collect();
        let attrs = [
            Attr::Ints("kernel_shape", ints(conv.kernel_size)),
            Attr::Ints("strides", ints(conv.stride)),
            Attr::Ints("dilations", ints(conv.dilation)),
            Attr::Int("group", conv.groups as i64),
            Attr::Ints("pads", vec![ph, pw, ph, pw]),
            Attr::Ints("output_padding", ints(conv.padding_out)),
        ];
        self.node("ConvTranspose", &inputs, &attrs)
    }

    /// A node `op(inputs)` with `attrs`; returns its output's name (NodeProto: input = 1,
    /// output = 2, name = 3, op_type = 4, attribute = 5).
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: &[Attr]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_as(op, inputs, attrs, &out)
    }

    /// [`node`](Self::node) with its output named `out` (the graph's output, say).
    pub fn node_as(&mut self, op: &str, inputs: &[&str], attrs: &[Attr], out: &str) -> String {
        let mut n = Vec::new();
        for i in inputs {
            put_bytes(&mut n, 1, i.as_bytes());
        }
        put_bytes(&mut n, 2, out.as_bytes());
        put_bytes(&mut n, 3, format!("{out}_node").as_bytes());
        put_bytes(&mut n, 4, op.as_bytes());
        for a in attrs {
            put_bytes(&mut n, 5, &a.encode());
        }
        self.nodes.push(n);
        out.to_string()
    }

    /// A Burn `Linear` (y = x·W + b, W [in, out]) as Gemm.
    pub fn linear(&mut self, name: &str, layer: &Linear, x: &str) -> String {
        let w = layer.weight.val();
        let dims = w.dims();
        let w = self.constant(&format!("{name}.weight"), &dims, &to_vec(w));
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &layer.bias {
            inputs.push(self.constant(&format!("{name}.bias"), &[dims[1]], &to_vec(b.val())));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node("Gemm", &inputs, &[])
    }

    /// A Burn `Conv2d` as Conv (pads as Burn applies them).
    pub fn conv(&mut self, name: &str, conv: &Conv2d, x: &str) -> Result<String> {
        let w = conv.weight.val();
        let dims = w.dims();
        let [kh, kw] = conv.kernel_size;
        let (t, b, l, r) = match conv.padding {
            PaddingConfig2d::Valid => (0, 0, 0, 0),
            PaddingConfig2d::Same if kh % 2 == 1 && kw % 2 == 1 && conv.stride == [1, 1] => {
                (kh / 2, kh / 2, kw / 2, kw / 2)
            }
            PaddingConfig2d::Same => bail!("{name}: same padding with an even kernel or a stride"),
            PaddingConfig2d::Explicit(top, left, bottom, right) => (top, bottom, left, right),
        };
        let mut inputs = vec![
            x.to_string(),
            self.constant(&format!("{name}.weight"), &dims, &to_vec(w)),
        ];
        if let Some(bias) = &conv.bias {
            inputs.push(self.constant(&format!("{name}.bias"), &[dims[0]], &to_vec(bias.val())));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let attrs = [
            Attr::Ints("kernel_shape", vec![kh as i64, kw as i64]),
            Attr::Ints("strides", conv.stride.iter().map(|&s| s as i64).collect()),
            Attr::Ints(
                "dilations",
                conv.dilation.iter().map(|&s| s as i64).collect(),
            ),
            Attr::Int("group", conv.groups as i64),
            // ONNX orders pads [top, left, bottom, right].
            Attr::Ints("pads", vec![t as i64, l as i64, b as i64, r as i64]),
        ];
        Ok(self.node("Conv", &inputs, &attrs))
    }

    /// A Burn `BatchNorm` at inference: (x − running mean) / √(running var + ε) · γ + β.
    pub fn batch_norm(&mut self, name: &str, bn: &BatchNorm, x: &str) -> String {
        let c = bn.gamma.dims()[0];
        let gamma = self.constant(&format!("{name}.weight"), &[c], &to_vec(bn.gamma.val()));
        let beta = self.constant(&format!("{name}.bias"), &[c], &to_vec(bn.beta.val()));
        let mean = self.constant(
            &format!("{name}.running_mean"),
            &[c],
            &to_vec(bn.running_mean.value()),
        );
        let var = self.constant(
            &format!("{name}.running_var"),
            &[c],
            &to_vec(bn.running_var.value()),
        );
        self.node(
            "BatchNormalization",
            &[x, &gamma, &beta, &mean, &var],
            &[Attr::Float("epsilon", bn.epsilon as f32)],
        )
    }

    /// A Burn `MaxPool2d` as MaxPool.
    pub fn max_pool(&mut self, pool: &MaxPool2d, x: &str) -> Result<String> {
        let pads = match pool.padding {
            PaddingConfig2d::Valid => [0, 0, 0, 0],
            PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
            PaddingConfig2d::Same => bail!("max pool: same padding is not exported"),
        };
        Ok(self.node(
            "MaxPool",
            &[x],
            &[
                Attr::Ints(
                    "kernel_shape",
                    pool.kernel_size.iter().map(|&s| s as i64).collect(),
                ),
                Attr::Ints("strides", pool.stride.iter().map(|&s| s as i64).collect()),
                Attr::Ints("pads", pads.iter().map(|&s| s as i64).collect()),
            ],
        ))
    }

    /// The finished model (ModelProto: ir_version = 1, producer_name = 2, graph = 7,
    /// opset_import = 8) with `output` of `shape` after the batch dimension (GraphProto:
    /// node = 1, name = 2, initializer = 5, input = 11, output = 12).
    pub fn finish(self, output: &str, shape: &[usize]) -> Vec<u8> {
        let mut g = Vec::new();
        for n in &self.nodes {
            put_bytes(&mut g, 1, n);
        }
        put_bytes(&mut g, 2, b"kiln");
        for t in &self.initializers {
            put_bytes(&mut g, 5, t);
        }
        put_bytes(&mut g, 11, &self.input);
        let mut full = vec![None];
        full.extend(shape.iter().map(|&d| Some(d)));
        put_bytes(&mut g, 12, &value_info(output, &full));
        let mut opset = Vec::new();
        put_bytes(&mut opset, 1, b"");
        put_int(&mut opset, 2, OPSET);
        let mut m = Vec::new();
        put_int(&mut m, 1, IR_VERSION as i64);
        put_bytes(&mut m, 2, b"kiln");
        put_bytes(&mut m, 7, &g);
        put_bytes(&mut m, 8, &opset);
        m
    }
}

/// `kiln export --format onnx`'s result: the model and a few inputs with kiln's outputs for
/// them (written beside it as `<name>.sample.safetensors`, to check a runtime against).
pub struct OnnxExport {
    pub model: Vec<u8>,
    /// (name, shape, values): the graph's input and output names.
    pub sample: Vec<crate::export::NamedTensor>,
}

/// What [`read_graph`] finds in a model file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphSummary {
    pub ir_version: u64,
    pub opset: i64,
    /// op_type of every node, in order.
    pub ops: Vec<String>,
    /// (name, dims) of every initializer.
    pub initializers: Vec<(String, Vec<usize>)>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Every node's inputs are a graph input, an initializer or an earlier node's output.
    pub connected: bool,
}

impl GraphSummary {
    /// The dims of the initializer `name`, if the graph has it.
    pub fn initializer(&self, name: &str) -> Option<&[usize]> {
        self.initializers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| &d[..])
    }
}

fn name_of(b: &[u8]) -> Option<String> {
    fields(b)?.into_iter().find_map(|(f, w)| match (f, w) {
        (1, Wire::Bytes(s)) => Some(String::from_utf8_lossy(s).into_owned()),
        _ => None,
    })
}

/// Decode an ONNX model's structure (not its numbers).
pub fn read_graph(bytes: &[u8]) -> Result<GraphSummary> {
    let bad = || anyhow::anyhow!("not an ONNX model");
    let mut s = GraphSummary::default();
    let mut produced: Vec<String> = Vec::new();
    let mut consumed: Vec<String> = Vec::new();
    for (f, w) in fields(bytes).ok_or_else(bad)? {
        match (f, w) {
            (1, Wire::Varint(v)) => s.ir_version = v,
            (8, Wire::Bytes(b)) => {
                for (f, w) in fields(b).ok_or_else(bad)? {
                    if let (2, Wire::Varint(v)) = (f, w) {
                        s.opset = v as i64;
                    }
                }
            }
            (7, Wire::Bytes(g)) => {
                for (f, w) in fields(g).ok_or_else(bad)? {
                    let Wire::Bytes(b) = w else { continue };
                    match f {
                        1 => {
                            for (f, w) in fields(b).ok_or_else(bad)? {
                                match (f, w) {
                                    (1, Wire::Bytes(i)) => {
                                        consumed.push(String::from_utf8_lossy(i).into_owned())
                                    }
                                    (2, Wire::Bytes(o)) => {
                                        produced.push(String::from_utf8_lossy(o).into_owned())
                                    }
                                    (4, Wire::Bytes(op)) => {
                                        s.ops.push(String::from_utf8_lossy(op).into_owned())
                                    }
                                    _ => {}
                                }
                            }
                        }
                        5 => {
                            let mut dims = Vec::new();
                            let mut name = String::new();
                            for (f, w) in fields(b).ok_or_else(bad)? {
                                match (f, w) {
                                    (1, Wire::Varint(d)) => dims.push(d as usize),
                                    (8, Wire::Bytes(n)) => {
                                        name = String::from_utf8_lossy(n).into_owned()
                                    }
                                    _ => {}
                                }
                            }
                            s.initializers.push((name, dims));
                        }
                        11 => s.inputs.push(name_of(b).ok_or_else(bad)?),
                        12 => s.outputs.push(name_of(b).ok_or_else(bad)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // Inputs are listed node by node, so check them against what exists at that point is
    // not possible from the flat lists; check that each is defined somewhere instead.
    let known = |n: &String| {
        s.inputs.contains(n) || produced.contains(n) || s.initializers.iter().any(|(i, _)| i == n)
    };
    s.connected = consumed.iter().all(known) && s.outputs.iter().all(|o| produced.contains(o));
    Ok(s)
}
