//! `--print-capabilities`: the JSON object QEMU's vhost-user conventions define
//! (docs/interop/vhost-user.rst, "Backend program conventions").

/// Renders `{"type": TYPE, "features": [...]}`.
pub fn capabilities_json(device_type: &str, features: &[&str]) -> String {
    let value = serde_json::json!({ "type": device_type, "features": features });
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_type_and_features() {
        let text = super::capabilities_json("block", &["read-only", "blk-file"]);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["type"], "block");
        assert_eq!(value["features"][1], "blk-file");
    }
}
