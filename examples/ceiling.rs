//! The performance ceiling for `/auth`: a minimal hyper 1.x server that does no work at all.
//!
//! It answers every request (any method, any path) with 200, `Cache-Control: no-store`, an empty body
//! and the same twelve metadata headers the service sends for the bundled seed's `user1-client` on
//! `/midm-base/chat`, held in memory as static values and cloned per response: no key lookup, no
//! route matching, no counting. It uses the same crates and connection settings as the service
//! (`src/http/mod.rs`: auto HTTP/1.1 + h2c builder, `TokioTimer`, header read timeout, keep-alive,
//! `TCP_NODELAY`, multi-thread runtime; `UMA_SERVER__WORKERS` sets the worker count as for the
//! service), so the gap between the two under `benches/run.sh` is the
//! cost of the service's own logic.
//!
//! Usage: `cargo run --release --example ceiling -- [listen address, default 127.0.0.1:8090]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::CACHE_CONTROL;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The service's default `server.header_read_timeout_ms`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(10_000);

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// user1-client on /midm-base/chat (entry `kt-midm-base`), exactly as the service answers it.
const HEADERS: [(HeaderName, HeaderValue); 12] = [
    (
        HeaderName::from_static("x-user-tdl-matrix"),
        HeaderValue::from_static(concat!(
            r#"{"T1":[0,0,0,0,0,3,0,0,0,0],"T2":[0,0,0,0,0,3,0,0,0,0],"T3":[0,0,0,0,0,3,0,0,0,0],"#,
            r#""T4":[0,0,0,0,0,3,0,0,0,0],"T5":[0,0,0,0,0,3,0,0,0,0],"T6":[0,0,0,0,0,3,0,0,0,0],"#,
            r#""T7":[0,0,0,0,0,3,0,0,0,0],"T8":[0,0,0,0,0,3,0,0,0,0],"T9":[0,0,0,0,0,3,0,0,0,0],"#,
            r#""T10":[0,0,0,0,0,3,0,0,0,0],"T11":[0,0,0,0,0,3,0,0,0,0],"T12":[0,0,0,0,0,3,0,0,0,0]}"#,
        )),
    ),
    (
        HeaderName::from_static("x-user-capabilities"),
        HeaderValue::from_static("[1,1,0,0,0]"),
    ),
    (
        HeaderName::from_static("x-consumer-id"),
        HeaderValue::from_static("kt-midm-base"),
    ),
    (
        HeaderName::from_static("x-user-max-input-tokens"),
        HeaderValue::from_static("50000"),
    ),
    (
        HeaderName::from_static("x-user-max-output-tokens"),
        HeaderValue::from_static("20000"),
    ),
    (
        HeaderName::from_static("x-user-input-cost"),
        HeaderValue::from_static("0.00000005"),
    ),
    (
        HeaderName::from_static("x-user-output-cost"),
        HeaderValue::from_static("0.0000002"),
    ),
    (
        HeaderName::from_static("x-user-provider"),
        HeaderValue::from_static("kt"),
    ),
    (
        HeaderName::from_static("x-user-tags"),
        HeaderValue::from_static(r#"["kt","\ubbff\uc74c"]"#),
    ),
    (
        HeaderName::from_static("x-consumer-username"),
        HeaderValue::from_static("user1-client"),
    ),
    (
        HeaderName::from_static("x-consumer-custom-id"),
        HeaderValue::from_static("client-001"),
    ),
    (
        HeaderName::from_static("x-consumer-groups"),
        HeaderValue::from_static("midm-allowed"),
    ),
];

fn answer() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    let headers = response.headers_mut();
    headers.reserve(13);
    headers.insert(CACHE_CONTROL, NO_STORE);
    for (name, value) in &HEADERS {
        headers.insert(name.clone(), value.clone());
    }
    response
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:8090")
        .parse()?;
    // The same worker setting as the service (`server.workers`), so both get the same runtime.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = std::env::var("UMA_SERVER__WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|w| *w > 0)
    {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("ceiling listening on {}", listener.local_addr()?);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());

    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(error) => {
                eprintln!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service_fn(|_request: Request<Incoming>| {
            std::future::ready(Ok::<_, Infallible>(answer()))
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}
