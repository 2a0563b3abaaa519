//! Reading the original request path the way that makes route ACLs apply to the most paths.
//!
//! An ACL on `/gpt/chat` is worthless if `/solar/../gpt/chat`, `/gpt/%63hat`, `/gpt\chat` or
//! `/gpt;x/chat` slip past it, because gateways, WHATWG parsers and Java servers read those as
//! `/gpt/chat`. So matching happens on one canonical form (SPEC §5), in this order: bytes at or above
//! 0x80 taken as percent-encoded, percent-encoded unreserved characters decoded (and `%2F`, `%5C`,
//! `%3B` read as the separators they encode — treating them as separators can only make more ACLs
//! apply), backslashes read as slashes, `;` parameters cut from each segment, repeated slashes
//! collapsed, dot segments removed (RFC 3986 §5.2.4). The result is ASCII, always starts with `/`,
//! and normalizing it again changes nothing. Route prefixes compare without regard to ASCII case.
//!
//! There is one decoder of `%XX` here; query parameters use `form_urlencoded`.

/// The canonical form of a raw path (query already removed; any bytes).
pub fn normalize(raw: &[u8]) -> String {
    let decoded = decode(raw);
    let without_params = cut_parameters(&decoded);
    remove_dot_segments(&without_params)
}

/// The path as written, made comparable but not reinterpreted: high bytes percent-encoded, nothing
/// decoded or removed. Some upstreams route on exactly this, so its route's ACL applies too.
pub fn plain(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        push_byte(&mut out, b);
    }
    out
}

/// Whether `raw` is already in canonical form (then it can be borrowed as it is).
pub fn is_canonical(raw: &[u8]) -> bool {
    raw.first() == Some(&b'/')
        && raw
            .iter()
            .all(|&b| b.is_ascii_graphic() && !matches!(b, b'%' | b'\\' | b';'))
        && !raw
            .windows(2)
            .any(|w| w[0] == b'/' && matches!(w[1], b'/' | b'.'))
}

/// The value of one hex digit (`%XX` escapes; also the admin API's path segments).
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends one byte of a path: visible ASCII as it is, anything else percent-encoded.
fn push_byte(out: &mut String, b: u8) {
    if b.is_ascii_graphic() {
        out.push(char::from(b));
    } else {
        push_escape(out, b);
    }
}

fn push_escape(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// High bytes encoded, `%XX` of unreserved characters and separators decoded, other escapes kept
/// with upper-case hex, a `%` that starts no escape encoded as `%25` (so a second pass cannot
/// decode what the first one assembled), backslashes as slashes.
fn decode(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len() + 1);
    if raw.first() != Some(&b'/') {
        out.push('/');
    }
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        let escaped = (b == b'%')
            .then(|| Some(hex_value(*raw.get(i + 1)?)? * 16 + hex_value(*raw.get(i + 2)?)?))
            .flatten();
        match (b, escaped) {
            (_, Some(decoded)) => {
                match decoded {
                    b'/' | b'\\' => out.push('/'),
                    b';' => out.push(';'),
                    d if is_unreserved(d) => out.push(char::from(d)),
                    d => push_escape(&mut out, d),
                }
                i += 3;
                continue;
            }
            (b'%', None) => push_escape(&mut out, b'%'),
            (b'\\', None) => out.push('/'),
            (b, None) => push_byte(&mut out, b),
        }
        i += 1;
    }
    out
}

/// `/gpt;x/chat;v=1` → `/gpt/chat`: Java servers drop `;` parameters before routing.
fn cut_parameters(path: &str) -> String {
    if !path.contains(';') {
        return path.to_owned();
    }
    path.split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
}

/// Collapses repeated slashes and removes dot segments; the result starts with `/` and keeps a
/// trailing slash (a directory) as written.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

/// A route prefix in comparable form: normalized like a path (the trailing slash kept as written,
/// so `/gpt5-free/` does not match `/gpt5-freebie`) and lower-cased.
pub fn prefix_key(prefix: &str) -> String {
    normalize(prefix.as_bytes()).to_ascii_lowercase()
}

/// Plain string prefix, without regard to ASCII case: `/gpt4o/chat` matches `/gpt4o/chatter`,
/// because Kong and nginx route that to the same upstream. `key` comes from [`prefix_key`].
pub fn prefix_matches(key: &str, path: &str) -> bool {
    path.len() >= key.len() && path.as_bytes()[..key.len()].eq_ignore_ascii_case(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> String {
        normalize(path.as_bytes())
    }

    #[test]
    fn spec_examples() {
        assert_eq!(n("/solar/../gpt/chat"), "/gpt/chat");
        assert_eq!(n("/gpt/%63hat"), "/gpt/chat");
        assert_eq!(n("/gpt\\chat"), "/gpt/chat");
        assert_eq!(n("/gpt%5Cchat"), "/gpt/chat");
        assert_eq!(n("/gpt;x/chat"), "/gpt/chat");
        assert_eq!(n("//gpt4o//chat"), "/gpt4o/chat");
        assert_eq!(n("/gpt4o/./chat"), "/gpt4o/chat");
    }

    #[test]
    fn high_bytes_are_percent_encoded() {
        assert_eq!(normalize("/gpt4o/é".as_bytes()), "/gpt4o/%C3%A9");
        assert_eq!(normalize(b"/gpt4o/\xff/chat"), "/gpt4o/%FF/chat");
        assert_eq!(plain("/a/é".as_bytes()), "/a/%C3%A9");
    }

    #[test]
    fn encoded_dots_slashes_and_parameters_cannot_escape() {
        assert_eq!(n("/x/%2e%2E/gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(n("/gpt4o%2Fchat"), "/gpt4o/chat");
        assert_eq!(n("/a/%2F%2F../gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(n("/../../gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(n("gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(n("/x/..;/gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(n("/gpt4o%3Bx/chat"), "/gpt4o/chat");
    }

    #[test]
    fn reserved_escapes_stay_encoded() {
        assert_eq!(n("/a%3fb"), "/a%3Fb");
        assert_eq!(n("/%"), "/%25");
        assert_eq!(n("/%4"), "/%254");
        assert_eq!(n("/%zz"), "/%25zz");
        assert_eq!(n("/%%32e"), "/%252e");
    }

    #[test]
    fn trailing_slashes_and_root() {
        assert_eq!(n("/"), "/");
        assert_eq!(n(""), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/"), "/a/");
    }

    #[test]
    fn canonical_paths_are_recognized() {
        assert!(is_canonical(b"/gpt4o/chat"));
        for raw in ["/a//b", "/a/./b", "/a;b", "/a%41", "/a\\b", "a"] {
            assert!(!is_canonical(raw.as_bytes()), "{raw}");
            assert_ne!(n(raw), raw);
        }
    }

    #[test]
    fn plain_prefixes_ignore_case_and_keep_the_trailing_slash() {
        let key = prefix_key("/gpt4o/chat");
        assert!(prefix_matches(&key, "/gpt4o/chat"));
        assert!(prefix_matches(&key, "/gpt4o/chatter"));
        assert!(prefix_matches(&key, "/GPT4O/Chat/x"));
        assert!(!prefix_matches(&key, "/gpt4o/cha"));
        let free = prefix_key("/gpt5-free/");
        assert!(!prefix_matches(&free, "/gpt5-freebie/chat"));
        assert!(!prefix_matches(&free, "/gpt5-free"));
        assert!(prefix_matches(&free, "/gpt5-free/chat"));
        assert!(prefix_matches(&prefix_key("/"), "/anything"));
    }
}
