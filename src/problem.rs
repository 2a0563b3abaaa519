//! A problem found in an input file: where it is and what is wrong.
//!
//! Config and seed validation collect every problem before giving up (as linkerd does), so an operator
//! fixes a file in one round instead of one error per restart. `check` and `serve` print the same lines.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line, when the parser knows it.
    pub line: Option<u64>,
    /// Field path such as `consumers[0].plugins[0].config.metadata_list[1].tdl_matrix`; may be empty.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line.filter(|l| *l > 0) {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// All problems of one load, printed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_line() {
        let p = Problem {
            file: "seed.yaml".into(),
            line: Some(4),
            path: "consumers[0].username".into(),
            reason: "required field is missing".into(),
        };
        assert_eq!(
            p.to_string(),
            "seed.yaml:4: consumers[0].username: required field is missing"
        );
        let p = Problem {
            line: None,
            path: String::new(),
            ..p
        };
        assert_eq!(p.to_string(), "seed.yaml: required field is missing");
    }
}
