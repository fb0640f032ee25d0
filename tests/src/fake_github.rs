//! A private repository on a fake GitHub Enterprise, for Nix's github fetcher and an access
//! token: the API answers that fetcher's two requests (src/libfetchers/github.cc) only when
//! the `Authorization` header carries the token, as GitHub does for a private repository (404
//! without credentials, 401 with wrong ones). TLS is socat's in front of our plain-HTTP server
//! ([`TlsFront`]), with a certificate from a CA made for the test.
//!
//! Nix takes `?host=` as a host name alone (no port) and always uses HTTPS on port 443: Nix
//! 2.8 at `https://api.HOST/repos/…`, later ones at `https://HOST/api/v3/repos/…` for a host
//! other than github.com. Both are answered. A guest reaches port 443 of the name through
//! QEMU's `guestfwd`, the host's Nix through [`ConnectProxy`].

use crate::http_server::{reason_phrase, AfterAnswer, HttpRequest, LoopbackServer};
use crate::tls::{ServerCert, TestCa, TlsFront};
use anyhow::{Context, Result};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::Arc;

/// The commit every ref of the repository resolves to.
pub const COMMIT: &str = "6d1b7a9c2e4f8a0b3c5d7e9f1a2b4c6d8e0f1a3b";

/// The top directory of the repository's tarball, as GitHub names it (Nix strips it).
pub fn tarball_top(owner: &str, repo: &str) -> String {
    format!("{owner}-{repo}-{}", &COMMIT[..7])
}

pub struct FakeGitHub {
    server: LoopbackServer,
    tls: TlsFront,
    ca: TestCa,
}

impl FakeGitHub {
    /// Serves the file `tarball` as `owner/repo` at [`COMMIT`] to requests with `token`, under
    /// `host` (and `api.host`, where Nix 2.8 looks).
    pub fn start(owner: &str, repo: &str, tarball: &Path, token: &str, host: &str) -> Result<FakeGitHub> {
        let tarball = std::fs::read(tarball).with_context(|| format!("reading {}", tarball.display()))?;
        let commits = format!("/repos/{owner}/{repo}/commits/");
        let archive = format!("/repos/{owner}/{repo}/tarball/{COMMIT}");
        let authorization = format!("token {token}");
        let handler = move |request: &HttpRequest, _: usize, stream: &mut TcpStream| {
            let path = request.path.strip_prefix("/api/v3").unwrap_or(&request.path);
            let (status, body) = match request.header("Authorization") {
                None => (404, br#"{"message":"Not Found"}"#.to_vec()),
                Some(given) if given != authorization => (401, br#"{"message":"Bad credentials"}"#.to_vec()),
                Some(_) if path.starts_with(&commits) => {
                    (200, format!(r#"{{"sha":"{COMMIT}"}}"#).into_bytes())
                }
                Some(_) if path == archive => (200, tarball.clone()),
                Some(_) => (404, br#"{"message":"Not Found"}"#.to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
                reason_phrase(status),
                body.len(),
                if request.keep_alive { "keep-alive" } else { "close" }
            );
            stream.write_all(head.as_bytes()).context("sending a header")?;
            stream.write_all(&body).context("sending a body")?;
            Ok(AfterAnswer::KeepOpen)
        };
        let server = LoopbackServer::start("fake GitHub", Arc::new(handler), usize::MAX)?;
        let ca = TestCa::new()?;
        let cert: ServerCert = ca.server_cert(host, &[&format!("DNS:{host}"), &format!("DNS:api.{host}")])?;
        let tls = TlsFront::start(&cert, server.port())?;
        Ok(FakeGitHub { server, tls, ca })
    }

    /// Where the TLS front listens on 127.0.0.1.
    pub fn tls_port(&self) -> u16 {
        self.tls.port()
    }

    /// The CA that signed the server's certificate.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The requests so far, headers included.
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.server.requests()
    }

    /// `-netdev user` options that send a guest's connections to `address:443` to the TLS
    /// front, a socat per connection (QEMU's `guestfwd`).
    pub fn guestfwd(&self, address: &str) -> String {
        format!(
            "guestfwd=tcp:{address}:443-cmd:socat STDIO TCP:127.0.0.1:{}",
            self.tls.port()
        )
    }
}

/// An HTTP proxy on 127.0.0.1 that tunnels every CONNECT to one local port, whatever host it
/// names: the host's Nix (curl, through `https_proxy`) reaches a made-up host on port 443
/// with no DNS entry and no privileged port, and still checks the TLS certificate against the
/// name. The CONNECT requests are recorded.
pub struct ConnectProxy {
    server: LoopbackServer,
}

impl ConnectProxy {
    pub fn start(to_port: u16) -> Result<ConnectProxy> {
        let handler = move |request: &HttpRequest, _: usize, client: &mut TcpStream| {
            if request.method != "CONNECT" {
                client
                    .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                    .context("refusing a request")?;
                return Ok(AfterAnswer::Close);
            }
            let upstream = TcpStream::connect(("127.0.0.1", to_port)).context("connecting the tunnel")?;
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .context("answering CONNECT")?;
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            };
            let (client_in, upstream_out) = (client.try_clone()?, upstream.try_clone()?);
            let client_out = client.try_clone()?;
            std::thread::scope(|scope| {
                scope.spawn(|| pipe(client_in, upstream_out));
                pipe(upstream, client_out);
            });
            Ok(AfterAnswer::Close)
        };
        Ok(ConnectProxy {
            server: LoopbackServer::start("CONNECT proxy", Arc::new(handler), usize::MAX)?,
        })
    }

    /// For `https_proxy`.
    pub fn url(&self) -> String {
        self.server.host_url()
    }

    /// The requests so far (`CONNECT host:port`).
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.server.requests()
    }
}
