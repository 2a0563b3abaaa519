//! Normalizing the original request path before any route is matched.
//!
//! An ACL on `/gpt/chat` is worthless if `/solar/../gpt/chat`, `/gpt/%63hat` or `//gpt/chat` slip past
//! it, so matching happens on one canonical form (SPEC §5): percent-encoded unreserved characters
//! decoded, repeated slashes collapsed, then dot segments removed (RFC 3986 §5.2.4). We also decode
//! `%2F` to `/` for matching: many upstream frameworks route on the decoded path, and treating it as a
//! separator can only make more ACLs apply, never fewer.

use std::borrow::Cow;

/// The canonical form of `path` (query already removed). Borrows when nothing needs changing.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if is_canonical(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let collapsed = collapse_slashes(&decoded);
    let mut out = remove_dot_segments(&collapsed);
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Cow::Owned(out)
}

/// One pass over the bytes: no `%`, and no `/` followed by `/` or `.`.
fn is_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.first() == Some(&b'/')
        && !bytes.contains(&b'%')
        && !bytes
            .windows(2)
            .any(|w| w[0] == b'/' && matches!(w[1], b'/' | b'.'))
}

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

/// Decodes `%XX` for unreserved characters and `/`; other escapes stay, with upper-case hex.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2]))
        {
            let decoded = hi * 16 + lo;
            if is_unreserved(decoded) || decoded == b'/' {
                out.push(decoded);
            } else {
                out.push(b'%');
                out.push(bytes[i + 1].to_ascii_uppercase());
                out.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII bytes were substituted for ASCII escapes, so UTF-8 validity is preserved.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut previous_slash = false;
    for c in path.chars() {
        if c == '/' && previous_slash {
            continue;
        }
        previous_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4, on a path that is absolute or made so.
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

/// A route prefix in comparable form: normalized, without a trailing slash (`/` becomes empty and
/// matches every path).
pub fn prefix_key(prefix: &str) -> String {
    normalize(prefix).trim_end_matches('/').to_owned()
}

/// Whole-segment prefix test: `/gpt4o/chat` matches `/gpt4o/chat` and `/gpt4o/chat/x`, not
/// `/gpt4o/chatter`. `key` comes from [`prefix_key`].
pub fn segment_prefix_matches(key: &str, path: &str) -> bool {
    match path.strip_prefix(key) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The candidate prefix keys of `path`, longest first: `/a/b/c`, `/a/b`, `/a`, `` (root).
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.trim_end_matches('/');
    let mut next = Some(trimmed);
    std::iter::from_fn(move || {
        let current = next?;
        next = if current.is_empty() {
            None
        } else {
            current.rfind('/').map(|i| &current[..i])
        };
        Some(current)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        assert_eq!(normalize("/solar/../gpt/chat"), "/gpt/chat");
        assert_eq!(normalize("/gpt/%63hat"), "/gpt/chat");
        assert_eq!(normalize("//gpt4o//chat"), "/gpt4o/chat");
        assert_eq!(normalize("/gpt4o/./chat"), "/gpt4o/chat");
    }

    #[test]
    fn encoded_dots_and_slashes_cannot_escape() {
        assert_eq!(normalize("/x/%2e%2E/gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(normalize("/gpt4o%2Fchat"), "/gpt4o/chat");
        assert_eq!(normalize("/a/%2F%2F../gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(normalize("/../../gpt4o/chat"), "/gpt4o/chat");
        assert_eq!(normalize("gpt4o/chat"), "/gpt4o/chat");
    }

    #[test]
    fn reserved_escapes_stay_encoded() {
        assert_eq!(normalize("/a%3fb"), "/a%3Fb");
        assert_eq!(normalize("/%"), "/%");
        assert_eq!(normalize("/%4"), "/%4");
        assert_eq!(normalize("/%zz"), "/%zz");
    }

    #[test]
    fn trailing_slashes_and_root() {
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/.."), "/");
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("/a/"), "/a/");
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        assert!(matches!(normalize("/gpt4o/chat"), Cow::Borrowed(_)));
    }

    #[test]
    fn whole_segment_prefixes() {
        let key = prefix_key("/gpt4o/chat/");
        assert_eq!(key, "/gpt4o/chat");
        assert!(segment_prefix_matches(&key, "/gpt4o/chat"));
        assert!(segment_prefix_matches(&key, "/gpt4o/chat/"));
        assert!(segment_prefix_matches(&key, "/gpt4o/chat/x"));
        assert!(!segment_prefix_matches(&key, "/gpt4o/chatter"));
        assert!(segment_prefix_matches(&prefix_key("/"), "/anything"));
    }

    #[test]
    fn ancestors_longest_first() {
        let all: Vec<&str> = ancestors("/a/b/c").collect();
        assert_eq!(all, ["/a/b/c", "/a/b", "/a", ""]);
        let all: Vec<&str> = ancestors("/a/").collect();
        assert_eq!(all, ["/a", ""]);
        let all: Vec<&str> = ancestors("/").collect();
        assert_eq!(all, [""]);
    }
}
