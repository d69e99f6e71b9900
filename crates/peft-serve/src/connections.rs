//! Accepting connections: hyper's HTTP/1 server under axum's router, with the limits a public
//! endpoint needs.
//!
//! `axum::serve` drives the same hyper server but sets no timer, so hyper's header read timeout
//! never fires (a client that sends half a request line holds its connection for ever), and it
//! accepts every connection. This loop is `axum::serve`'s with those two settings: a cap on
//! open connections (past it, new ones wait in the kernel's backlog until one closes) and a
//! deadline for a request's headers. Request and body timeouts are tower-http layers on the
//! router ([`crate::routes::router`]), inside its response count. Shutdown stops accepting and drains the open
//! connections (hyper-util's graceful shutdown); the caller bounds the drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How many connections, and how slowly they may send their headers.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers (the first request's from its
    /// opening, later ones' from the end of the previous response).
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the open connections
/// to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, as axum::serve does.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
