//! Every WGSL shader parses and validates with naga, for every storage
//! variant, with no adapter (runs on any machine).
#![cfg(feature = "wgpu")]

use kvsieve::wgpu::naga;
use kvsieve::wgpu::shaders::{ShaderId, StorageVariant, source};

fn validate(id: ShaderId, variant: StorageVariant) -> Result<(), String> {
    let text = source(id, variant);
    let module = naga::front::wgsl::parse_str(&text)
        .map_err(|e| e.emit_to_string_with_path(&text, id.stem()))?;
    let mut v = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    v.validate(&module)
        .map_err(|e| e.emit_to_string_with_path(&text, id.stem()))?;
    for entry in id.entries() {
        if !module
            .entry_points
            .iter()
            .any(|ep| ep.name == *entry && ep.stage == naga::ShaderStage::Compute)
        {
            return Err(format!("no compute entry point `{entry}`"));
        }
    }
    Ok(())
}

#[test]
fn every_shader_validates_with_naga() {
    let mut failures = Vec::new();
    for id in ShaderId::ALL {
        for variant in StorageVariant::ALL {
            if let Err(e) = validate(id, variant) {
                failures.push(format!("{} ({}):\n{e}", id.stem(), variant.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_wgsl_file_is_embedded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let libs = ["common", "common_norm", "common_attend"];
    for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let known = libs.contains(&stem.as_str())
            || stem.starts_with("dtype_")
            || ShaderId::ALL.iter().any(|id| id.stem() == stem);
        assert!(
            known,
            "shaders/{stem}.wgsl is not embedded by src/wgpu/shaders.rs"
        );
    }
}
