//! Helpers live in each test file; this crate exists so `tests/` is a workspace member.
