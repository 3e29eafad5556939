//! `include/tessera.h` is what cbindgen makes of `src/lib.rs` now. When this fails after a
//! change to the C ABI, regenerate the header with
//! `TESSERA_BLESS=1 cargo test -p tessera-capi --test header` and commit it.

use std::path::Path;

#[test]
fn the_checked_in_header_is_what_cbindgen_generates() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new().with_crate(crate_dir).with_config(config).generate().expect("cbindgen reads src/lib.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let path = crate_dir.join("include/tessera.h");
    if std::env::var_os("TESSERA_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/tessera.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(checked_in == generated, "include/tessera.h is stale: run `TESSERA_BLESS=1 cargo test -p tessera-capi --test header` and commit it");
}

/// Names in backticks, in the `# Safety` notes of the header's functions, that are not
/// parameters of the function they document: `(function, name)`. Constants, types and other
/// functions (`TESSERA_*`, `Tessera*`, `tessera_*`) are not parameter names and are let be.
fn unknown_safety_names(header: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    let mut lines = header.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if let Some(text) = line.strip_prefix("//") {
            doc.push(text.trim());
            continue;
        }
        let mut decl = line.to_string();
        while !decl.contains(';') && !decl.contains('{') && decl.contains('(') {
            match lines.next() {
                Some(more) => decl.push_str(more),
                None => break,
            }
        }
        if let Some((name, params)) = function(&decl) {
            let safety = doc.iter().skip_while(|l| **l != "# Safety").skip(1);
            for quoted in safety.flat_map(|l| l.split('`').skip(1).step_by(2)) {
                let word = quoted.trim_start_matches('*');
                let is_name = !word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if is_name && !word.starts_with("tessera_") && !params.iter().any(|p| p == word) {
                    found.push((name.clone(), word.to_string()));
                }
            }
        }
        doc.clear();
    }
    found
}

/// The name and parameter names of a C function declaration, if `decl` is one.
fn function(decl: &str) -> Option<(String, Vec<String>)> {
    let (head, rest) = decl.split_once('(')?;
    let name = head.split_whitespace().last()?.trim_start_matches('*').to_string();
    let params = rest.split(')').next()?;
    let names = params.split(',').filter_map(|p| p.split_whitespace().last()).map(|n| n.trim_start_matches('*').to_string());
    Some((name, names.filter(|n| n != "void").collect()))
}

#[test]
fn safety_notes_name_only_parameters_of_their_function() {
    let planted = "// Does it.\n//\n// # Safety\n// `table` and `dim_out` must be writable.\nint32_t tessera_x(uint32_t *table,\n    uint32_t *dim);\n";
    assert_eq!(unknown_safety_names(planted), [("tessera_x".to_string(), "dim_out".to_string())], "the check finds a planted mistake");
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/tessera.h")).expect("read include/tessera.h");
    let found = unknown_safety_names(&header);
    assert!(found.is_empty(), "# Safety notes name what is not a parameter of their function: {found:?}");
}
