//! The connection rules of SPEC §2: connections are untrusted, and idle sockets must never lock
//! gateways out. This module owns the per-connection state, the open-connection registry, the
//! accept loop's handling of descriptor exhaustion, the open-file limit and the shutdown drain.
//!
//! - **Header timeout.** A connection must send a complete request head within
//!   `server.header_read_timeout_ms` of being accepted, and, on a keep-alive connection, within that
//!   time of the first byte of each later head. The timer lives in [`Watched`], the socket wrapper
//!   under hyper, because hyper-util's `auto` builder sniffs the protocol with no timer at all (a
//!   client that sends nothing, or half of the HTTP/2 preface, would be kept forever). Past the
//!   deadline the read fails and the connection is dropped. Once the 24-byte HTTP/2 preface is
//!   complete, the idle rule governs the connection instead (HTTP/2 heads are frames, and PINGs or
//!   WINDOW_UPDATEs between requests are not the start of a head). On HTTP/1.1, bytes that arrive
//!   while no request is in flight count as the start of a head: a body the service left unread
//!   that trickles in after its answer gets the header timeout too, and a pipelined head read
//!   while a request is in flight gets only the idle timeout.
//! - **Idle timeout.** A connection with no request in flight for `server.idle_timeout_ms` is shut
//!   down gracefully (HTTP/2: GOAWAY; HTTP/1.1: closed at once, since it is idle), and dropped if it
//!   has not finished within [`CLOSING_GRACE`].
//! - **Why hyper's own header timeout is off (review D12).** In hyper 1.12 the h1 timer is armed in
//!   `Conn::poll_read_head` whenever a head is awaited, and `State::idle()` sets `notify_read` after
//!   every response precisely so that the next read arms it again (proto/h1/conn.rs:215-285 and
//!   1132-1160). So the timer runs while a keep-alive connection sits idle between requests, and
//!   hyper closes every idle keep-alive connection `header_read_timeout` after its last response
//!   (10 s by default, not `idle_timeout_ms`); measured: 300 ms after the answer with a 300 ms
//!   timeout. hyper has no setting to arm it only on the first byte, hence our own timer.
//! - **Limit.** At the limit, a new connection closes the open connection that has been idle the
//!   longest and has no request in flight. The limit is `server.max_connections`, bounded by the
//!   open-file limit less [`FD_RESERVE`] so that eviction, not `EMFILE`, is the normal answer to a
//!   flood; if `accept` fails with `EMFILE`/`ENFILE` all the same, the longest-idle connection is
//!   closed and `accept` retried, with a warning at most once a second.
//! - **Cost.** Requests touch only their own connection's state (a few relaxed atomics, two clock
//!   reads and one timer reset per request, as hyper's own timer did); the registry's lock is
//!   taken per connection (accept, close, eviction), never per request. Eviction scans the
//!   registry: O(open connections), only at the limit.
//! - **Shutdown.** hyper-util's `GracefulShutdown` cannot be used any more: its `watch` takes the
//!   connection, and its `GracefulConnection` trait is sealed, so nothing else could shut that
//!   connection down gracefully on idle or eviction. The drain is the same design in a few lines:
//!   every connection is told to shut down gracefully, and the wait (raced against
//!   `server.shutdown_grace_ms`) ends when the last connection task has dropped its sender.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};

/// How long a connection we close (idle or evicted) may take to finish a request that raced in
/// and to acknowledge HTTP/2's GOAWAY before it is dropped.
pub(crate) const CLOSING_GRACE: Duration = Duration::from_secs(1);

/// Descriptors kept for everything that is not a client connection (Redis pool, listener, runtime,
/// logs, seed reads) when the open-file limit bounds the number of connections.
pub(crate) const FD_RESERVE: u64 = 64;

/// Timeouts are capped so that `now + timeout` can never overflow, whatever the config says.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// What every connection is held to (from `ServeOptions`, bounded by the open-file limit).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_read: Duration,
    pub(crate) idle_ms: u64,
    pub(crate) max_connections: usize,
}

impl Limits {
    /// Raises the open-file limit, then logs the limits the process runs with.
    pub(crate) fn new(header_read: Duration, idle: Duration, max_connections: usize) -> Limits {
        let max_connections = match raise_fd_limit() {
            Some(files) => bounded_by_files(max_connections, files),
            None => {
                tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE)");
                max_connections
            }
        };
        Limits {
            header_read: header_read.min(LONGEST),
            idle_ms: millis(idle.min(LONGEST)).max(1),
            max_connections,
        }
    }
}

fn bounded_by_files(configured: usize, files: u64) -> usize {
    let room = files.saturating_sub(FD_RESERVE).max(files / 2).max(1);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if room < configured {
        tracing::warn!(
            open_file_limit = files,
            max_connections = room,
            "the open-file limit leaves room for fewer connections than server.max_connections ({configured}); raise the hard limit (ulimit -Hn, LimitNOFILE=)"
        );
        room
    } else {
        tracing::info!(
            open_file_limit = files,
            max_connections = configured,
            "connection limits"
        );
        configured
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (SPEC §2) and returns the soft limit in force.
fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        // An infinite hard limit is refused for NOFILE above the kernel's nr_open.
        let wanted = if limit.rlim_max == libc::RLIM_INFINITY {
            nr_open().unwrap_or(limit.rlim_cur)
        } else {
            limit.rlim_max
        };
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = wanted;
        } else {
            let error = io::Error::last_os_error();
            tracing::warn!(%error, "cannot raise the open-file limit to the hard limit");
        }
    }
    Some(limit.rlim_cur)
}

fn nr_open() -> Option<libc::rlim_t> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Milliseconds since the first call, never 0 (the clock of `idle_since`).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    millis(EPOCH.get_or_init(Instant::now).elapsed()).saturating_add(1)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The instant of a `now_ms` reading (deadlines are at most a year ahead: see [`LONGEST`]).
fn instant_at(ms: u64) -> Instant {
    let now = now_ms();
    Instant::now() + Duration::from_millis(ms.saturating_sub(now).min(millis(LONGEST)))
}

/// Why a connection is being closed by us rather than by its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Idle,
    Evicted,
    Shutdown,
}

/// One open connection: what its requests share with the watchdog and the registry.
pub(crate) struct Tracked<T> {
    /// What the requests of this connection need (the app): reached through this per-connection
    /// `Arc`, so a request never touches a reference count shared by every connection.
    pub(crate) context: T,
    id: u64,
    /// Requests in flight (HTTP/2 may have several).
    busy: AtomicU32,
    /// When the last request ended (or the connection was accepted), in `now_ms` units.
    idle_since: AtomicU64,
    /// A head is awaited under the header timer; cleared when hyper hands us the request.
    head_pending: AtomicBool,
    /// Taken, under its lock, by whoever closes the connection (eviction, shutdown): once.
    closer: Mutex<Option<oneshot::Sender<Closing>>>,
}

impl<T> Tracked<T> {
    /// Marks a request in flight until the returned guard is dropped. Called by the service as
    /// hyper hands it a request, i.e. once the request head is complete.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight<T> {
        self.head_pending.store(false, Relaxed);
        self.busy.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// When the idle timeout falls (None: it has passed). A connection with a request in flight
    /// is looked at again one idle period later.
    fn idle_deadline(&self, idle_ms: u64) -> Option<u64> {
        let now = now_ms();
        if self.busy.load(Relaxed) > 0 {
            return Some(now.saturating_add(idle_ms));
        }
        let deadline = self.idle_since.load(Relaxed).saturating_add(idle_ms);
        (deadline > now).then_some(deadline)
    }

    fn close(&self, why: Closing) -> bool {
        let closer = lock(&self.closer).take();
        closer.is_some_and(|closer| closer.send(why).is_ok())
    }
}

/// A request in flight on its connection; derefs to the connection's context.
pub(crate) struct InFlight<T>(Arc<Tracked<T>>);

impl<T> std::ops::Deref for InFlight<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0.context
    }
}

impl<T> Drop for InFlight<T> {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Relaxed) == 1 {
            self.0.idle_since.store(now_ms(), Relaxed);
        }
    }
}

fn lock<V>(mutex: &Mutex<V>) -> MutexGuard<'_, V> {
    // The guarded data stays consistent even if a holder panicked: every update is one statement.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The open connections, for eviction and shutdown.
struct Registry<T> {
    open: Mutex<FxHashMap<u64, Arc<Tracked<T>>>>,
    max: usize,
}

impl<T> Registry<T> {
    /// Adds a connection; at the limit, first closes the longest-idle one (true if it did).
    fn admit(&self, tracked: Arc<Tracked<T>>) -> bool {
        let mut open = lock(&self.open);
        let evicted = open.len() >= self.max && Self::evict(&mut open);
        open.insert(tracked.id, tracked);
        evicted
    }

    fn evict_longest_idle(&self) -> bool {
        Self::evict(&mut lock(&self.open))
    }

    /// Closes the connection idle the longest with no request in flight. It leaves the registry
    /// at once, so it is neither counted nor chosen again while it closes.
    fn evict(open: &mut FxHashMap<u64, Arc<Tracked<T>>>) -> bool {
        let oldest = open
            .values()
            .filter(|t| t.busy.load(Relaxed) == 0)
            // Ties (same millisecond) go to the older connection.
            .min_by_key(|t| (t.idle_since.load(Relaxed), t.id))
            .map(|t| t.id);
        oldest
            .and_then(|id| open.remove(&id))
            .is_some_and(|t| t.close(Closing::Evicted))
    }

    fn remove(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    fn close_all(&self) {
        for tracked in lock(&self.open).values() {
            tracked.close(Closing::Shutdown);
        }
    }

    fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

/// At most one warning a second; counts the ones held back.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// Some(number held back since the last warning) when a warning may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// The listener and everything that outlives one connection.
pub(crate) struct Acceptor<T> {
    listener: TcpListener,
    registry: Arc<Registry<T>>,
    limits: Limits,
    next_id: u64,
    /// Held by every connection task: the drain is over when all clones are gone.
    running: mpsc::Sender<()>,
    stopped: mpsc::Receiver<()>,
    fd_warning: Throttle,
    limit_warning: Throttle,
}

impl<T: Send + Sync + 'static> Acceptor<T> {
    pub(crate) fn new(listener: TcpListener, limits: Limits) -> Acceptor<T> {
        let (running, stopped) = mpsc::channel(1);
        Acceptor {
            listener,
            registry: Arc::new(Registry {
                open: Mutex::new(FxHashMap::default()),
                max: limits.max_connections,
            }),
            limits,
            next_id: 0,
            running,
            stopped,
            fd_warning: Throttle::default(),
            limit_warning: Throttle::default(),
        }
    }

    /// The next connection. Out of descriptors, it closes the longest-idle connection and tries
    /// again; other failures are retried after a pause (no busy loop).
    pub(crate) async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let error = match self.listener.accept().await {
                Ok(pair) => return pair,
                Err(error) => error,
            };
            let pause = if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                let freed = self.registry.evict_longest_idle();
                if let Some(held_back) = self.fd_warning.ready() {
                    tracing::warn!(%error, freed, open = self.registry.len(), held_back,
                        "out of file descriptors: closing the longest-idle connection");
                }
                // Long enough for the evicted connection's task to release its descriptor.
                Duration::from_millis(if freed { 1 } else { 20 })
            } else {
                if let Some(held_back) = self.fd_warning.ready() {
                    tracing::warn!(%error, held_back, "accept failed");
                }
                Duration::from_millis(20)
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Registers a connection just accepted (closing the longest-idle one at the limit).
    pub(crate) fn admit(&mut self, context: T) -> Admitted<T> {
        let (closer, closed) = oneshot::channel();
        self.next_id += 1;
        let tracked = Arc::new(Tracked {
            context,
            id: self.next_id,
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_pending: AtomicBool::new(true),
            closer: Mutex::new(Some(closer)),
        });
        if self.registry.admit(tracked.clone())
            && let Some(held_back) = self.limit_warning.ready()
        {
            tracing::warn!(
                max_connections = self.limits.max_connections,
                held_back,
                "at the connection limit: closed the longest-idle connection"
            );
        }
        Admitted {
            tracked,
            registry: self.registry.clone(),
            closed,
            limits: self.limits,
            _running: self.running.clone(),
        }
    }

    /// Stops accepting, asks every connection to finish, and waits at most `grace` for them.
    pub(crate) async fn shutdown(self, grace: Duration) {
        let Acceptor {
            listener,
            registry,
            running,
            mut stopped,
            ..
        } = self;
        drop(listener);
        registry.close_all();
        drop(running);
        tokio::select! {
            _ = stopped.recv() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
        }
    }
}

/// A registered connection, before hyper serves it.
pub(crate) struct Admitted<T> {
    tracked: Arc<Tracked<T>>,
    registry: Arc<Registry<T>>,
    closed: oneshot::Receiver<Closing>,
    limits: Limits,
    _running: mpsc::Sender<()>,
}

impl<T: Send + Sync + 'static> Admitted<T> {
    pub(crate) fn tracked(&self) -> Arc<Tracked<T>> {
        self.tracked.clone()
    }

    /// The socket as hyper should see it: with the header timer.
    pub(crate) fn watch(&self, stream: TcpStream) -> Watched<T> {
        Watched {
            stream,
            tracked: self.tracked.clone(),
            timer: Box::pin(tokio::time::sleep(self.limits.header_read)),
            header_read: self.limits.header_read,
            sniffed: Sniffed::Prefix(0),
        }
    }

    /// Serves `connection` to its end: the client's, the idle timeout's, an eviction's or the
    /// shutdown's. `graceful` is the connection's own graceful shutdown.
    pub(crate) async fn drive<C, E>(
        self,
        connection: C,
        graceful: impl FnOnce(Pin<&mut C>),
        peer: SocketAddr,
    ) where
        C: Future<Output = Result<(), E>>,
        E: Display,
    {
        let Admitted {
            tracked,
            registry,
            closed,
            limits,
            _running,
        } = self;
        let _registered = Deregister(&registry, tracked.id);
        let mut connection = pin!(connection);
        let why = tokio::select! {
            biased;
            result = connection.as_mut() => return ended(result, peer),
            why = closed => why.unwrap_or(Closing::Shutdown),
            () = idle(&tracked, limits.idle_ms) => Closing::Idle,
        };
        graceful(connection.as_mut());
        if why == Closing::Shutdown {
            // Bounded by the shutdown grace period (and the header timer) instead.
            return ended(connection.await, peer);
        }
        match tokio::time::timeout(CLOSING_GRACE, connection).await {
            Ok(result) => ended(result, peer),
            Err(_) => tracing::debug!(%peer, ?why, "connection did not close in time: dropped"),
        }
    }
}

/// Resolves once the connection has had no request in flight for `idle_ms`. The timer is moved
/// only when it fires, so requests never touch it.
async fn idle<T>(tracked: &Tracked<T>, idle_ms: u64) {
    let mut deadline = now_ms().saturating_add(idle_ms);
    loop {
        tokio::time::sleep_until(instant_at(deadline)).await;
        match tracked.idle_deadline(idle_ms) {
            Some(later) => deadline = later,
            None => return,
        }
    }
}

fn ended<E: Display>(result: Result<(), E>, peer: SocketAddr) {
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

struct Deregister<'a, T>(&'a Registry<T>, u64);

impl<T> Drop for Deregister<'_, T> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes said about the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    /// This many bytes of the HTTP/2 preface so far.
    Prefix(usize),
    Http1,
    Http2,
}

/// The socket under hyper, with the header timer (see the module doc).
pub(crate) struct Watched<T> {
    stream: TcpStream,
    tracked: Arc<Tracked<T>>,
    /// Runs while `tracked.head_pending`: a head (or the HTTP/2 preface) is awaited.
    timer: Pin<Box<Sleep>>,
    header_read: Duration,
    sniffed: Sniffed,
}

impl<T> Watched<T> {
    fn saw(&mut self, bytes: &[u8]) {
        match self.sniffed {
            Sniffed::Http2 => {}
            Sniffed::Prefix(matched) => self.sniff(matched, bytes),
            Sniffed::Http1 => {
                // The first byte of a later head on a keep-alive connection starts its timer.
                let tracked = &self.tracked;
                if !tracked.head_pending.load(Relaxed) && tracked.busy.load(Relaxed) == 0 {
                    tracked.head_pending.store(true, Relaxed);
                    self.timer.as_mut().reset(Instant::now() + self.header_read);
                }
            }
        }
    }

    fn sniff(&mut self, matched: usize, bytes: &[u8]) {
        let wanted = &H2_PREFACE[matched..];
        let n = wanted.len().min(bytes.len());
        self.sniffed = if bytes[..n] != wanted[..n] {
            Sniffed::Http1
        } else if matched + n == H2_PREFACE.len() {
            // From here on the idle timeout governs (module doc).
            self.tracked.head_pending.store(false, Relaxed);
            Sniffed::Http2
        } else {
            Sniffed::Prefix(matched + n)
        };
    }

    /// With no bytes to read: has the head taken too long?
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let awaited = self.sniffed != Sniffed::Http2 && self.tracked.head_pending.load(Relaxed);
        if awaited && self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head within server.header_read_timeout_ms",
            )));
        }
        Poll::Pending
    }
}

impl<T> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.saw(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_timer(cx),
            failed => failed,
        }
    }
}

impl<T> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(idle_since: u64) -> Arc<Tracked<()>> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let (closer, _) = oneshot::channel();
        Arc::new(Tracked {
            context: (),
            id: NEXT.fetch_add(1, Relaxed),
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(idle_since),
            head_pending: AtomicBool::new(true),
            closer: Mutex::new(Some(closer)),
        })
    }

    #[test]
    fn the_fd_limit_bounds_connections_with_a_reserve() {
        assert_eq!(bounded_by_files(10_000, 256), 192);
        assert_eq!(bounded_by_files(100, 256), 100);
        assert_eq!(bounded_by_files(10_000, 100), 50);
        assert_eq!(bounded_by_files(10_000, 0), 1);
    }

    #[test]
    fn eviction_picks_the_longest_idle_connection_without_a_request_in_flight() {
        let registry = Registry {
            open: Mutex::new(FxHashMap::default()),
            max: 2,
        };
        let (busy_oldest, idle_old, idle_new) = (tracked(1), tracked(5), tracked(9));
        let _request = busy_oldest.begin();
        assert!(!registry.admit(busy_oldest.clone()));
        assert!(!registry.admit(idle_old.clone()));
        // Full: the third closes the oldest idle one, not the older one with a request in flight.
        let (closer, mut closed) = oneshot::channel();
        *lock(&idle_old.closer) = Some(closer);
        assert!(registry.admit(idle_new.clone()));
        assert_eq!(closed.try_recv(), Ok(Closing::Evicted));
        let open = lock(&registry.open);
        assert!(open.contains_key(&busy_oldest.id) && open.contains_key(&idle_new.id));
        assert!(!open.contains_key(&idle_old.id));
    }

    #[test]
    fn a_request_in_flight_postpones_the_idle_deadline() {
        let connection = tracked(now_ms());
        assert!(connection.idle_deadline(60_000).is_some());
        connection.idle_since.store(1, Relaxed);
        let request = connection.begin();
        assert!(connection.idle_deadline(1).is_some(), "busy is never idle");
        connection.idle_since.store(0, Relaxed);
        drop(request);
        assert!(connection.idle_since.load(Relaxed) > 0, "idle from the end");
    }

    #[test]
    fn the_throttle_lets_one_warning_a_second_through() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
        throttle.last = Instant::now().checked_sub(Duration::from_secs(2));
        assert_eq!(throttle.ready(), Some(2));
    }
}
