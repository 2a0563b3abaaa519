//! The character rules of SPEC §3 for every string that ends up in a header or a Redis key.
//!
//! Seed file, config file and Redis records are held to the same rules, so they are written once,
//! here: a name that the seed refuses cannot slip in through an operator record or a config route.

/// Which characters a string may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// `id`, `provider_name`, methods: visible ASCII, no spaces.
    Visible,
    /// `username`, `custom_id`: printable ASCII (spaces allowed). Usernames also refuse `{` and `}`
    /// (see [`Text::Username`]).
    Printable,
    /// Usernames: printable ASCII without `{` or `}` (they are Redis Cluster hash tags).
    Username,
    /// ACL group names: printable ASCII without a comma (groups are joined with `, `).
    Group,
    /// Tags: any UTF-8 without control characters (they are JSON-escaped into a header).
    NoControl,
    /// API keys: no control characters and no surrounding whitespace (a presented key is trimmed,
    /// so a stored key with spaces around it could never match).
    Key,
    /// Names that never reach a header (route names): anything without control characters.
    Name,
}

impl Text {
    /// `Ok` when `s` (already known to be non-empty) follows the rule, else the reason.
    pub fn check(self, s: &str) -> Result<(), &'static str> {
        if s.chars().any(char::is_control) {
            return Err("contains a control character (CR, LF, NUL, ...)");
        }
        let printable = || s.bytes().all(is_printable_ascii);
        match self {
            Text::Visible if !s.bytes().all(|b| b.is_ascii_graphic()) => {
                Err("must be visible ASCII without spaces")
            }
            Text::Printable if !printable() => Err("must be printable ASCII"),
            Text::Username if !printable() => Err("must be printable ASCII"),
            Text::Username if s.contains(['{', '}']) => {
                Err("must not contain `{` or `}` (they delimit Redis Cluster hash tags)")
            }
            Text::Group if !printable() => Err("must be printable ASCII"),
            Text::Group if s.contains(',') => Err("must not contain a comma"),
            Text::Key if s.trim() != s => Err("must not begin or end with whitespace"),
            _ => Ok(()),
        }
    }
}

/// Space through `~`: what a header value may hold without escaping.
pub fn is_printable_ascii(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(Text::Visible.check("kt-midm-base").is_ok());
        assert!(Text::Visible.check("a b").is_err());
        assert!(Text::Printable.check("a b").is_ok());
        assert!(Text::Printable.check("믿음").is_err());
        assert!(Text::Username.check("user{1}").is_err());
        assert!(Text::Group.check("a,b").is_err());
        assert!(Text::NoControl.check("믿음").is_ok());
        assert!(Text::NoControl.check("a\nb").is_err());
        assert!(Text::Key.check(" key").is_err());
        assert!(Text::Key.check("key\t").is_err());
        assert!(Text::Key.check("k e y").is_ok());
        assert!(Text::Name.check("any name/ok").is_ok());
        assert_eq!(
            Text::Printable.check("a\r\nb"),
            Err("contains a control character (CR, LF, NUL, ...)")
        );
    }
}
