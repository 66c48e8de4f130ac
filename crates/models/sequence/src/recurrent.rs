//! Stacked LSTM and GRU layers over a sequence kept as one tensor per time step.
//!
//! The parameters are Burn's own `Lstm` and `Gru` modules (same initialisation, same
//! checkpoint layout); the forward pass is computed here, to the same formulas, in a shape
//! that is cheap to differentiate. Burn's `forward` writes every hidden state into one
//! `[batch, T, hidden]` tensor with `slice_assign`, whose gradient is a full-size tensor per
//! time step (O(T²) work for a sequence of length T), and multiplies each of the four gates
//! separately. Here the sequence stays a `Vec` of `[batch, features]` tensors, and each step
//! is one matrix product with all gates side by side.
//!
//! LSTM (course deck 3), with [x_t, h_{t−1}] the input and the previous hidden state side by
//! side and W = [W_i W_f W_o W_g] the four gates' weights stacked by columns:
//!
//! [i f o g] = [x_t, h_{t−1}]·W + b
//! c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)
//! h_t = σ(o) ⊙ tanh(c_t)
//!
//! GRU (Burn's and PyTorch's "reset after" form):
//!
//! z = σ(x_t W_xz + b_xz + h_{t−1} W_hz + b_hz),  r = σ(x_t W_xr + b_xr + h_{t−1} W_hr + b_hr)
//! n = tanh(x_t W_xn + b_xn + r ⊙ (h_{t−1} W_hn + b_hn))
//! h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

use burn::module::Module;
use burn::nn::{GateController, Gru, GruConfig, Lstm, LstmConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which recurrent cell (`params.net.cell`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    #[default]
    Lstm,
    Gru,
}

impl Cell {
    pub fn as_str(self) -> &'static str {
        match self {
            Cell::Lstm => "LSTM",
            Cell::Gru => "GRU",
        }
    }
}

/// `[params.net]` of a forecaster or a sequence classifier: the cell and the stack's shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackParams {
    #[serde(default)]
    pub cell: Cell,
    /// Width of every recurrent layer.
    pub hidden: usize,
    /// Number of stacked recurrent layers.
    #[serde(default = "one")]
    pub layers: usize,
}

fn one() -> usize {
    1
}

impl StackParams {
    /// `hidden` and `layers` are at least 1 (the error names the field).
    pub fn check(&self) -> Result<(), String> {
        for (k, v) in [("hidden", self.hidden), ("layers", self.layers)] {
            if v == 0 {
                return Err(format!("{k}: must be at least 1"));
            }
        }
        Ok(())
    }

    /// The stack for `inputs` features per step.
    pub fn stack(&self, inputs: usize, device: &Device) -> Stack {
        Stack::new(self.cell, inputs, self.hidden, self.layers, device)
    }

    /// `2×64 LSTM → linear 5` for a stack with a linear head of `outputs`.
    pub fn describe(&self, outputs: usize) -> String {
        format!(
            "{}×{} {} → linear {outputs}",
            self.layers,
            self.hidden,
            self.cell.as_str()
        )
    }
}

/// One recurrent layer: exactly one of the two is present.
#[derive(Module, Debug)]
pub struct Layer {
    pub lstm: Option<Lstm>,
    pub gru: Option<Gru>,
}

/// The state a layer carries from one step to the next: h (and c for an LSTM).
#[derive(Clone, Debug)]
pub struct LayerState {
    pub hidden: Tensor<2>,
    pub cell: Option<Tensor<2>>,
}

/// `layers` recurrent layers of width `hidden`, the first reading `inputs` features.
#[derive(Module, Debug)]
pub struct Stack {
    pub layers: Vec<Layer>,
    pub hidden: usize,
}

/// W and b of one gate: the input and hidden transforms' weights stacked by rows, their
/// biases summed.
fn gate_weights(g: &GateController) -> (Tensor<2>, Option<Tensor<1>>) {
    let w = Tensor::cat(
        vec![
            g.input_transform.weight.val(),
            g.hidden_transform.weight.val(),
        ],
        0,
    ); // [inputs + hidden, hidden]
    let b = match (&g.input_transform.bias, &g.hidden_transform.bias) {
        (Some(a), Some(b)) => Some(a.val() + b.val()),
        (Some(a), None) | (None, Some(a)) => Some(a.val()),
        (None, None) => None,
    };
    (w, b)
}

fn affine(x: Tensor<2>, w: &Tensor<2>, b: &Option<Tensor<1>>) -> Tensor<2> {
    let y = x.matmul(w.clone());
    match b {
        Some(b) => y + b.clone().unsqueeze(),
        None => y,
    }
}

fn cat_bias(parts: Vec<Option<Tensor<1>>>) -> Option<Tensor<1>> {
    let parts: Option<Vec<_>> = parts.into_iter().collect();
    parts.map(|p| Tensor::cat(p, 0))
}

impl Stack {
    pub fn new(cell: Cell, inputs: usize, hidden: usize, layers: usize, device: &Device) -> Self {
        let layers = (0..layers)
            .map(|l| {
                let d_in = if l == 0 { inputs } else { hidden };
                match cell {
                    Cell::Lstm => Layer {
                        lstm: Some(LstmConfig::new(d_in, hidden, true).init(device)),
                        gru: None,
                    },
                    Cell::Gru => Layer {
                        lstm: None,
                        gru: Some(GruConfig::new(d_in, hidden, true).init(device)),
                    },
                }
            })
            .collect();
        Stack { layers, hidden }
    }

    /// Zero state for a batch of `batch` sequences.
    pub fn zero_state(&self, batch: usize, device: &Device) -> Vec<LayerState> {
        self.layers
            .iter()
            .map(|l| LayerState {
                hidden: Tensor::zeros([batch, self.hidden], device),
                cell: l
                    .lstm
                    .as_ref()
                    .map(|_| Tensor::zeros([batch, self.hidden], device)),
            })
            .collect()
    }

    /// Run the sequence `steps` (each `[batch, inputs]`) through every layer from `state`
    /// (zeros when `None`); returns the top layer's h_t for every t and the final states.
    pub fn forward(
        &self,
        mut steps: Vec<Tensor<2>>,
        state: Option<Vec<LayerState>>,
    ) -> (Vec<Tensor<2>>, Vec<LayerState>) {
        let Some(first) = steps.first() else {
            return (steps, state.unwrap_or_default());
        };
        let [batch, _] = first.dims();
        let device = first.device();
        let state = state.unwrap_or_else(|| self.zero_state(batch, &device));
        let mut finals = Vec::with_capacity(self.layers.len());
        for (layer, s) in self.layers.iter().zip(state) {
            let (out, fin) = match (&layer.lstm, &layer.gru) {
                (Some(lstm), _) => lstm_layer(lstm, steps, s),
                (None, Some(gru)) => gru_layer(gru, steps, s),
                (None, None) => unreachable!("a layer holds an LSTM or a GRU"),
            };
            steps = out;
            finals.push(fin);
        }
        (steps, finals)
    }
}

fn lstm_layer(
    lstm: &Lstm,
    steps: Vec<Tensor<2>>,
    state: LayerState,
) -> (Vec<Tensor<2>>, LayerState) {
    let h_dim = lstm.d_hidden;
    let forget = lstm
        .forget_gate
        .as_ref()
        .expect("kiln builds LSTMs with a forget gate");
    // Gate order in the stacked W: i, f, o, g.
    let gates = [&lstm.input_gate, forget, &lstm.output_gate, &lstm.cell_gate];
    let (ws, bs): (Vec<_>, Vec<_>) = gates.iter().map(|g| gate_weights(g)).unzip();
    let w = Tensor::cat(ws, 1); // [inputs + hidden, 4·hidden]
    let b = cat_bias(bs);
    let mut h = state.hidden;
    let mut c = state.cell.expect("an LSTM state has a cell");
    let mut out = Vec::with_capacity(steps.len());
    for x in steps {
        let z = affine(Tensor::cat(vec![x, h], 1), &w, &b); // [batch, 4·hidden]
        let [batch, _] = z.dims();
        let s = sigmoid(z.clone().slice([0..batch, 0..3 * h_dim]));
        let g = z.slice([0..batch, 3 * h_dim..4 * h_dim]).tanh();
        let i = s.clone().slice([0..batch, 0..h_dim]);
        let f = s.clone().slice([0..batch, h_dim..2 * h_dim]);
        let o = s.slice([0..batch, 2 * h_dim..3 * h_dim]);
        c = f * c + i * g;
        h = o * c.clone().tanh();
        out.push(h.clone());
    }
    (
        out,
        LayerState {
            hidden: h,
            cell: Some(c),
        },
    )
}

fn gru_layer(gru: &Gru, steps: Vec<Tensor<2>>, state: LayerState) -> (Vec<Tensor<2>>, LayerState) {
    let h_dim = gru.d_hidden;
    let gates = [&gru.update_gate, &gru.reset_gate, &gru.new_gate];
    let wx = Tensor::cat(
        gates
            .iter()
            .map(|g| g.input_transform.weight.val())
            .collect(),
        1,
    ); // [inputs, 3·hidden]
    let wh = Tensor::cat(
        gates
            .iter()
            .map(|g| g.hidden_transform.weight.val())
            .collect(),
        1,
    ); // [hidden, 3·hidden]
    let bx = cat_bias(
        gates
            .iter()
            .map(|g| g.input_transform.bias.as_ref().map(|b| b.val()))
            .collect(),
    );
    let bh = cat_bias(
        gates
            .iter()
            .map(|g| g.hidden_transform.bias.as_ref().map(|b| b.val()))
            .collect(),
    );
    let mut h = state.hidden;
    let mut out = Vec::with_capacity(steps.len());
    for x in steps {
        let gx = affine(x, &wx, &bx); // [batch, 3·hidden]
        let gh = affine(h.clone(), &wh, &bh);
        let [batch, _] = gx.dims();
        let zr = sigmoid(
            gx.clone().slice([0..batch, 0..2 * h_dim]) + gh.clone().slice([0..batch, 0..2 * h_dim]),
        );
        let z = zr.clone().slice([0..batch, 0..h_dim]);
        let r = zr.slice([0..batch, h_dim..2 * h_dim]);
        let n = (gx.slice([0..batch, 2 * h_dim..3 * h_dim])
            + r * gh.slice([0..batch, 2 * h_dim..3 * h_dim]))
        .tanh();
        // h_t = (1 − z) ⊙ n + z ⊙ h_{t−1} = n + z ⊙ (h_{t−1} − n)
        h = n.clone() + z * (h - n);
        out.push(h.clone());
    }
    (
        out,
        LayerState {
            hidden: h,
            cell: None,
        },
    )
}

/// Stack `[batch, features]` steps into `[batch, T, features]`.
pub fn stack_steps(steps: Vec<Tensor<2>>) -> Tensor<3> {
    Tensor::stack(steps, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LstmState;
    use burn::tensor::Distribution;
    use kiln_core::data::to_vec;

    fn close(a: Vec<f32>, b: Vec<f32>) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    fn input(d: &Device) -> Tensor<3> {
        Tensor::random([3, 5, 4], Distribution::Normal(0.0, 1.0), d)
    }

    /// The fused LSTM step gives Burn's `Lstm::forward`, from zeros and from a given state.
    #[test]
    fn lstm_matches_burn() {
        let d = Device::flex();
        d.seed(11);
        let stack = Stack::new(Cell::Lstm, 4, 6, 1, &d);
        let x = input(&d);
        let lstm = stack.layers[0].lstm.as_ref().unwrap();
        let (want, want_state) = lstm.forward(x.clone(), None);
        let (got, got_state) = stack.forward(
            x.clone().iter_dim(1).map(|t| t.squeeze_dim(1)).collect(),
            None,
        );
        assert_eq!(got.len(), 5);
        close(to_vec(stack_steps(got)), to_vec(want));
        close(
            to_vec(got_state[0].hidden.clone()),
            to_vec(want_state.hidden),
        );
        close(
            to_vec(got_state[0].cell.clone().unwrap()),
            to_vec(want_state.cell),
        );

        let c0 = Tensor::<2>::random([3, 6], Distribution::Normal(0.0, 1.0), &d);
        let h0 = Tensor::<2>::random([3, 6], Distribution::Normal(0.0, 1.0), &d);
        let (want, _) = lstm.forward(x.clone(), Some(LstmState::new(c0.clone(), h0.clone())));
        let (got, _) = stack.forward(
            x.iter_dim(1).map(|t| t.squeeze_dim(1)).collect(),
            Some(vec![LayerState {
                hidden: h0,
                cell: Some(c0),
            }]),
        );
        close(to_vec(stack_steps(got)), to_vec(want));
    }

    /// The fused GRU step gives Burn's `Gru::forward`.
    #[test]
    fn gru_matches_burn() {
        let d = Device::flex();
        d.seed(12);
        let stack = Stack::new(Cell::Gru, 4, 6, 1, &d);
        let x = input(&d);
        let gru = stack.layers[0].gru.as_ref().unwrap();
        let h0 = Tensor::<2>::random([3, 6], Distribution::Normal(0.0, 1.0), &d);
        let want = gru.forward(x.clone(), Some(h0.clone()));
        let (got, fin) = stack.forward(
            x.iter_dim(1).map(|t| t.squeeze_dim(1)).collect(),
            Some(vec![LayerState {
                hidden: h0,
                cell: None,
            }]),
        );
        let got = stack_steps(got);
        close(to_vec(got.clone()), to_vec(want));
        close(
            to_vec(fin[0].hidden.clone()),
            to_vec(got.slice([0..3, 4..5, 0..6]).reshape([3, 6])),
        );
    }

    /// Shapes of every cell and stack depth; the parameter count of PyTorch's `nn.LSTM` /
    /// `nn.GRU` (which also keep two bias vectors per gate).
    #[test]
    fn shapes_and_parameter_counts() {
        let d = Device::flex();
        for cell in [Cell::Lstm, Cell::Gru] {
            for layers in [1, 2, 3] {
                let stack = Stack::new(cell, 7, 5, layers, &d);
                let steps: Vec<Tensor<2>> = (0..4).map(|_| Tensor::ones([2, 7], &d)).collect();
                let (out, fin) = stack.forward(steps, None);
                assert_eq!(out.len(), 4);
                assert!(out.iter().all(|h| h.dims() == [2, 5]));
                assert_eq!(fin.len(), layers);
                assert_eq!(fin[0].cell.is_some(), cell == Cell::Lstm);
                let gates = if cell == Cell::Lstm { 4 } else { 3 };
                let per = |i: usize| gates * (i * 5 + 5 * 5 + 2 * 5);
                assert_eq!(stack.num_params(), per(7) + (layers - 1) * per(5));
            }
        }
    }

    /// Gradients flow through every time step to the first layer's input weights: the
    /// derivative of h_T with respect to x_1 is non-zero (finite differences agree).
    #[test]
    fn gradient_matches_finite_differences() {
        let d = Device::flex().autodiff();
        d.seed(4);
        for cell in [Cell::Lstm, Cell::Gru] {
            let stack = Stack::new(cell, 2, 3, 2, &d);
            let x0: Vec<f32> = vec![0.3, -0.7];
            let loss_at = |x: &[f32], track: bool| {
                let first = Tensor::<2>::from_floats([[x[0], x[1]]], &d);
                let first = if track { first.require_grad() } else { first };
                let mut steps = vec![first.clone()];
                steps.extend(
                    (0..5).map(|t| Tensor::<2>::ones([1, 2], &d).mul_scalar(t as f32 * 0.1)),
                );
                let (out, _) = stack.forward(steps, None);
                (out.last().unwrap().clone().sum(), first)
            };
            let (loss, first) = loss_at(&x0, true);
            let grads = loss.backward();
            let g = to_vec(first.grad(&grads).unwrap());
            let eps = 1e-2;
            for k in 0..2 {
                let mut up = x0.clone();
                up[k] += eps;
                let mut down = x0.clone();
                down[k] -= eps;
                let fd = (loss_at(&up, false).0.into_scalar::<f32>()
                    - loss_at(&down, false).0.into_scalar::<f32>())
                    / (2.0 * eps);
                assert!(g[k].abs() > 1e-5, "{cell:?}: no gradient reaches x_1");
                assert!(
                    (g[k] - fd).abs() < 2e-3 + 0.02 * fd.abs(),
                    "{cell:?}: {} vs {fd}",
                    g[k]
                );
            }
        }
    }
}
