//! The model loader (`pnn-eval --model`) on arbitrary file bytes: parsed and checked or refused,
//! never a panic; what loads writes back to the same model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pnn::report::export::SavedModel;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(model) = SavedModel::from_bytes(data, path) {
        let back = SavedModel::from_bytes(&model.to_bytes(), path).expect("a written model loads");
        assert_eq!(back, model);
    }
});
