//! Stacked LSTM and GRU layers over a sequence.
//!
//! The parameters are Burn's own `Lstm` and `Gru` modules (same initialisation, same
//! checkpoint layout); the forward pass is computed by `kiln_kernels::recurrent`, to the same
//! formulas: on flex one fused operation per layer (the input projection of all steps as one
//! matrix product, the gates fused, the weight gradients as one product after the loop), on
//! other backends Burn's operations one step at a time. Burn's own `forward` writes every
//! hidden state into one `[batch, T, hidden]` tensor with `slice_assign`, whose gradient is a
//! full-size tensor per time step (O(T²) work for a sequence of length T), and multiplies
//! each of the four gates separately; the per-step path here keeps the sequence as a `Vec` of
//! `[batch, features]` tensors and computes all gates in one product.
//!
//! LSTM (course deck 3), W_x and W_h the four gates' weights side by side (i, f, o, g):
//!
//! [i f o g] = x_t·W_x + h_{t−1}·W_h + b
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
use burn::tensor::{Device, Tensor};
use kiln_kernels::ops::on_flex_f32;
use kiln_kernels::recurrent;
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

/// A layer's weights with the gates side by side: W_x `[inputs, G·hidden]`, W_h
/// `[hidden, G·hidden]`, and the input and hidden biases `[G·hidden]` (zeros where a
/// transform has none). Gathered from Burn's per-gate modules at every training forward pass
/// (so that gradients reach them); sampling gathers them once ([`Stack::weights`]) instead of
/// copying them again for every character.
#[derive(Clone, Debug)]
pub struct Gates {
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b_x: Tensor<1>,
    b_h: Tensor<1>,
}

impl Gates {
    fn of(gates: &[&GateController], device: &Device) -> Gates {
        let cat2 = |f: &dyn Fn(&GateController) -> Tensor<2>| {
            Tensor::cat(gates.iter().map(|g| f(g)).collect(), 1)
        };
        let bias = |l: &burn::nn::Linear| match &l.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([l.weight.dims()[1]], device),
        };
        Gates {
            w_x: cat2(&|g| g.input_transform.weight.val()),
            w_h: cat2(&|g| g.hidden_transform.weight.val()),
            b_x: Tensor::cat(gates.iter().map(|g| bias(&g.input_transform)).collect(), 0),
            b_h: Tensor::cat(gates.iter().map(|g| bias(&g.hidden_transform)).collect(), 0),
        }
    }
}

fn lstm_gates(lstm: &Lstm, device: &Device) -> Gates {
    let forget = lstm
        .forget_gate
        .as_ref()
        .expect("kiln builds LSTMs with a forget gate");
    // Gate order: i, f, o, g.
    Gates::of(
        &[&lstm.input_gate, forget, &lstm.output_gate, &lstm.cell_gate],
        device,
    )
}

fn gru_gates(gru: &Gru, device: &Device) -> Gates {
    Gates::of(&[&gru.update_gate, &gru.reset_gate, &gru.new_gate], device)
}

/// A sequence between layers: one time-major `[T, batch, features]` tensor (flex's fused
/// layers) or one `[batch, features]` tensor per step (Burn's operations). One lives at a
/// time per stack, so the size difference between the two does not matter.
#[allow(clippy::large_enum_variant)]
enum Sequence {
    Whole(Tensor<3>),
    Steps(Vec<Tensor<2>>),
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
    /// (zeros when `None`); returns the top layer's h_t for every t, time-major
    /// `[T, batch, hidden]`, and the final states.
    pub fn forward(
        &self,
        steps: Vec<Tensor<2>>,
        state: Option<Vec<LayerState>>,
    ) -> (Tensor<3>, Vec<LayerState>) {
        let device = steps
            .first()
            .map(|x| x.device())
            .unwrap_or_else(|| self.device());
        self.forward_with(&self.weights(&device), steps, state)
    }

    /// Every layer's [`Gates`], gathered once (for sampling, where the weights do not change
    /// between characters).
    pub fn weights(&self, device: &Device) -> Vec<Gates> {
        self.layers
            .iter()
            .map(|layer| match (&layer.lstm, &layer.gru) {
                (Some(lstm), _) => lstm_gates(lstm, device),
                (None, Some(gru)) => gru_gates(gru, device),
                (None, None) => unreachable!("a layer holds an LSTM or a GRU"),
            })
            .collect()
    }

    /// [`Stack::forward`] with the layers' weights gathered beforehand ([`Stack::weights`]).
    pub fn forward_with(
        &self,
        weights: &[Gates],
        steps: Vec<Tensor<2>>,
        state: Option<Vec<LayerState>>,
    ) -> (Tensor<3>, Vec<LayerState>) {
        let Some(first) = steps.first() else {
            let device = self.device();
            return (
                Tensor::zeros([0, 0, self.hidden], &device),
                state.unwrap_or_default(),
            );
        };
        let [batch, _] = first.dims();
        let device = first.device();
        let state = state.unwrap_or_else(|| self.zero_state(batch, &device));
        let mut seq = if on_flex_f32(first) {
            Sequence::Whole(Tensor::stack(steps, 0))
        } else {
            Sequence::Steps(steps)
        };
        let mut finals = Vec::with_capacity(self.layers.len());
        for ((layer, g), s) in self.layers.iter().zip(weights).zip(state) {
            let fin;
            (seq, fin) = if layer.lstm.is_some() {
                lstm_layer(g, seq, s)
            } else {
                gru_layer(g, seq, s)
            };
            finals.push(fin);
        }
        let out = match seq {
            Sequence::Whole(x) => x,
            Sequence::Steps(steps) => Tensor::stack(steps, 0),
        };
        (out, finals)
    }

    fn device(&self) -> Device {
        let l = &self.layers[0];
        match (&l.lstm, &l.gru) {
            (Some(lstm), _) => lstm.input_gate.input_transform.weight.device(),
            (_, Some(gru)) => gru.update_gate.input_transform.weight.device(),
            (None, None) => unreachable!("a layer holds an LSTM or a GRU"),
        }
    }
}

/// The last step of a time-major `[T, batch, features]` sequence, `[batch, features]`.
pub fn last_step(seq: Tensor<3>) -> Tensor<2> {
    let [t, b, f] = seq.dims();
    seq.narrow(0, t - 1, 1).reshape([b, f])
}

fn lstm_layer(g: &Gates, seq: Sequence, state: LayerState) -> (Sequence, LayerState) {
    let h0 = state.hidden;
    let c0 = state.cell.expect("an LSTM state has a cell");
    let b = g.b_x.clone() + g.b_h.clone();
    match seq {
        Sequence::Whole(x) => {
            let (out, c) = recurrent::lstm(x, g.w_x.clone(), g.w_h.clone(), b, h0, c0);
            let hidden = last_step(out.clone());
            (
                Sequence::Whole(out),
                LayerState {
                    hidden,
                    cell: Some(c),
                },
            )
        }
        Sequence::Steps(steps) => {
            let (out, c) = recurrent::lstm_steps(steps, g.w_x.clone(), g.w_h.clone(), b, h0, c0);
            let hidden = out.last().expect("a sequence is not empty").clone();
            (
                Sequence::Steps(out),
                LayerState {
                    hidden,
                    cell: Some(c),
                },
            )
        }
    }
}

fn gru_layer(g: &Gates, seq: Sequence, state: LayerState) -> (Sequence, LayerState) {
    let (w_x, w_h, b_x, b_h) = (g.w_x.clone(), g.w_h.clone(), g.b_x.clone(), g.b_h.clone());
    let (seq, hidden) = match seq {
        Sequence::Whole(x) => {
            let out = recurrent::gru(x, w_x, w_h, b_x, b_h, state.hidden);
            let hidden = last_step(out.clone());
            (Sequence::Whole(out), hidden)
        }
        Sequence::Steps(steps) => {
            let out = recurrent::gru_steps(steps, w_x, w_h, b_x, b_h, state.hidden);
            let hidden = out.last().expect("a sequence is not empty").clone();
            (Sequence::Steps(out), hidden)
        }
    };
    (seq, LayerState { hidden, cell: None })
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
        assert_eq!(got.dims(), [5, 3, 6]);
        close(to_vec(got.swap_dims(0, 1)), to_vec(want));
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
        close(to_vec(got.swap_dims(0, 1)), to_vec(want));
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
        let got = got.swap_dims(0, 1);
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
                assert_eq!(out.dims(), [4, 2, 5]);
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
                (last_step(out).sum(), first)
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
