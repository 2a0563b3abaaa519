//! Reading an auth subrequest: the original URI and method, the API key, the requested entry.
//!
//! Gateways describe the client's call in different ways (SPEC §4): Envoy puts it in the path after
//! `/auth`, Traefik and Caddy in `X-Forwarded-Uri`, nginx in `X-Original-URI` by convention. This
//! module turns any of them into one [`AuthQuery`]; it reads only the request head, never the body.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue, Method, Uri};

use super::path::{hex_value, normalize};

/// Where the API key stands in a request.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyPresence<'a> {
    Missing,
    /// The same name given twice: refused, since gateways and upstreams may disagree on which wins.
    Duplicate,
    Found(Cow<'a, str>),
}

/// The client's call as the gateway described it.
#[derive(Debug, PartialEq, Eq)]
pub struct OriginalRequest<'a> {
    /// Normalized path (SPEC §5), without the query.
    pub path: Cow<'a, str>,
    pub query: Option<&'a str>,
    pub method: &'a str,
}

/// Everything the decision needs from one request.
#[derive(Debug, PartialEq, Eq)]
pub struct AuthQuery<'a> {
    pub original: OriginalRequest<'a>,
    pub key: KeyPresence<'a>,
    /// `metadata_id` on the `/auth` URL or `X-Metadata-Id` (selection rules 2 and 3).
    pub requested_id: Option<Cow<'a, str>>,
}

/// Reads an `/auth` or `/auth/...` request.
pub fn parse_auth<'a>(uri: &'a Uri, method: &'a Method, headers: &'a HeaderMap) -> AuthQuery<'a> {
    let head = HeadFields::scan(headers);
    let rest = uri.path().strip_prefix("/auth").unwrap_or("");
    let (raw_path, query) = if rest.starts_with('/') {
        (rest, uri.query())
    } else {
        text(head.forwarded_uri)
            .or_else(|| text(head.original_uri))
            .map(split_uri)
            .unwrap_or(("/", None))
    };
    let method = text(head.forwarded_method)
        .or_else(|| text(head.original_method))
        .unwrap_or(method.as_str());
    let original = OriginalRequest {
        path: normalize(raw_path),
        query,
        method,
    };
    // On `/auth/<path>` the query is the client's, so it can never choose the entry.
    let url_id = if rest.is_empty() {
        query_param(uri.query(), "metadata_id")
    } else {
        QueryParam::Absent
    };
    let requested_id = match url_id {
        QueryParam::One(id) => Some(id),
        _ => text(head.metadata_id).map(Cow::Borrowed),
    };
    let key = find_key(&head, query);
    AuthQuery {
        original,
        key,
        requested_id,
    }
}

/// Reads an `/api/...` request: the request itself is the original one.
pub fn parse_api<'a>(uri: &'a Uri, method: &'a Method, headers: &'a HeaderMap) -> AuthQuery<'a> {
    let original = OriginalRequest {
        path: normalize(uri.path()),
        query: uri.query(),
        method: method.as_str(),
    };
    let key = find_key(&HeadFields::scan(headers), uri.query());
    AuthQuery {
        original,
        key,
        requested_id: None,
    }
}

/// How often a key header was given.
#[derive(Debug, Default, Clone, Copy)]
enum Seen<'a> {
    #[default]
    Absent,
    Once(&'a HeaderValue),
    Repeated,
}

impl<'a> Seen<'a> {
    fn add(&mut self, value: &'a HeaderValue) {
        *self = match self {
            Seen::Absent => Seen::Once(value),
            _ => Seen::Repeated,
        };
    }
}

/// The request headers the decision reads, found in one pass over the head: scanning the few
/// headers a gateway sends costs less than a hashed lookup for each of eight names.
#[derive(Debug, Default)]
struct HeadFields<'a> {
    apikey: Seen<'a>,
    x_api_key: Seen<'a>,
    authorization: Seen<'a>,
    forwarded_uri: Option<&'a HeaderValue>,
    original_uri: Option<&'a HeaderValue>,
    forwarded_method: Option<&'a HeaderValue>,
    original_method: Option<&'a HeaderValue>,
    metadata_id: Option<&'a HeaderValue>,
}

impl<'a> HeadFields<'a> {
    fn scan(headers: &'a HeaderMap) -> HeadFields<'a> {
        let mut fields = HeadFields::default();
        for (name, value) in headers {
            // The first value of a name counts, as `HeaderMap::get` would give it.
            let first = |slot: &mut Option<&'a HeaderValue>| {
                slot.get_or_insert(value);
            };
            match name.as_str() {
                "apikey" => fields.apikey.add(value),
                "x-api-key" => fields.x_api_key.add(value),
                "authorization" => fields.authorization.add(value),
                "x-forwarded-uri" => first(&mut fields.forwarded_uri),
                "x-original-uri" => first(&mut fields.original_uri),
                "x-forwarded-method" => first(&mut fields.forwarded_method),
                "x-original-method" => first(&mut fields.original_method),
                "x-metadata-id" => first(&mut fields.metadata_id),
                _ => {}
            }
        }
        fields
    }
}

/// A header value as text, when it is text and not empty.
fn text(value: Option<&HeaderValue>) -> Option<&str> {
    let value = value?.to_str().ok()?.trim();
    (!value.is_empty()).then_some(value)
}

/// `/p?q#f` → (`/p`, `q`); an absolute URI (`http://host/p`) keeps only its path.
fn split_uri(uri: &str) -> (&str, Option<&str>) {
    let uri = uri.split('#').next().unwrap_or(uri);
    let uri = match uri.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('/') => rest.find('/').map_or("/", |i| &rest[i..]),
        _ => uri,
    };
    match uri.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (uri, None),
    }
}

/// SPEC §4 order: `apikey`, `x-api-key`, `Authorization: Bearer`, query `apikey`; first found wins.
fn find_key<'a>(head: &HeadFields<'a>, original_query: Option<&'a str>) -> KeyPresence<'a> {
    fn whole(value: &str) -> Option<&str> {
        Some(value)
    }
    for (seen, extract) in [
        (head.apikey, whole as fn(&str) -> Option<&str>),
        (head.x_api_key, whole),
        (head.authorization, bearer_token),
    ] {
        match header_key(seen, extract) {
            KeyPresence::Missing => {}
            found => return found,
        }
    }
    match query_param(original_query, "apikey") {
        QueryParam::Absent => KeyPresence::Missing,
        QueryParam::Repeated => KeyPresence::Duplicate,
        QueryParam::One(key) => KeyPresence::Found(key),
    }
}

fn header_key<'a>(seen: Seen<'a>, extract: fn(&str) -> Option<&str>) -> KeyPresence<'a> {
    let value = match seen {
        Seen::Absent => return KeyPresence::Missing,
        Seen::Repeated => return KeyPresence::Duplicate,
        Seen::Once(value) => value,
    };
    // A key with non-ASCII bytes cannot match a stored key; it is still looked up (and fails) rather
    // than ignored, so it gets "invalid credentials" and not "no key".
    let Ok(text) = std::str::from_utf8(value.as_bytes()) else {
        return KeyPresence::Found(Cow::Owned(
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    };
    match extract(text.trim()) {
        Some(key) if !key.is_empty() => KeyPresence::Found(Cow::Borrowed(key)),
        _ => KeyPresence::Missing,
    }
}

fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

enum QueryParam<'a> {
    Absent,
    Repeated,
    One(Cow<'a, str>),
}

/// A query parameter, percent-decoded (`+` as space, as Kong's `get_uri_args` reads it); empty counts
/// as absent, two occurrences as repeated.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> QueryParam<'a> {
    let mut found = QueryParam::Absent;
    let mut count = 0;
    for pair in query.unwrap_or("").split('&') {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(raw_name) != name {
            continue;
        }
        count += 1;
        let value = percent_decode(raw_value);
        if !value.is_empty() {
            found = QueryParam::One(value);
        }
    }
    if count > 1 {
        QueryParam::Repeated
    } else {
        found
    }
}

fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex_value(bytes[i + 1])? * 16 + hex_value(bytes[i + 2])?))
            .flatten();
        match (bytes[i], escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 3;
                continue;
            }
            (b'+', None) => out.push(b' '),
            (b, None) => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn auth(uri: &str, pairs: &[(&str, &str)]) -> (Uri, Method, HeaderMap) {
        (uri.parse().unwrap(), Method::GET, headers(pairs))
    }

    #[test]
    fn original_uri_sources_in_order() {
        let (u, m, h) = auth("/auth/gpt4o/chat?x=1", &[("x-forwarded-uri", "/other")]);
        let q = parse_auth(&u, &m, &h);
        assert_eq!(q.original.path, "/gpt4o/chat");
        assert_eq!(q.original.query, Some("x=1"));

        let (u, m, h) = auth(
            "/auth",
            &[("x-forwarded-uri", "/a?b=c"), ("x-original-uri", "/z")],
        );
        let q = parse_auth(&u, &m, &h);
        assert_eq!(
            (q.original.path.as_ref(), q.original.query),
            ("/a", Some("b=c"))
        );

        let (u, m, h) = auth("/auth", &[("x-original-uri", "/z/../y")]);
        assert_eq!(parse_auth(&u, &m, &h).original.path, "/y");

        let (u, m, h) = auth("/auth", &[]);
        assert_eq!(parse_auth(&u, &m, &h).original.path, "/");

        let (u, m, h) = auth("/auth/", &[("x-forwarded-uri", "/other")]);
        assert_eq!(parse_auth(&u, &m, &h).original.path, "/");
    }

    #[test]
    fn absolute_forwarded_uri() {
        let (u, m, h) = auth(
            "/auth",
            &[("x-forwarded-uri", "https://h.example/gpt4o/chat?q")],
        );
        let q = parse_auth(&u, &m, &h);
        assert_eq!(
            (q.original.path.as_ref(), q.original.query),
            ("/gpt4o/chat", Some("q"))
        );
    }

    #[test]
    fn method_sources() {
        let (u, _, h) = auth("/auth", &[("x-original-method", "POST")]);
        assert_eq!(parse_auth(&u, &Method::GET, &h).original.method, "POST");
        let (u, _, h) = auth(
            "/auth",
            &[("x-forwarded-method", "PUT"), ("x-original-method", "POST")],
        );
        assert_eq!(parse_auth(&u, &Method::GET, &h).original.method, "PUT");
        let (u, _, h) = auth("/auth", &[]);
        assert_eq!(
            parse_auth(&u, &Method::DELETE, &h).original.method,
            "DELETE"
        );
    }

    fn key_of(uri: &str, pairs: &[(&str, &str)]) -> KeyPresence<'static> {
        let (u, m, h) = auth(uri, pairs);
        match parse_auth(&u, &m, &h).key {
            KeyPresence::Found(k) => KeyPresence::Found(Cow::Owned(k.into_owned())),
            KeyPresence::Missing => KeyPresence::Missing,
            KeyPresence::Duplicate => KeyPresence::Duplicate,
        }
    }

    fn found(k: &str) -> KeyPresence<'static> {
        KeyPresence::Found(Cow::Owned(k.to_owned()))
    }

    #[test]
    fn key_locations_in_order() {
        let all = [
            ("apikey", "a"),
            ("x-api-key", "b"),
            ("authorization", "Bearer c"),
        ];
        assert_eq!(key_of("/auth/p?apikey=d", &all), found("a"));
        assert_eq!(key_of("/auth/p?apikey=d", &all[1..]), found("b"));
        assert_eq!(key_of("/auth/p?apikey=d", &all[2..]), found("c"));
        assert_eq!(key_of("/auth/p?apikey=d%2Be+f", &[]), found("d+e f"));
        assert_eq!(
            key_of("/auth", &[("x-forwarded-uri", "/p?x=1&apikey=q")]),
            found("q")
        );
        assert_eq!(
            key_of("/auth/p", &[("authorization", "bearer  t ")]),
            found("t")
        );
        assert_eq!(
            key_of("/auth/p", &[("authorization", "Basic dXNlcjpwYXNz")]),
            KeyPresence::Missing
        );
        assert_eq!(key_of("/auth/p", &[]), KeyPresence::Missing);
    }

    #[test]
    fn empty_values_count_as_absent() {
        assert_eq!(
            key_of("/auth/p?apikey=", &[("apikey", ""), ("x-api-key", "b")]),
            found("b")
        );
        assert_eq!(
            key_of("/auth/p?apikey=", &[("authorization", "Bearer ")]),
            KeyPresence::Missing
        );
    }

    #[test]
    fn duplicates_are_refused() {
        assert_eq!(
            key_of("/auth/p", &[("apikey", "a"), ("apikey", "b")]),
            KeyPresence::Duplicate
        );
        assert_eq!(
            key_of("/auth/p", &[("x-api-key", "a"), ("x-api-key", "a")]),
            KeyPresence::Duplicate
        );
        assert_eq!(
            key_of("/auth/p?apikey=a&apikey=b", &[]),
            KeyPresence::Duplicate
        );
        // The first location that has the key decides; a later one is not consulted.
        assert_eq!(
            key_of("/auth/p?apikey=a&apikey=b", &[("apikey", "k")]),
            found("k")
        );
    }

    #[test]
    fn requested_entry_rules() {
        let (u, m, h) = auth("/auth?metadata_id=azure-gpt4o", &[("x-metadata-id", "kt")]);
        assert_eq!(
            parse_auth(&u, &m, &h).requested_id.as_deref(),
            Some("azure-gpt4o")
        );
        let (u, m, h) = auth("/auth?metadata_id=", &[("x-metadata-id", "kt")]);
        assert_eq!(parse_auth(&u, &m, &h).requested_id.as_deref(), Some("kt"));
        let (u, m, h) = auth("/auth/p?metadata_id=azure-gpt4o", &[]);
        assert_eq!(parse_auth(&u, &m, &h).requested_id, None);
        let (u, m, h) = auth("/auth", &[("x-metadata-id", "")]);
        assert_eq!(parse_auth(&u, &m, &h).requested_id, None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%41%2b+%zz%"), "aA+ %zz%");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
