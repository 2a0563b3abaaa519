//! The seed file: Kong declarative YAML, the fallback source of consumers, keys and metadata.
//!
//! Reading happens in two steps so every problem can be reported at once: `yaml` turns text into a
//! tree that knows its lines, `parse` checks the schema over that tree. Keys are hashed in `parse`;
//! the text and the tree are dropped when loading ends, so no plain key outlives it.

pub mod parse;
pub mod record;
pub mod yaml;

use std::path::Path;

pub use parse::SeedData;

use crate::problem::Problem;

/// Reads and checks a seed file; the problems name the file as given.
pub fn load_file(path: &Path) -> Result<SeedData, Vec<Problem>> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem {
            file: label.clone(),
            line: None,
            path: String::new(),
            reason: format!("cannot read the seed file: {e}"),
        }]
    })?;
    parse_text(&text, &label)
}

/// Checks seed text; `label` names the source in problems.
pub fn parse_text(text: &str, label: &str) -> Result<SeedData, Vec<Problem>> {
    let root = yaml::parse(text).map_err(|e| {
        let reason = match e.column {
            Some(column) => format!("YAML syntax error at column {column}: {}", e.message),
            None => format!("YAML syntax error: {}", e.message),
        };
        vec![Problem {
            file: label.to_owned(),
            line: e.line,
            path: String::new(),
            reason,
        }]
    })?;
    parse::parse_document(&root, label)
}
