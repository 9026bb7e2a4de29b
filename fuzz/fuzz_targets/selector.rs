//! Selectors as operators write them (`type:value`, e.g. `unix:uid:1000`).
#![no_main]

use meshid_server::cli::parse_selector;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = parse_selector(text) {
        // Type and value are non-empty, the type holds no `:`, and together
        // they are exactly what was written.
        assert!(!sel.r#type.is_empty() && !sel.value.is_empty());
        assert!(!sel.r#type.contains(':'));
        assert_eq!(format!("{}:{}", sel.r#type, sel.value), text);
    }
});
