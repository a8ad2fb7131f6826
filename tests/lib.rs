//! End-to-end tests of the `spool` binary live in `tests/tests/`; this crate has no code.
