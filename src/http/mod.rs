//! The HTTP adapter: hyper 1.x connections (HTTP/1.1 and h2c), graceful shutdown.
//!
//! The connection rules of SPEC §2 (header and idle timeouts, the connection limit, descriptor
//! exhaustion) live in [`conn`]; hyper's own h1 header timeout is off because it also closes idle
//! keep-alive connections (see there). On shutdown the listener closes first, in-flight requests
//! finish, and idle keep-alive connections are given at most the grace period before they are
//! dropped.

pub mod admin;
pub mod answer;
pub mod body;
mod conn;
pub mod handlers;
mod usage;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub use handlers::App;

use http::Response;
use http::request::Parts;

use answer::Body;

/// What a listener serves: the gateway-facing [`App`] or the admin API.
pub trait Respond: Send + Sync + 'static {
    /// Answers one request from `peer`; the body is read only where an endpoint needs it.
    fn respond(
        &self,
        request: &Parts,
        body: Incoming,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send;
}

impl Respond for App {
    fn respond(
        &self,
        request: &Parts,
        body: Incoming,
        _peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send {
        App::respond(self, request, body)
    }
}

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Serves until `shutdown` resolves, then drains connections for at most the grace period.
pub async fn serve<A: Respond>(
    listener: TcpListener,
    app: Arc<A>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let limits = conn::Limits::new(
        options.header_read_timeout,
        options.idle_timeout,
        options.max_connections,
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Off: `conn` times heads itself (hyper's timer would also cut idle keep-alives short).
        .header_read_timeout(None)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let mut acceptor = conn::Acceptor::new(listener, limits);
    // Gateways should reuse connections; this shows whether they do.
    let accepted = metrics::counter!("uma_http_connections_total");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            pair = acceptor.accept() => pair,
            () = &mut shutdown => break,
        };
        accepted.increment(1);
        let _ = stream.set_nodelay(true);
        let admitted = acceptor.admit(app.clone());
        let tracked = admitted.tracked();
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = tracked.begin();
            async move {
                // Only `/auth-body` reads the body; everywhere else it is dropped unread.
                let (parts, body) = request.into_parts();
                Ok::<_, Infallible>(in_flight.respond(&parts, body, peer).await)
            }
        });
        let io = TokioIo::new(admitted.watch(stream));
        let connection = builder.serve_connection(io, service).into_owned();
        tokio::spawn(admitted.drive(connection, |c| c.graceful_shutdown(), peer));
    }
    acceptor.shutdown(options.shutdown_grace).await;
}

/// Binds the listener, reporting the address actually bound (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
