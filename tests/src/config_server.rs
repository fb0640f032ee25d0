//! A server for `nixos_kexec.config_url` (and a report server for `report_url`) on the host's
//! loopback, which a guest with QEMU's user networking reaches as 10.0.2.2.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::http_server::{reason_phrase, AfterAnswer, HttpRequest, LoopbackServer};

/// Per request path, the `(status, body)` answers a [`ConfigServer`] gives in turn.
pub type Routes = Vec<(String, Vec<(u16, String)>)>;

/// A config server on 127.0.0.1. It answers at most `max_requests` requests, one a connection
/// (closed after the answer), keeps their paths and stops when dropped.
pub struct ConfigServer {
    server: LoopbackServer,
}

impl ConfigServer {
    /// Each path answers its list of `(status, body)` in turn, the last one repeating; unknown
    /// paths get 404.
    pub fn start(routes: Routes, max_requests: usize) -> Result<ConfigServer> {
        let answer = move |path: &str, seen_before: usize| {
            let (status, body) = routes
                .iter()
                .find(|(p, _)| p == path)
                .and_then(|(_, answers)| {
                    answers
                        .get(seen_before.min(answers.len().saturating_sub(1)))
                        .cloned()
                })
                .unwrap_or((404, "{\"error\":\"no such machine\"}".to_string()));
            format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                reason_phrase(status),
                body.len()
            )
            .into_bytes()
        };
        Self::serve(answer, max_requests)
    }

    /// The n-th request for a path gets `answers[n]` as is (the last one repeating), whatever
    /// it is: for servers that break off or do not speak HTTP.
    pub fn start_raw(answers: Vec<Vec<u8>>, max_requests: usize) -> Result<ConfigServer> {
        let answer = move |_: &str, seen_before: usize| {
            answers
                .get(seen_before.min(answers.len().saturating_sub(1)))
                .cloned()
                .unwrap_or_default()
        };
        Self::serve(answer, max_requests)
    }

    fn serve(
        answer: impl Fn(&str, usize) -> Vec<u8> + Send + Sync + 'static,
        max_requests: usize,
    ) -> Result<ConfigServer> {
        let handler = move |request: &HttpRequest, seen_before: usize, stream: &mut TcpStream| {
            stream
                .write_all(&answer(&request.path, seen_before))
                .context("sending the answer")?;
            Ok(AfterAnswer::Close)
        };
        Ok(ConfigServer {
            server: LoopbackServer::start("config server", Arc::new(handler), max_requests)?,
        })
    }

    /// The server as the guest sees it.
    pub fn guest_url(&self) -> String {
        self.server.guest_url()
    }

    /// Request paths so far (percent-decoded).
    pub fn requests(&self) -> Vec<String> {
        self.server.requests().into_iter().map(|r| r.path).collect()
    }

    /// The requests so far, bodies included: what a report server was sent.
    pub fn recorded(&self) -> Vec<HttpRequest> {
        self.server.requests()
    }

    /// The port it listens on, on 127.0.0.1 (for a TLS front).
    pub fn port(&self) -> u16 {
        self.server.port()
    }
}
