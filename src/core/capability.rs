//! Capability gating (SPEC §8.2): routes name the capabilities an entry must have, by name or by
//! index into `capabilities.names`, and the first one the entry lacks refuses the call.
//!
//! An entry's `capabilities` array holds flags by index (the seed document: 0 chat, 1 advanced
//! chat, 2 image generation, 3 speech, 4 premium); an index past its end counts as 0, so a shorter
//! array can never grant what it does not list.

use serde::Deserialize;

/// The seed document's names, in index order.
pub const DEFAULT_NAMES: [&str; 5] = [
    "chat",
    "advanced_chat",
    "image_generation",
    "speech",
    "premium",
];

/// A required capability as written in a route: its index or its name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CapabilityRef {
    Index(u64),
    Name(String),
}

/// `capabilities.names`: what each capability index is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityNames(Vec<String>);

impl Default for CapabilityNames {
    fn default() -> Self {
        CapabilityNames(DEFAULT_NAMES.iter().map(|n| n.to_string()).collect())
    }
}

impl CapabilityNames {
    pub fn new(names: Vec<String>) -> CapabilityNames {
        CapabilityNames(names)
    }

    /// The index a reference names, or why it names none.
    pub fn resolve(&self, reference: &CapabilityRef) -> Result<usize, String> {
        match reference {
            CapabilityRef::Index(i) => usize::try_from(*i)
                .ok()
                .filter(|i| *i < self.0.len())
                .ok_or_else(|| {
                    format!(
                        "index {i} is outside capabilities.names (0..{})",
                        self.0.len()
                    )
                }),
            CapabilityRef::Name(name) => self.0.iter().position(|n| n == name).ok_or_else(|| {
                format!(
                    "unknown capability `{name}` (capabilities.names: {})",
                    self.0.join(", ")
                )
            }),
        }
    }

    /// The name of an index that [`CapabilityNames::resolve`] gave.
    pub fn name(&self, index: usize) -> &str {
        self.0.get(index).map_or("unknown", String::as_str)
    }
}

/// The first required index whose flag the entry does not have set.
pub fn first_missing(required: impl IntoIterator<Item = usize>, flags: &[u8]) -> Option<usize> {
    required
        .into_iter()
        .find(|&i| flags.get(i).copied() != Some(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_indexes_resolve() {
        let names = CapabilityNames::default();
        assert_eq!(
            names.resolve(&CapabilityRef::Name("image_generation".into())),
            Ok(2)
        );
        assert_eq!(names.resolve(&CapabilityRef::Index(4)), Ok(4));
        assert!(
            names
                .resolve(&CapabilityRef::Index(5))
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            names
                .resolve(&CapabilityRef::Name("video".into()))
                .unwrap_err()
                .contains("unknown capability `video`")
        );
        assert_eq!(names.name(2), "image_generation");
    }

    #[test]
    fn missing_flags_including_past_the_end() {
        assert_eq!(first_missing([0, 1], &[1, 1, 0, 0, 0]), None);
        assert_eq!(first_missing([0, 2, 3], &[1, 1, 0, 0, 0]), Some(2));
        assert_eq!(first_missing([4], &[1, 1]), Some(4));
        assert_eq!(first_missing([], &[]), None);
    }
}
