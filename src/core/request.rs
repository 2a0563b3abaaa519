//! Reading an auth subrequest: the original method, URI and host, the requested entry, the key.
//!
//! Gateways describe the client's call in different ways (SPEC §4): Envoy puts it in the path after
//! `/auth`, Traefik and Caddy in `X-Forwarded-*`, nginx and Kong in `X-Original-*`. The operator picks
//! the source set; in `auto` every source present must agree, so a client's own copy of a header the
//! gateway does not set refuses the call instead of steering it. A source that is present is used or
//! refused, never skipped, and a decision is never made on a URI nobody gave. Only the request head
//! is read, never the body.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue, Method, Uri};
use serde::Deserialize;

use super::path::{is_canonical, normalize, plain};
use super::refusal::Refusal;
use super::routes::KeyAuth;

/// Which headers describe the client's call (`auth.original_request`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OriginalSource {
    /// Every present source must agree.
    Auto,
    /// The path after `/auth` (Envoy).
    Path,
    /// `X-Forwarded-*` (Traefik, Caddy).
    Forwarded,
    /// `X-Original-*` (nginx, Kong).
    Original,
}

/// A way for the auth request to choose its metadata entry (`auth.entry_selectors`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntrySelector {
    /// `?metadata_id=` on the `/auth` URL itself.
    Query,
    /// The `X-Metadata-Id` header.
    Header,
}

/// How requests are read: the `[auth]` settings that shape the decision's inputs.
#[derive(Debug, Clone)]
pub struct ReadRules {
    pub source: OriginalSource,
    /// Decided on when the source set gives no URI (`auth.default_uri`).
    pub default_uri: Option<String>,
    pub query_selector: bool,
    pub header_selector: bool,
    pub trust_route_header: bool,
}

impl Default for ReadRules {
    fn default() -> Self {
        ReadRules {
            source: OriginalSource::Auto,
            default_uri: None,
            query_selector: false,
            header_selector: false,
            trust_route_header: false,
        }
    }
}

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
    /// The path as written (high bytes encoded), when it differs from `path`: the route it falls
    /// under applies its ACL too.
    pub plain_path: Option<String>,
    /// The query, high bytes percent-encoded.
    pub query: Option<Cow<'a, str>>,
    pub method: &'a str,
    /// The host as given (not yet normalized).
    pub host: Option<&'a str>,
}

/// Everything the decision needs from one request head, except the key (which depends on the
/// route's `key-auth`, so it is found after the route: [`AuthRequest::key`]).
#[derive(Debug)]
pub struct AuthRequest<'a> {
    pub original: OriginalRequest<'a>,
    /// `metadata_id` on the `/auth` URL or `X-Metadata-Id`, when the operator enabled them.
    pub requested_id: Option<Cow<'a, str>>,
    /// `X-Uma-Route`, when the operator trusts it.
    pub route_name: Option<&'a str>,
    /// `X-Uma-Gateway`, for `auth.gateway_secret`.
    pub gateway_token: Option<&'a [u8]>,
    head: HeadFields<'a>,
    headers: &'a HeaderMap,
}

/// The part of an auth URL after its endpoint (`/auth`): `Some` for `/auth/<path>` (Envoy's shape,
/// even a lone `/auth/`), `None` for the bare endpoint, whose query is the auth URL's own.
pub fn path_after<'a>(uri: &'a Uri, endpoint: &str) -> Option<&'a str> {
    uri.path()
        .strip_prefix(endpoint)
        .filter(|rest| rest.starts_with('/'))
}

/// Reads an `/auth` request (`endpoint` is the matched prefix, e.g. `/auth`).
pub fn read_auth<'a>(
    uri: &'a Uri,
    method: &'a Method,
    headers: &'a HeaderMap,
    endpoint: &str,
    rules: &ReadRules,
) -> Result<AuthRequest<'a>, Refusal> {
    let head = HeadFields::scan(headers)?;
    let rest = path_after(uri, endpoint);
    let from_path = rest.map(|rest| UriSource::Text(rest, uri.query()));
    let own_host = head
        .host
        .once()
        .or_else(|| uri.authority().map(|a| a.as_str().as_bytes()));
    let sources = Sources::chosen(rules.source, &head, from_path);
    let (path, plain_path, query) = match agreed_uri(&sources.uris)? {
        Some(parsed) => parsed,
        None => match &rules.default_uri {
            Some(default) => to_owned_uri(parse_uri(default.as_bytes())?),
            None => return Err(Refusal::UriMissing),
        },
    };
    let method = agreed_text(&sources.methods)?.unwrap_or(method.as_str());
    let host = match agreed_text(&sources.hosts)? {
        Some(host) => Some(host),
        None => own_host.map(readable).transpose()?,
    };
    let requested_id = requested_id(&head, uri, rest.is_none(), rules)?;
    let route_name = if rules.trust_route_header {
        head.uma_route
            .once()
            .map(readable)
            .transpose()?
            .filter(|n| !n.is_empty())
    } else {
        None
    };
    Ok(AuthRequest {
        original: OriginalRequest {
            path,
            plain_path,
            query,
            method,
            host,
        },
        requested_id,
        route_name,
        gateway_token: head.uma_gateway.once(),
        head,
        headers,
    })
}

/// Reads an `/api/...` request: the request itself is the original one; it selects no entry.
pub fn read_api<'a>(
    uri: &'a Uri,
    method: &'a Method,
    headers: &'a HeaderMap,
) -> Result<AuthRequest<'a>, Refusal> {
    let head = HeadFields::scan(headers)?;
    let (path, plain_path, query) =
        parse_uri(uri.path_and_query().map_or(b"/", |p| p.as_str().as_bytes()))?;
    let host = head
        .host
        .once()
        .or_else(|| uri.authority().map(|a| a.as_str().as_bytes()));
    Ok(AuthRequest {
        original: OriginalRequest {
            path,
            plain_path,
            query,
            method: method.as_str(),
            host: host.map(readable).transpose()?,
        },
        requested_id: None,
        route_name: None,
        gateway_token: None,
        head,
        headers,
    })
}

/// The descriptions of the original request that the source set admits.
struct Sources<'a> {
    /// At most one of each kind, in an array: no allocation per request.
    uris: [Option<UriSource<'a>>; 3],
    methods: [Option<&'a [u8]>; 2],
    hosts: [Option<&'a [u8]>; 2],
}

impl<'a> Sources<'a> {
    fn chosen(
        set: OriginalSource,
        head: &HeadFields<'a>,
        from_path: Option<UriSource<'a>>,
    ) -> Self {
        let (forwarded, original) = (&head.forwarded_uri, &head.original_uri);
        match set {
            OriginalSource::Path => Sources {
                uris: [from_path, None, None],
                methods: [None, None],
                hosts: [None, None],
            },
            OriginalSource::Forwarded => Sources {
                uris: [forwarded.source(), None, None],
                methods: [head.forwarded_method.once(), None],
                hosts: [head.forwarded_host.once(), None],
            },
            OriginalSource::Original => Sources {
                uris: [original.source(), None, None],
                methods: [head.original_method.once(), None],
                hosts: [head.original_host.once(), None],
            },
            OriginalSource::Auto => Sources {
                uris: [from_path, forwarded.source(), original.source()],
                methods: [head.forwarded_method.once(), head.original_method.once()],
                hosts: [head.forwarded_host.once(), head.original_host.once()],
            },
        }
    }
}

type ParsedUri<'a> = (Cow<'a, str>, Option<String>, Option<Cow<'a, str>>);

/// One description of the original URI.
#[derive(Clone, Copy)]
enum UriSource<'a> {
    /// The path after `/auth`, with the request's own query.
    Text(&'a str, Option<&'a str>),
    /// A header value: raw bytes, possibly not UTF-8.
    Header(&'a [u8]),
}

impl<'a> UriSource<'a> {
    fn parse(self) -> Result<ParsedUri<'a>, Refusal> {
        match self {
            UriSource::Header(bytes) => parse_uri(bytes),
            UriSource::Text(path, query) => {
                let (path, plain_path, _) = parse_uri(path.as_bytes())?;
                Ok((path, plain_path, query.map(|q| encode_query(q.as_bytes()))))
            }
        }
    }
}

/// The URI every present source gives, or `None` when none is present; sources that disagree after
/// normalization are refused.
fn agreed_uri<'a>(sources: &[Option<UriSource<'a>>]) -> Result<Option<ParsedUri<'a>>, Refusal> {
    let mut present = sources.iter().flatten();
    let Some(first) = present.next() else {
        return Ok(None);
    };
    let parsed = first.parse()?;
    for other in present {
        let other = other.parse()?;
        if other.0 != parsed.0 || other.2 != parsed.2 {
            return Err(Refusal::ConflictingRequest);
        }
    }
    Ok(Some(parsed))
}

fn to_owned_uri(parsed: ParsedUri<'_>) -> ParsedUri<'static> {
    let (path, plain, query) = parsed;
    (
        Cow::Owned(path.into_owned()),
        plain,
        query.map(|q| Cow::Owned(q.into_owned())),
    )
}

/// `/p?q#f` or `http://host/p?q` → (normalized path, plain path if different, query). Bytes at or
/// above 0x80 count as percent-encoded; control characters, spaces and values that are not a path
/// are refused.
fn parse_uri(raw: &[u8]) -> Result<ParsedUri<'_>, Refusal> {
    let raw = trim(raw);
    if raw.is_empty() || raw.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Refusal::InvalidUri);
    }
    let raw = raw.split(|&b| b == b'#').next().unwrap_or(raw);
    let raw = strip_scheme_and_authority(raw);
    if raw.first() != Some(&b'/') {
        return Err(Refusal::InvalidUri);
    }
    let (path, query) = match raw.iter().position(|&b| b == b'?') {
        Some(at) => (&raw[..at], Some(&raw[at + 1..])),
        None => (raw, None),
    };
    let query = query.map(encode_query);
    if is_canonical(path) {
        let path = std::str::from_utf8(path).map_err(|_| Refusal::InvalidUri)?;
        return Ok((Cow::Borrowed(path), None, query));
    }
    let normalized = normalize(path);
    let written = plain(path);
    let plain_path = (written != normalized).then_some(written);
    Ok((Cow::Owned(normalized), plain_path, query))
}

/// `http://host:8080/p?q` → `/p?q`; `http://host` → `/`.
fn strip_scheme_and_authority(raw: &[u8]) -> &[u8] {
    let Some(colon) = raw.windows(3).position(|w| w == b"://") else {
        return raw;
    };
    let scheme = &raw[..colon];
    if scheme.is_empty()
        || !scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return raw;
    }
    let after = &raw[colon + 3..];
    match after.iter().position(|&b| matches!(b, b'/' | b'?')) {
        Some(at) if after[at] == b'/' => &after[at..],
        Some(_) | None => b"/",
    }
}

/// A query with bytes at or above 0x80 percent-encoded, borrowed when it has none.
fn encode_query(raw: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(raw) {
        Ok(text) if text.is_ascii() => Cow::Borrowed(text),
        _ => Cow::Owned(plain(raw)),
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// A method or host header value as text: visible ASCII only.
fn readable(bytes: &[u8]) -> Result<&str, Refusal> {
    let bytes = trim(bytes);
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        std::str::from_utf8(bytes).map_err(|_| Refusal::InvalidRequest)
    } else {
        Err(Refusal::InvalidRequest)
    }
}

/// The value every present method (or host) source gives; an empty value counts as absent.
fn agreed_text<'a>(sources: &[Option<&'a [u8]>]) -> Result<Option<&'a str>, Refusal> {
    let mut agreed: Option<&str> = None;
    for value in sources.iter().flatten() {
        let value = readable(value)?;
        if value.is_empty() {
            continue;
        }
        match agreed {
            Some(first) if !first.eq_ignore_ascii_case(value) => {
                return Err(Refusal::ConflictingRequest);
            }
            _ => agreed = Some(value),
        }
    }
    Ok(agreed)
}

/// Selection rules 2 and 3 of SPEC §4, each only when the operator turned it on.
fn requested_id<'a>(
    head: &HeadFields<'a>,
    uri: &'a Uri,
    bare_endpoint: bool,
    rules: &ReadRules,
) -> Result<Option<Cow<'a, str>>, Refusal> {
    if rules.query_selector && bare_endpoint {
        match query_param(uri.query(), "metadata_id", ValuesMay::Repeat) {
            QueryParam::One(id) => return Ok(Some(id)),
            QueryParam::Conflict => return Err(Refusal::ConflictingMetadataId),
            QueryParam::Absent => {}
        }
    }
    if rules.header_selector {
        let id = match head.metadata_id {
            Seen::Conflict => return Err(Refusal::ConflictingMetadataId),
            seen => seen
                .once()
                .map(readable)
                .transpose()
                .map_err(|_| Refusal::ConflictingMetadataId)?,
        };
        if let Some(id) = id.filter(|id| !id.is_empty()) {
            return Ok(Some(Cow::Borrowed(id)));
        }
    }
    Ok(None)
}

impl<'a> AuthRequest<'a> {
    /// Finds the key (SPEC §4 "Where the key is looked for"). `key_auths` are the `key-auth`
    /// plugins of every route that applies; with none, the default locations. When several apply,
    /// each must find the key, and the same one.
    pub fn key(&self, key_auths: &[&KeyAuth]) -> KeyPresence<'a> {
        let Some((first, others)) = key_auths.split_first() else {
            return self.default_key();
        };
        let found = self.key_for(first);
        for other in others {
            match (&found, self.key_for(other)) {
                (KeyPresence::Found(a), KeyPresence::Found(b)) if *a == b => {}
                (KeyPresence::Found(_), KeyPresence::Found(_)) => return KeyPresence::Duplicate,
                (_, KeyPresence::Found(_)) => {}
                (_, refused) => return refused,
            }
        }
        found
    }

    /// `apikey`, `x-api-key`, `Authorization: Bearer`, query `apikey`; first found wins.
    fn default_key(&self) -> KeyPresence<'a> {
        first_found([
            &|| header_key(self.head.apikey, whole),
            &|| header_key(self.head.x_api_key, whole),
            &|| header_key(self.head.authorization, bearer_token),
            &|| self.query_key("apikey"),
        ])
    }

    /// A route's `key-auth`: its names (each as a header, then as a query parameter), then
    /// `x-api-key` and `Authorization: Bearer`.
    fn key_for(&self, key_auth: &KeyAuth) -> KeyPresence<'a> {
        for name in &key_auth.key_names {
            if key_auth.in_header {
                match self.named_header_key(name) {
                    KeyPresence::Missing => {}
                    found => return found,
                }
            }
            if key_auth.in_query {
                match self.query_key(name) {
                    KeyPresence::Missing => {}
                    found => return found,
                }
            }
        }
        first_found([&|| header_key(self.head.x_api_key, whole), &|| {
            header_key(self.head.authorization, bearer_token)
        }])
    }

    fn named_header_key(&self, name: &str) -> KeyPresence<'a> {
        if name == "apikey" {
            return header_key(self.head.apikey, whole);
        }
        let mut seen = Seen::Absent;
        for value in self.headers.get_all(name) {
            seen.add_repeat_refused(value);
        }
        header_key(seen, whole)
    }

    fn query_key(&self, name: &str) -> KeyPresence<'a> {
        match query_param(self.original.query.as_deref(), name, ValuesMay::NotRepeat) {
            QueryParam::Absent => KeyPresence::Missing,
            QueryParam::Conflict => KeyPresence::Duplicate,
            // The decoded value is owned; a query key is rare enough not to matter.
            QueryParam::One(key) => KeyPresence::Found(Cow::Owned(key.into_owned())),
        }
    }
}

fn first_found<'a, const N: usize>(sources: [&dyn Fn() -> KeyPresence<'a>; N]) -> KeyPresence<'a> {
    for source in sources {
        match source() {
            KeyPresence::Missing => {}
            found => return found,
        }
    }
    KeyPresence::Missing
}

/// How often a header was given.
#[derive(Debug, Default, Clone, Copy)]
enum Seen<'a> {
    #[default]
    Absent,
    Once(&'a HeaderValue),
    /// Given more than once: with different values, or (for keys) at all.
    Conflict,
}

impl<'a> Seen<'a> {
    /// Keys: a second copy is refused even with the same value.
    fn add_repeat_refused(&mut self, value: &'a HeaderValue) {
        *self = match self {
            Seen::Absent => Seen::Once(value),
            _ => Seen::Conflict,
        };
    }

    /// Descriptions of the request: a repeated identical value is the same statement.
    fn add_same_allowed(&mut self, value: &'a HeaderValue) {
        *self = match *self {
            Seen::Absent => Seen::Once(value),
            Seen::Once(first) if first == value => Seen::Once(first),
            _ => Seen::Conflict,
        };
    }

    fn once(self) -> Option<&'a [u8]> {
        match self {
            Seen::Once(value) => Some(value.as_bytes()),
            _ => None,
        }
    }

    fn source(self) -> Option<UriSource<'a>> {
        match self {
            Seen::Absent => None,
            Seen::Once(value) => Some(UriSource::Header(value.as_bytes())),
            // Two different URIs in one header: refused when parsed, like an unreadable one.
            Seen::Conflict => Some(UriSource::Header(b"")),
        }
    }
}

/// The request headers the decision reads, found in one pass over the head: scanning the few
/// headers a gateway sends costs less than a hashed lookup for each of a dozen names.
#[derive(Debug, Default)]
struct HeadFields<'a> {
    apikey: Seen<'a>,
    x_api_key: Seen<'a>,
    authorization: Seen<'a>,
    forwarded_uri: Seen<'a>,
    original_uri: Seen<'a>,
    forwarded_method: Seen<'a>,
    original_method: Seen<'a>,
    forwarded_host: Seen<'a>,
    original_host: Seen<'a>,
    host: Seen<'a>,
    metadata_id: Seen<'a>,
    uma_route: Seen<'a>,
    uma_gateway: Seen<'a>,
}

impl<'a> HeadFields<'a> {
    fn scan(headers: &'a HeaderMap) -> Result<HeadFields<'a>, Refusal> {
        let mut f = HeadFields::default();
        for (name, value) in headers {
            match name.as_str() {
                "apikey" => f.apikey.add_repeat_refused(value),
                "x-api-key" => f.x_api_key.add_repeat_refused(value),
                "authorization" => f.authorization.add_repeat_refused(value),
                "x-forwarded-uri" => f.forwarded_uri.add_same_allowed(value),
                "x-original-uri" => f.original_uri.add_same_allowed(value),
                "x-forwarded-method" => f.forwarded_method.add_same_allowed(value),
                "x-original-method" => f.original_method.add_same_allowed(value),
                "x-forwarded-host" => f.forwarded_host.add_same_allowed(value),
                "x-original-host" => f.original_host.add_same_allowed(value),
                "host" => f.host.add_same_allowed(value),
                "x-metadata-id" => f.metadata_id.add_same_allowed(value),
                "x-uma-route" => f.uma_route.add_same_allowed(value),
                "x-uma-gateway" => f.uma_gateway.add_repeat_refused(value),
                _ => {}
            }
        }
        let descriptions = [
            f.forwarded_method,
            f.original_method,
            f.forwarded_host,
            f.original_host,
            f.host,
            f.uma_route,
        ];
        if descriptions.iter().any(|s| matches!(s, Seen::Conflict)) {
            return Err(Refusal::ConflictingRequest);
        }
        Ok(f)
    }
}

fn whole(value: &str) -> Option<&str> {
    Some(value)
}

fn header_key<'a>(seen: Seen<'a>, extract: fn(&str) -> Option<&str>) -> KeyPresence<'a> {
    let value = match seen {
        Seen::Absent => return KeyPresence::Missing,
        Seen::Conflict => return KeyPresence::Duplicate,
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
    /// Given twice (keys), or twice with different values (selectors).
    Conflict,
    One(Cow<'a, str>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ValuesMay {
    Repeat,
    NotRepeat,
}

/// A query parameter, decoded as Kong's `get_uri_args` reads it (`+` as space); an empty value
/// counts as absent.
fn query_param<'a>(query: Option<&'a str>, name: &str, repeat: ValuesMay) -> QueryParam<'a> {
    let mut found: Option<Cow<'a, str>> = None;
    let mut count = 0;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != name {
            continue;
        }
        count += 1;
        if value.is_empty() {
            continue;
        }
        match &found {
            Some(first) if repeat == ValuesMay::Repeat && *first != value => {
                return QueryParam::Conflict;
            }
            _ => found = Some(value),
        }
    }
    match found {
        _ if repeat == ValuesMay::NotRepeat && count > 1 => QueryParam::Conflict,
        Some(value) => QueryParam::One(value),
        None => QueryParam::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn rules(source: OriginalSource) -> ReadRules {
        ReadRules {
            source,
            ..ReadRules::default()
        }
    }

    fn read(
        uri: &str,
        pairs: &[(&str, &[u8])],
        rules: &ReadRules,
    ) -> Result<(String, Option<String>, String), Refusal> {
        let uri: Uri = uri.parse().unwrap();
        let h = headers(pairs);
        let r = read_auth(&uri, &Method::GET, &h, "/auth", rules)?;
        Ok((
            r.original.path.to_string(),
            r.original.query.as_deref().map(str::to_owned),
            r.original.method.to_owned(),
        ))
    }

    fn path_of(uri: &str, pairs: &[(&str, &[u8])], rules: &ReadRules) -> Result<String, Refusal> {
        read(uri, pairs, rules).map(|r| r.0)
    }

    #[test]
    fn each_source_set_reads_only_its_own_headers() {
        let h: &[(&str, &[u8])] = &[("x-forwarded-uri", b"/f"), ("x-original-uri", b"/o")];
        assert_eq!(
            path_of("/auth/p", h, &rules(OriginalSource::Path)),
            Ok("/p".into())
        );
        assert_eq!(
            path_of("/auth/p", h, &rules(OriginalSource::Forwarded)),
            Ok("/f".into())
        );
        assert_eq!(
            path_of("/auth/p", h, &rules(OriginalSource::Original)),
            Ok("/o".into())
        );
        assert_eq!(
            path_of("/auth", h, &rules(OriginalSource::Path)),
            Err(Refusal::UriMissing)
        );
    }

    #[test]
    fn auto_needs_every_present_source_to_agree() {
        let auto = ReadRules::default();
        assert_eq!(
            path_of(
                "/auth",
                &[
                    ("x-forwarded-uri", b"/a/../gpt"),
                    ("x-original-uri", b"/gpt")
                ],
                &auto
            ),
            Ok("/gpt".into())
        );
        assert_eq!(
            path_of(
                "/auth",
                &[
                    ("x-forwarded-uri", b"/x"),
                    ("x-original-uri", b"/gpt4o/chat")
                ],
                &auto
            ),
            Err(Refusal::ConflictingRequest)
        );
        // A lone `/auth/` is a source too: it must agree with the gateway's header.
        assert_eq!(
            path_of("/auth/", &[("x-forwarded-uri", b"/gpt4o/chat")], &auto),
            Err(Refusal::ConflictingRequest)
        );
        assert_eq!(
            path_of(
                "/auth/gpt4o/chat?x=1",
                &[("x-forwarded-uri", b"/gpt4o/chat?x=2")],
                &auto
            ),
            Err(Refusal::ConflictingRequest)
        );
        assert_eq!(path_of("/auth", &[], &auto), Err(Refusal::UriMissing));
    }

    #[test]
    fn a_default_uri_replaces_a_missing_one() {
        let with_default = ReadRules {
            default_uri: Some("/".into()),
            ..ReadRules::default()
        };
        assert_eq!(path_of("/auth", &[], &with_default), Ok("/".into()));
        // A present but unreadable source is still refused.
        assert_eq!(
            path_of("/auth", &[("x-original-uri", b"/a\tb")], &with_default),
            Err(Refusal::InvalidUri)
        );
    }

    #[test]
    fn high_bytes_count_as_percent_encoded() {
        let auto = ReadRules::default();
        let got = read(
            "/auth",
            &[("x-forwarded-uri", "/gpt4o/chat?x=é".as_bytes())],
            &auto,
        )
        .unwrap();
        assert_eq!(got.0, "/gpt4o/chat");
        assert_eq!(got.1.as_deref(), Some("x=%C3%A9"));
        let got = read(
            "/auth",
            &[("x-original-uri", b"/gpt4o/\xff\xfe/chat")],
            &auto,
        )
        .unwrap();
        assert_eq!(got.0, "/gpt4o/%FF%FE/chat");
    }

    #[test]
    fn unreadable_or_repeated_uris_are_refused() {
        let auto = ReadRules::default();
        for bad in [&b"gpt4o/chat"[..], b"", b"/a\tb", b"/a b", b"*"] {
            assert_eq!(
                path_of("/auth", &[("x-original-uri", bad)], &auto),
                Err(Refusal::InvalidUri),
                "{bad:?}"
            );
        }
        assert_eq!(
            path_of(
                "/auth",
                &[("x-original-uri", b"/a"), ("x-original-uri", b"/b")],
                &auto
            ),
            Err(Refusal::InvalidUri)
        );
        assert_eq!(
            path_of(
                "/auth",
                &[("x-original-uri", b"/a"), ("x-original-uri", b"/a")],
                &auto
            ),
            Ok("/a".into())
        );
    }

    #[test]
    fn absolute_uris_keep_only_path_and_query() {
        let got = read(
            "/auth",
            &[("x-forwarded-uri", b"https://h.example:8443/gpt4o/chat?q")],
            &ReadRules::default(),
        )
        .unwrap();
        assert_eq!(
            (got.0.as_str(), got.1.as_deref()),
            ("/gpt4o/chat", Some("q"))
        );
        let got = read(
            "/auth",
            &[("x-forwarded-uri", b"https://h.example?q")],
            &ReadRules::default(),
        )
        .unwrap();
        assert_eq!(got.0, "/");
    }

    #[test]
    fn methods_must_agree_and_default_to_the_request_method() {
        let auto = ReadRules::default();
        let h: &[(&str, &[u8])] = &[("x-original-uri", b"/p"), ("x-original-method", b"POST")];
        assert_eq!(read("/auth", h, &auto).unwrap().2, "POST");
        let h: &[(&str, &[u8])] = &[
            ("x-original-uri", b"/p"),
            ("x-original-method", b"POST"),
            ("x-forwarded-method", b"PUT"),
        ];
        assert_eq!(read("/auth", h, &auto), Err(Refusal::ConflictingRequest));
        assert_eq!(
            read("/auth", &[("x-original-uri", b"/p")], &auto)
                .unwrap()
                .2,
            "GET"
        );
    }

    #[test]
    fn hosts_come_from_the_source_set() {
        let uri: Uri = "/auth".parse().unwrap();
        let h = headers(&[
            ("x-original-uri", b"/p"),
            ("x-original-host", b"api.example.com"),
            ("host", b"uma:8089"),
        ]);
        let r = read_auth(
            &uri,
            &Method::GET,
            &h,
            "/auth",
            &rules(OriginalSource::Original),
        )
        .unwrap();
        assert_eq!(r.original.host, Some("api.example.com"));
        let r = read_auth(
            &uri,
            &Method::GET,
            &h,
            "/auth",
            &rules(OriginalSource::Forwarded),
        );
        assert_eq!(r.unwrap_err(), Refusal::UriMissing);
        let h = headers(&[
            ("x-forwarded-host", b"a"),
            ("x-original-host", b"b"),
            ("x-original-uri", b"/p"),
        ]);
        assert_eq!(
            read_auth(&uri, &Method::GET, &h, "/auth", &ReadRules::default()).unwrap_err(),
            Refusal::ConflictingRequest
        );
    }

    fn key_of(uri: &str, pairs: &[(&str, &str)]) -> KeyPresence<'static> {
        key_with(uri, pairs, &[])
    }

    fn key_with(uri: &str, pairs: &[(&str, &str)], key_auths: &[&KeyAuth]) -> KeyPresence<'static> {
        let u: Uri = uri.parse().unwrap();
        let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        let h = headers(&pairs);
        let r = read_auth(&u, &Method::GET, &h, "/auth", &ReadRules::default()).unwrap();
        match r.key(key_auths) {
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
    fn key_auth_names_replace_apikey() {
        let custom = KeyAuth {
            key_names: vec!["token".into(), "key".into()],
            in_header: true,
            in_query: true,
        };
        assert_eq!(
            key_with("/auth/p", &[("apikey", "a")], &[&custom]),
            KeyPresence::Missing
        );
        assert_eq!(
            key_with("/auth/p", &[("token", "t")], &[&custom]),
            found("t")
        );
        assert_eq!(key_with("/auth/p?key=q", &[], &[&custom]), found("q"));
        assert_eq!(
            key_with("/auth/p?key=q", &[("x-api-key", "x")], &[&custom]),
            found("q")
        );
        assert_eq!(
            key_with("/auth/p", &[("x-api-key", "x")], &[&custom]),
            found("x")
        );
        let headers_only = KeyAuth {
            in_query: false,
            ..custom.clone()
        };
        assert_eq!(
            key_with("/auth/p?token=q", &[], &[&headers_only]),
            KeyPresence::Missing
        );
        let query_only = KeyAuth {
            in_header: false,
            ..custom.clone()
        };
        assert_eq!(
            key_with("/auth/p", &[("token", "t")], &[&query_only]),
            KeyPresence::Missing
        );
        // Two routes apply: each must find the key, and the same one.
        let default = KeyAuth::default();
        assert_eq!(
            key_with(
                "/auth/p",
                &[("token", "t"), ("apikey", "t")],
                &[&custom, &default]
            ),
            found("t")
        );
        assert_eq!(
            key_with("/auth/p", &[("token", "t")], &[&custom, &default]),
            KeyPresence::Missing
        );
        assert_eq!(
            key_with(
                "/auth/p",
                &[("token", "t"), ("apikey", "u")],
                &[&custom, &default]
            ),
            KeyPresence::Duplicate
        );
    }

    fn selected(
        uri: &str,
        pairs: &[(&str, &[u8])],
        rules: &ReadRules,
    ) -> Result<Option<String>, Refusal> {
        let u: Uri = uri.parse().unwrap();
        let h = headers(pairs);
        read_auth(&u, &Method::GET, &h, "/auth", rules)
            .map(|r| r.requested_id.map(|c| c.into_owned()))
    }

    #[test]
    fn entry_selectors_are_off_unless_enabled() {
        let off = ReadRules {
            default_uri: Some("/".into()),
            ..ReadRules::default()
        };
        let on = ReadRules {
            query_selector: true,
            header_selector: true,
            ..off.clone()
        };
        let h: &[(&str, &[u8])] = &[("x-metadata-id", b"kt")];
        assert_eq!(selected("/auth?metadata_id=azure-gpt4o", h, &off), Ok(None));
        assert_eq!(
            selected("/auth?metadata_id=azure-gpt4o", h, &on),
            Ok(Some("azure-gpt4o".into()))
        );
        assert_eq!(
            selected("/auth?metadata_id=", h, &on),
            Ok(Some("kt".into()))
        );
        assert_eq!(
            selected("/auth/p?metadata_id=azure-gpt4o", &[], &on),
            Ok(None)
        );
        assert_eq!(selected("/auth", &[("x-metadata-id", b"")], &on), Ok(None));
        assert_eq!(
            selected("/auth?metadata_id=a&metadata_id=b", &[], &on),
            Err(Refusal::ConflictingMetadataId)
        );
        assert_eq!(
            selected("/auth?metadata_id=a&metadata_id=a", &[], &on),
            Ok(Some("a".into()))
        );
        assert_eq!(
            selected(
                "/auth",
                &[("x-metadata-id", b"a"), ("x-metadata-id", b"b")],
                &on
            ),
            Err(Refusal::ConflictingMetadataId)
        );
    }

    #[test]
    fn the_route_header_is_read_only_when_trusted() {
        let u: Uri = "/auth/p".parse().unwrap();
        let h = headers(&[("x-uma-route", b"gpt4o")]);
        let trusting = ReadRules {
            trust_route_header: true,
            ..ReadRules::default()
        };
        assert_eq!(
            read_auth(&u, &Method::GET, &h, "/auth", &trusting)
                .unwrap()
                .route_name,
            Some("gpt4o")
        );
        assert_eq!(
            read_auth(&u, &Method::GET, &h, "/auth", &ReadRules::default())
                .unwrap()
                .route_name,
            None
        );
    }
}
