//! "Only `store/` speaks SQL", checked: no file outside `src/store/` names rusqlite or runs a
//! statement (test modules at the bottom of a file excepted, as they set up broken databases
//! on purpose).

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn only_the_store_speaks_sql() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let forbidden = [
        "rusqlite",
        ".prepare_cached(",
        ".prepare(",
        ".query_row(",
        ".query_map(",
        ".execute_batch(",
        "\"SELECT ",
        "\"INSERT ",
        "\"UPDATE ",
        "\"DELETE FROM",
        "\"CREATE ",
    ];
    let mut found = Vec::new();
    for f in &files {
        if f.starts_with(src.join("store")) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            for pat in forbidden {
                if line.contains(pat) {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL outside src/store/:\n{}",
        found.join("\n")
    );
    assert!(files.len() > 20, "the walk found the sources");
}
