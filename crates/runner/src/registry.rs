//! The model zoo. Adding a model family: write its crate (implementing
//! `kiln_core::Family`), add a `configs/<name>.toml` with `model = "<name>"`, and add one
//! line below.

use kiln_core::Family;

#[rustfmt::skip] // one family per line
pub static FAMILIES: &[&dyn Family] = &[
    &kiln_linear::LinearFamily,
    &kiln_logistic::LogisticFamily,
    &kiln_mlp::FAMILY,
    &kiln_cnn::FAMILY,
    &kiln_cnn::INCEPTION,
    &kiln_resnet::FAMILY,
    &kiln_autoencoder::AUTOENCODER,
    &kiln_autoencoder::VAE,
    &kiln_gan::FAMILY,
    &kiln_sequence::SERIES,
    &kiln_sequence::CLASSIFY,
    &kiln_sequence::CHAR,
    &kiln_sequence::CHAR_TRANSFORMER,
    &kiln_dqn::FAMILY,
];
