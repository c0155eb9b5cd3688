//! Lists a GGUF file's tensors (name, GGML type, shape) and a count per type and shape, to see
//! which quantized matmul paths a model needs.
//!
//! `cargo run --release -p candela-models --example gguf_tensors -- models/gemma-3-270m-q4_k_m.gguf`

use std::collections::BTreeMap;

use candle_core::quantized::gguf_file::Content;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: gguf_tensors FILE.gguf")?;
    let mut file = std::io::BufReader::new(std::fs::File::open(&path)?);
    let content = Content::read(&mut file)?;
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by(|a, b| a.0.cmp(b.0));
    let mut per_kind: BTreeMap<(String, Vec<usize>), (usize, String)> = BTreeMap::new();
    for (name, info) in &infos {
        let dims = info.shape.dims().to_vec();
        println!("{name:32} {:6} {dims:?}", format!("{:?}", info.ggml_dtype));
        // Layer tensors collapse to their role (`blk.N.ffn_down.weight` -> `ffn_down.weight`).
        let role = name
            .splitn(3, '.')
            .nth(2)
            .filter(|_| name.starts_with("blk."));
        let e = per_kind
            .entry((format!("{:?}", info.ggml_dtype), dims))
            .or_insert((0, String::new()));
        e.0 += 1;
        let role = role.unwrap_or(name).to_string();
        if !e.1.split(' ').any(|r| r == role) {
            e.1 = format!("{} {role}", e.1).trim().to_string();
        }
    }
    println!("\ncount  type    shape ([out, in] for matrices)  tensors");
    for ((dtype, dims), (count, roles)) in per_kind {
        println!("{count:5}  {dtype:6}  {:30}  {roles}", format!("{dims:?}"));
    }
    Ok(())
}
