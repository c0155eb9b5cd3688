//! The registry of model families: which GGUF `general.architecture` or `config.json`
//! `model_type` we serve, and what each family changes in the shared decoder
//! (`crate::decoder`). A family is one file here with one [`Family`] value; adding one means
//! adding a file and a line in [`FAMILIES`], not editing the decoder.
//!
//! Both readers (`crate::gguf`, `crate::safetensors`) fill the fields every family shares
//! (sizes, rope base and scaling, norms' epsilon, special tokens) with llama's defaults, then
//! hand the config to the family, which sets its switches from the same metadata.

mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use serde_json::Value;

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// One model family.
pub(crate) struct Family {
    /// The family.
    pub(crate) architecture: Architecture,
    /// GGUF `general.architecture` values it serves.
    pub(crate) gguf_names: &'static [&'static str],
    /// `config.json` `model_type` (or `architectures[0]`) values it serves.
    pub(crate) hf_names: &'static [&'static str],
    /// Sets the family's switches from GGUF metadata (`arch` is the key prefix).
    pub(crate) from_gguf: fn(&GgufFile, &str, &mut ModelConfig) -> Result<()>,
    /// Sets the family's switches from `config.json`.
    pub(crate) from_hf: fn(&Value, &mut ModelConfig) -> Result<()>,
}

/// Every family we serve.
pub(crate) static FAMILIES: &[&Family] = &[
    &llama::LLAMA,
    &mistral::MISTRAL,
    &qwen2::QWEN2,
    &qwen3::QWEN3,
    &gemma3::GEMMA3,
    &phi3::PHI3,
];

/// The family of a GGUF `general.architecture`.
pub(crate) fn by_gguf_name(name: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf_names.contains(&name))
        .ok_or_else(|| unsupported(name, |f| f.gguf_names))
}

/// The family of a `config.json` `model_type` or architecture class name.
pub(crate) fn by_hf_name(name: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.hf_names.contains(&name))
        .ok_or_else(|| unsupported(name, |f| f.hf_names))
}

fn unsupported(name: &str, names: fn(&Family) -> &'static [&'static str]) -> Error {
    let supported: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| names(f).iter().copied())
        .filter(|n| !n.ends_with("ForCausalLM"))
        .collect();
    Error::UnsupportedArchitecture {
        name: name.to_owned(),
        supported: supported.join(", "),
    }
}

/// Reads an optional field of `config.json` (a missing or null field is `None`).
pub(crate) fn hf_field<'a>(json: &'a Value, key: &str) -> Option<&'a Value> {
    json.get(key).filter(|v| !v.is_null())
}

/// Reads an optional number of `config.json`; a field of another type is an error naming it.
pub(crate) fn hf_f64(json: &Value, key: &str) -> Result<Option<f64>> {
    hf_field(json, key)
        .map(|v| {
            v.as_f64().ok_or_else(|| Error::InvalidMetadata {
                key: key.to_owned(),
                reason: format!("must be a number, got {v}"),
            })
        })
        .transpose()
}

/// Reads an optional non-negative integer of `config.json`.
pub(crate) fn hf_usize(json: &Value, key: &str) -> Result<Option<usize>> {
    hf_field(json, key)
        .map(|v| {
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| Error::InvalidMetadata {
                    key: key.to_owned(),
                    reason: format!("must be a non-negative integer, got {v}"),
                })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_maps_to_one_family() {
        for family in FAMILIES {
            for name in family.gguf_names {
                assert_eq!(
                    by_gguf_name(name).map(|f| f.architecture).ok(),
                    Some(family.architecture)
                );
            }
            for name in family.hf_names {
                assert_eq!(
                    by_hf_name(name).map(|f| f.architecture).ok(),
                    Some(family.architecture)
                );
            }
        }
    }

    #[test]
    fn an_unknown_architecture_names_the_supported_ones() {
        let Err(e) = by_gguf_name("mamba") else {
            panic!("mamba is not served")
        };
        let message = e.to_string();
        for name in ["llama", "qwen2", "qwen3", "gemma3", "phi3"] {
            assert!(message.contains(name), "{message}");
        }
        assert!(message.contains("`mamba`"), "{message}");
    }
}
