//! A character-level Transformer decoder (course deck 3's "function-learning machines": DNN,
//! CNN, RNN and the Transformer), the alternative to the LSTM of [`crate::text`] on the same
//! corpus, windows, loss and sampling.
//!
//! Token embedding plus a learned position embedding, then N pre-norm blocks
//!
//! ```text
//! x ← x + MHA(LN₁(x))        causal multi-head self-attention
//! x ← x + W₂·GELU(W₁·LN₂(x)) position-wise MLP
//! ```
//!
//! and a final layer norm before the output projection to the vocabulary. Per head, with
//! queries Q = XW_Q, keys K = XW_K and values V = XW_V of width d_k = d_model / heads,
//!
//! ```text
//! Attention(Q, K, V) = softmax(QKᵀ/√d_k + M) V,   M_ij = 0 for j ≤ i, −∞ for j > i
//! ```
//!
//! — the causal mask M lets position i look only at positions ≤ i, so the logits at i are a
//! prediction of character i + 1 from what came before. The parameters are Burn's
//! `MultiHeadAttention` and `LayerNorm` (their names and initialisation); the computation is
//! one product for the queries, keys and values together (the three projections' weights
//! joined column-wise), `kiln_kernels::attention::causal_attention` (on flex one fused operation: the scores, the
//! masked softmax and the weighted sum per head, without the `[batch, heads, T, T]` tensors
//! between them) and `kiln_kernels::norm::layer_norm` (one pass each way), Burn's own
//! operations on other backends. The blocks are written out here rather than taken from `TransformerEncoder` so that generation can keep
//! its own key/value cache ([`KvCache`]): each new character computes its query, key and
//! value once and attends over the cached keys and values, so it costs one position, not the
//! whole context. (Burn's autoregressive cache recomputes the attention of every earlier
//! position at every step.)

use burn::module::Module;
use burn::nn::attention::{MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_core::data::to_vec;
use kiln_kernels::activation::gelu;
use kiln_kernels::attention::causal_attention;
use kiln_kernels::linear::{affine, linear};
use kiln_kernels::norm::layer_norm;

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct Block {
    pub norm_1: LayerNorm,
    pub attention: MultiHeadAttention,
    pub norm_2: LayerNorm,
    pub ff_in: Linear,
    pub ff_out: Linear,
}

impl Block {
    fn new(d_model: usize, heads: usize, d_ff: usize, device: &Device) -> Self {
        Block {
            norm_1: LayerNormConfig::new(d_model)
                .with_epsilon(kiln_kernels::norm::EPSILON)
                .init(device),
            attention: MultiHeadAttentionConfig::new(d_model, heads)
                .with_dropout(0.0)
                .init(device),
            norm_2: LayerNormConfig::new(d_model)
                .with_epsilon(kiln_kernels::norm::EPSILON)
                .init(device),
            ff_in: LinearConfig::new(d_model, d_ff).init(device),
            ff_out: LinearConfig::new(d_ff, d_model).init(device),
        }
    }

    /// W₂·GELU(W₁·LN₂(x)).
    fn mlp<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let h = gelu(linear(&self.ff_in, layer_norm(x, &self.norm_2)));
        linear(&self.ff_out, h)
    }

    /// `[batch, T, d]` → `[batch, T, d]`, causal.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attention(layer_norm(x, &self.norm_1));
        x.clone() + self.mlp(x)
    }

    /// MHA(n) with the causal mask: [Q | K | V] = n·[W_Q | W_K | W_V] + [b_Q | b_K | b_V] as
    /// one product (the three weights joined column-wise, as PyTorch keeps them in one
    /// `in_proj_weight`; its backward pass is then one product for ∂L/∂n instead of three
    /// and two sums), the heads' attention, the output projection.
    fn self_attention(&self, n: Tensor<3>) -> Tensor<3> {
        let mha = &self.attention;
        let parts = [&mha.query, &mha.key, &mha.value];
        // Weight before bias, layer by layer, as `Linear::forward` reads them: parameters are
        // initialised on first use, so this order keeps every seed's starting weights.
        let mut weights = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for layer in parts {
            weights.push(layer.weight.val());
            biases.extend(layer.bias.as_ref().map(|b| b.val()));
        }
        let qkv = if biases.len() == 3 {
            affine(n, Tensor::cat(weights, 1), Tensor::cat(biases, 0))
        } else {
            Tensor::cat(parts.map(|l| linear(l, n.clone())).to_vec(), 2)
        };
        linear(&mha.output, causal_attention(qkv, mha.n_heads))
    }

    /// One new position `[1, 1, d]` against the cached keys and values of the earlier ones
    /// (which it extends by its own).
    fn step(&self, x: Tensor<3>, cache: &mut LayerCache) -> Tensor<3> {
        let mha = &self.attention;
        let (h, dk) = (mha.n_heads, mha.d_k);
        let n = layer_norm(x.clone(), &self.norm_1);
        let split = |l: &Linear| l.forward(n.clone()).reshape([1, 1, h, dk]).swap_dims(1, 2);
        let (q, k, v) = (split(&mha.query), split(&mha.key), split(&mha.value));
        let (k, v) = match cache.kv.take() {
            Some((k0, v0)) => (Tensor::cat(vec![k0, k], 2), Tensor::cat(vec![v0, v], 2)),
            None => (k, v),
        };
        cache.kv = Some((k.clone(), v.clone()));
        // softmax(q·Kᵀ/√d_k) over the positions so far (all ≤ this one: no mask needed).
        let w = softmax(q.matmul(k.transpose()).div_scalar((dk as f32).sqrt()), 3);
        let c = w.matmul(v).swap_dims(1, 2).reshape([1, 1, h * dk]);
        let x = x + mha.output.forward(c);
        x.clone() + self.mlp(x)
    }
}

/// The keys and values `[1, heads, t, d_k]` of one block for the positions generated so far.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

/// Generation state: every block's keys and values, and the tokens they cover.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// The tokens in the cache, oldest first (at most the context length).
    pub tokens: Vec<u32>,
}

/// Token and position embeddings, N blocks, final norm, output projection.
#[derive(Module, Debug)]
pub struct CharTransformer {
    pub embedding: Embedding,
    pub positions: Embedding,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl CharTransformer {
    /// `d_model` wide, `layers` blocks of `heads` heads and an MLP of width `d_ff`, positions
    /// 0 … `context` − 1.
    pub fn new(
        vocab: usize,
        context: usize,
        d_model: usize,
        heads: usize,
        d_ff: usize,
        layers: usize,
        device: &Device,
    ) -> Self {
        CharTransformer {
            embedding: EmbeddingConfig::new(vocab, d_model).init(device),
            positions: EmbeddingConfig::new(context, d_model).init(device),
            blocks: (0..layers)
                .map(|_| Block::new(d_model, heads, d_ff, device))
                .collect(),
            norm: LayerNormConfig::new(d_model)
                .with_epsilon(kiln_kernels::norm::EPSILON)
                .init(device),
            head: LinearConfig::new(d_model, vocab).init(device),
        }
    }

    pub fn vocab(&self) -> usize {
        self.head.weight.dims()[1]
    }

    /// How many positions the model has embeddings for (the training window T).
    pub fn context(&self) -> usize {
        self.positions.weight.dims()[0]
    }

    /// Logits `[batch, T, vocab]` for windows of T ≤ context tokens.
    pub fn forward(&self, windows: &[&[u32]], device: &Device) -> Tensor<3> {
        let b = windows.len();
        let t = windows.first().map_or(0, |w| w.len());
        let ids: Vec<i64> = windows
            .iter()
            .flat_map(|w| w.iter().map(|&c| c as i64))
            .collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device);
        let pos: Vec<i64> = (0..t as i64).collect();
        let pos = Tensor::<2, Int>::from_data(TensorData::new(pos, [1, t]), device);
        let mut x = self.embedding.forward(ids) + self.positions.forward(pos);
        for block in &self.blocks {
            x = block.forward(x);
        }
        linear(&self.head, layer_norm(x, &self.norm))
    }

    /// Logits `[T·batch, vocab]` in time-major rows (row t·batch + b), as the loss expects.
    pub fn logits(&self, windows: &[&[u32]], device: &Device) -> Tensor<2> {
        let y = self.forward(windows, device);
        let [b, t, v] = y.dims();
        y.swap_dims(0, 1).reshape([t * b, v])
    }

    /// Feed one token at the next position of `cache`; the logits after it. When the cache
    /// holds a full context, it restarts from the last half of it (re-fed one by one), so
    /// the model always conditions on at most its last `context` characters.
    pub fn step(&self, token: u32, cache: &mut KvCache, device: &Device) -> Vec<f32> {
        let context = self.context();
        if cache.tokens.len() == context {
            let keep = cache.tokens[context - context / 2..].to_vec();
            *cache = KvCache::default();
            for &c in &keep {
                self.step(c, cache, device);
            }
        }
        if cache.layers.is_empty() {
            cache.layers = vec![LayerCache::default(); self.blocks.len()];
        }
        let p = cache.tokens.len() as i64;
        let id = Tensor::<2, Int>::from_data(TensorData::new(vec![token as i64], [1, 1]), device);
        let pos = Tensor::<2, Int>::from_data(TensorData::new(vec![p], [1, 1]), device);
        let mut x = self.embedding.forward(id) + self.positions.forward(pos);
        for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
            x = block.step(x, layer);
        }
        cache.tokens.push(token);
        let v = self.vocab();
        to_vec(self.head.forward(layer_norm(x, &self.norm)).reshape([1, v]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(device: &Device) -> CharTransformer {
        device.seed(3);
        CharTransformer::new(7, 8, 16, 4, 32, 2, device)
    }

    #[test]
    fn shapes() {
        let device = Device::flex();
        let m = tiny(&device);
        let w: Vec<u32> = vec![1, 2, 3, 4, 5];
        let y = m.forward(&[&w, &w, &w], &device);
        assert_eq!(y.dims(), [3, 5, 7]);
        assert_eq!(m.logits(&[&w, &w, &w], &device).dims(), [15, 7]);
        assert_eq!((m.vocab(), m.context()), (7, 8));
    }

    /// Changing a later character never changes an earlier position's logits.
    #[test]
    fn causal() {
        let device = Device::flex();
        let m = tiny(&device);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
        let mut b = a.clone();
        b[4] = 0;
        let ya = to_vec(m.forward(&[&a], &device));
        let yb = to_vec(m.forward(&[&b], &device));
        let v = 7;
        assert_eq!(
            ya[..4 * v],
            yb[..4 * v],
            "positions 0–3 must not see position 4"
        );
        assert_ne!(ya[4 * v..], yb[4 * v..]);
    }

    /// The block's attention (kiln's fused causal attention between Burn's projections, Q, K
    /// and V from one product) is
    /// Burn's `MultiHeadAttention` with the autoregressive mask, on flex and on ndarray.
    #[test]
    #[allow(deprecated)] // Device::ndarray: one of Burn's other backends, for the comparison
    fn the_blocks_attention_is_burns_multi_head_attention() {
        use burn::nn::attention::{MhaInput, generate_autoregressive_mask};
        for device in [Device::flex(), Device::ndarray()] {
            let m = tiny(&device);
            let x = Tensor::<3>::random(
                [2, 5, 16],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            let mha = &m.blocks[0].attention;
            let mask = generate_autoregressive_mask(2, 5, &device);
            let want = to_vec(
                mha.forward(MhaInput::self_attn(x.clone()).mask_attn(mask))
                    .context,
            );
            let got = to_vec(m.blocks[0].self_attention(x));
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    /// Cached one-at-a-time logits equal the full forward pass at every position.
    #[test]
    fn cached_steps_equal_the_full_pass() {
        let device = Device::flex();
        let m = tiny(&device);
        let w: Vec<u32> = vec![3, 1, 4, 1, 5, 2, 6, 0];
        let full = to_vec(m.forward(&[&w], &device));
        let mut cache = KvCache::default();
        for (t, &c) in w.iter().enumerate() {
            let step = m.step(c, &mut cache, &device);
            for (a, b) in step.iter().zip(&full[t * 7..(t + 1) * 7]) {
                assert!((a - b).abs() < 1e-4, "position {t}: {a} vs {b}");
            }
        }
        // A full context restarts from its last half.
        m.step(1, &mut cache, &device);
        assert_eq!(cache.tokens, vec![5, 2, 6, 0, 1]);
    }

    /// A tiny copy task: six random symbols, a separator, the same six again. Attention must
    /// look back seven positions; the loss on the copied half falls to near zero.
    #[test]
    fn learns_a_copy_task() {
        use burn::nn::loss::CrossEntropyLossConfig;
        use burn::optim::GradientsParams;
        use kiln_core::optim::OptimizerConfig;
        use rand::{Rng, SeedableRng};

        let device = Device::flex().autodiff();
        device.seed(1);
        let mut m = CharTransformer::new(10, 16, 32, 4, 64, 2, &device);
        let mut optim = OptimizerConfig::default().init();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (n, batch, v) = (6, 32, 10);
        let mut loss_at = Vec::new();
        for _ in 0..300 {
            let seqs: Vec<Vec<u32>> = (0..batch)
                .map(|_| {
                    let a: Vec<u32> = (0..n).map(|_| rng.random_range(0..9)).collect();
                    let mut s = a.clone();
                    s.push(9);
                    s.extend(&a);
                    s
                })
                .collect();
            let inputs: Vec<&[u32]> = seqs.iter().map(|s| &s[..2 * n]).collect();
            // Positions n … 2n−1 (the separator and the copy so far) predict the copy.
            let y = m
                .forward(&inputs, &device)
                .slice([0..batch, n..2 * n, 0..v])
                .reshape([batch * n, v]);
            let t: Vec<i64> = seqs
                .iter()
                .flat_map(|s| s[n + 1..].iter().map(|&c| c as i64))
                .collect();
            let t = Tensor::<1, Int>::from_data(TensorData::new(t, [batch * n]), &device);
            let loss = CrossEntropyLossConfig::new().init(&device).forward(y, t);
            loss_at.push(loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            m = optim.step(3e-3, m, grads);
        }
        let first = loss_at[0];
        let last = loss_at[loss_at.len() - 10..].iter().sum::<f32>() / 10.0;
        assert!(first > 1.5, "starts near ln 9 ≈ 2.2: {first}");
        assert!(last < 0.05, "copy loss after 300 steps: {last}");
    }
}
