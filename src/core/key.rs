//! API keys in their stored form: SHA-256, never the plain text.
//!
//! A presented key is hashed at once and only the digest is looked up, logged (never), or stored, so
//! a memory dump, a log line or a Redis copy never reveals a usable key.

use std::fmt;

use sha2::{Digest, Sha256};

/// The SHA-256 digest of an API key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(plain_key: &str) -> KeyHash {
        KeyHash(Sha256::digest(plain_key.as_bytes()).into())
    }

    /// Parses the lower- or upper-case hex form (`key_sha256` in the seed).
    pub fn from_hex(hex_text: &str) -> Option<KeyHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut out).ok()?;
        Some(KeyHash(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Only the first bytes, so that even a debug log shows no full digest.
impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_hex_round_trip() {
        let h = KeyHash::of("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyHash::from_hex(&h.to_hex().to_uppercase()), Some(h));
        assert_eq!(KeyHash::from_hex("abc"), None);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }
}
