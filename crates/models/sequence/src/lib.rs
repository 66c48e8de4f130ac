//! Recurrent networks (course deck 3): LSTM and GRU layers ([`recurrent`]) for time-series
//! forecasting ([`series`]), sequence classification ([`sequence`]) and character-level
//! language models ([`text`]), and a character-level Transformer beside them ([`transformer`]).

pub mod family;
pub mod recurrent;
pub mod sequence;
pub mod series;
pub mod text;
pub mod transformer;

pub use family::{CHAR, CHAR_TRANSFORMER, CLASSIFY, SERIES};
