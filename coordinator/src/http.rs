//! The HTTP listener, hardened: a bound on open connections, a cap on the
//! request head, a deadline for the head (and for idle keep-alive), body
//! limits per route (in `api`). One task per connection, no thread: parked
//! long-polls cost a future each.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// The address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// Most bytes of request line + headers; larger heads are refused (431).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A client has this long to send a request head, also between requests on
/// a kept-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection waits for an evicted one to free its slot.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// Connections that have not yet sent a whole request head, oldest first.
/// They are the only ones anyone can open without a credential, so they are
/// the ones given up when the listener is full: a client that sends its
/// request at once (a new agent registering, a health check) always gets a
/// connection, however many half-open ones someone else holds.
#[derive(Default)]
struct Unproven {
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Unproven {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, oneshot::Sender<()>)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection; the receiver fires when it is evicted.
    fn add(&self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().push_back((id, tx));
        rx
    }

    /// The connection sent a request (or ended): it is no longer evictable.
    fn proven(&self, id: u64) {
        let mut q = self.lock();
        if let Some(i) = q.iter().position(|(c, _)| *c == id) {
            q.remove(i);
        }
    }

    /// Closes the oldest connection that never sent a request. False when
    /// there is none.
    fn evict_oldest(&self) -> bool {
        match self.lock().pop_front() {
            Some((_, tx)) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let unproven = Arc::new(Unproven::default());
    // At most a quarter of the connections wait for their first request.
    let max_unproven = (max_connections / 4).max(8);
    let mut next_id = 0u64;
    let mut last_full_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        if unproven.len() >= max_unproven {
            unproven.evict_oldest();
        }
        let Some(permit) = admit(&permits, &unproven).await else {
            if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                log::warn!("connection limit of {max_connections} reached; closing new connections (--max-connections)");
                last_full_warning = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        next_id += 1;
        let conn = Connection {
            id: next_id,
            peer,
            unproven: unproven.clone(),
            permit,
        };
        tokio::spawn(conn.serve(stream, router.clone(), tls.clone()));
    }
}

/// A slot for a new connection; when all are taken, the oldest connection
/// that never sent a request makes room.
async fn admit(
    permits: &Arc<Semaphore>,
    unproven: &Unproven,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match permits.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) if unproven.evict_oldest() => {
            tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
        }
        Err(_) => None,
    }
}

/// One accepted connection, holding its slot until it ends.
struct Connection {
    id: u64,
    peer: std::net::SocketAddr,
    unproven: Arc<Unproven>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, stream: tokio::net::TcpStream, router: Router, tls: Option<TlsAcceptor>) {
        let Connection {
            id,
            peer,
            unproven,
            permit,
        } = self;
        let evicted = unproven.add(id);
        // Handlers learn the client's address (registration rate limits);
        // a request head read makes the connection no longer evictable.
        let seen = unproven.clone();
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = TowerToHyperService::new(router.map_request(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                if !asked.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    seen.proven(id);
                }
                req.extensions_mut().insert(ClientAddr(peer));
                req
            },
        ));
        let _ = stream.set_nodelay(true);
        let serve = async {
            match tls {
                None => serve_io(TokioIo::new(stream), service).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => serve_io(TokioIo::new(tls_stream), service).await,
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            }
        };
        let result = tokio::select! {
            r = serve => r,
            Ok(()) = evicted => Err("closed to make room: no request yet".into()),
        };
        if let Err(e) = result {
            log::debug!("connection from {peer} ended: {e}");
        }
        unproven.proven(id);
        drop(permit);
    }
}

async fn serve_io<I, S>(io: I, service: S) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: 'static + Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    <S::ResBody as hyper::body::Body>::Data: Send,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .serve_connection(io, service)
        .await
        .map_err(|e| e.to_string())
}

/// A TLS acceptor from PEM files: the certificate chain and its private key.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading the TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("reading the TLS key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| format!("the TLS certificate and key do not make a server config: {e}"))?;
    Ok(TlsAcceptor::from(std::sync::Arc::new(config)))
}
