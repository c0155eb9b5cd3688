//! The `candela` binary.
fn main() {}
