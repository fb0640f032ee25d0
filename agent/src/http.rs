//! A minimal HTTP/1.1 GET client over `std::net::TcpStream`, for `nixos_kexec.config_url=`.
//!
//! Plain HTTP only: the installer bundle carries no CA certificates and no TLS client (a
//! TLS stack would cost more than the whole agent). Responses may use `Content-Length`,
//! `Transfer-Encoding: chunked`, or end at connection close; redirects to other `http://`
//! URLs are followed. Transient failures (connection errors, timeouts, 5xx, 408, 429) are
//! retried with exponential backoff; any other 4xx is final.

use crate::error::user_error;
use anyhow::{anyhow, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Runtime info is small; anything bigger is a wrong URL (a directory listing, an image).
pub const MAX_BODY: usize = 1 << 20;
const MAX_HEADER_BYTES: usize = 64 << 10;
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url> {
        let bad = |why: &str| {
            user_error(
                format!("{text:?} is not a usable URL: {why}."),
                "write it as http://HOST[:PORT]/PATH, e.g. http://10.0.0.1:8080/hosts/${mac}.json.",
            )
        };
        if text
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
        {
            return Err(user_error(
                format!("{text} uses HTTPS, which this installer does not support yet (the bundle has no TLS client and no CA certificates)."),
                "serve the runtime info over plain http:// on a network you trust, or pass it with nixos_kexec.info= or in an appended initrd.",
            ));
        }
        let rest = match text.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &text[7..],
            _ => return Err(bad("it does not start with http://")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        // Fragments never go to the server.
        let path = match path.split_once('#') {
            Some((p, _)) => p.to_string(),
            None => path,
        };
        if authority.contains('@') {
            return Err(bad("user names and passwords in URLs are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in the host"))?;
            match after.strip_prefix(':') {
                Some(port) => (host.to_string(), Some(port)),
                None if after.is_empty() => (host.to_string(), None),
                None => return Err(bad("garbage after the IPv6 address")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad(
                "spaces or control characters in the path (percent-encode them)",
            ));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("the port is not a number"))?,
            None => 80,
        };
        Ok(Url { host, port, path })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolves `Location:` against this URL (absolute `http://` URLs and absolute paths).
    fn join(&self, location: &str) -> Result<Url> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Ok(Url {
                path: location.to_string(),
                ..self.clone()
            });
        }
        Url::parse(location)
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub connect_timeout: Duration,
    /// For each read and write, not for the whole transfer.
    pub io_timeout: Duration,
    pub attempts: u32,
    /// Wait after the first failed attempt; doubled after each further one.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(20),
            attempts: 5,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(16),
        }
    }
}

/// How one attempt went wrong: worth another try, or not.
#[derive(Debug)]
enum Failure {
    Transient(String),
    Final(anyhow::Error),
}

/// GETs `url` and returns the body of a 2xx answer, retrying transient failures. `report`
/// receives one line per failed attempt (for the console).
pub fn get(url: &str, options: &Options, report: &mut dyn FnMut(&str)) -> Result<Vec<u8>> {
    let url = Url::parse(url)?;
    let mut delay = options.first_delay;
    let mut last = String::new();
    let attempts = options.attempts.max(1);
    for attempt in 1..=attempts {
        match get_following_redirects(&url, options) {
            Ok(body) => return Ok(body),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Transient(why)) => {
                last = why;
                if attempt < attempts {
                    report(&format!(
                        "GET {url}: attempt {attempt}/{attempts} failed: {last}; retrying in {}",
                        describe_delay(delay)
                    ));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(options.max_delay);
                }
            }
        }
    }
    Err(user_error(
        format!("Could not fetch {url}: {attempts} attempts failed, the last with: {last}."),
        "check that the config server is up and reachable from this machine (the network lines above show what the installer has).",
    ))
}

fn describe_delay(delay: Duration) -> String {
    if delay.as_millis().is_multiple_of(1000) {
        format!("{} s", delay.as_secs())
    } else {
        format!("{} ms", delay.as_millis())
    }
}

fn get_following_redirects(url: &Url, options: &Options) -> Result<Vec<u8>, Failure> {
    let mut current = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let response = get_once(&current, options)?;
        match response.status {
            200..=299 => return Ok(response.body),
            301 | 302 | 303 | 307 | 308 => {
                let location = response.header("location").ok_or_else(|| {
                    Failure::Final(user_error(
                        format!(
                            "{current} answered {} {} without a Location.",
                            response.status, response.reason
                        ),
                        "fix the config server's redirect, or point nixos_kexec.config_url at the final URL.",
                    ))
                })?;
                let next = current.join(location).map_err(Failure::Final)?;
                log::info!("config_url: {current} redirects to {next}");
                current = next;
            }
            408 | 429 | 500..=599 => {
                return Err(Failure::Transient(format!(
                    "{} {}",
                    response.status, response.reason
                )))
            }
            status => {
                return Err(Failure::Final(user_error(
                    format!("{current} answered {status} {}.", response.reason),
                    if (400..500).contains(&status) {
                        "check the URL and that the config server has an entry for this machine (the substituted URL is shown above)."
                    } else {
                        "make the config server answer 200 with the runtime-info JSON."
                    },
                )))
            }
        }
    }
    Err(Failure::Final(user_error(
        format!("{url} redirects more than {MAX_REDIRECTS} times."),
        "point nixos_kexec.config_url at the final URL.",
    )))
}

fn connect(url: &Url, options: &Options) -> Result<TcpStream, Failure> {
    let addresses: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| Failure::Transient(format!("cannot resolve {}: {e}", url.host)))?
        .collect();
    let mut errors = Vec::new();
    for address in &addresses {
        match TcpStream::connect_timeout(address, options.connect_timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => errors.push(format!("{address}: {e}")),
        }
    }
    Err(Failure::Transient(if errors.is_empty() {
        format!("{} has no addresses", url.host)
    } else {
        format!("cannot connect: {}", errors.join(", "))
    }))
}

/// One request on a fresh connection (`Connection: close`).
fn get_once(url: &Url, options: &Options) -> Result<Response, Failure> {
    let mut stream = connect(url, options)?;
    let io = |e: std::io::Error| Failure::Transient(format!("{e}"));
    stream.set_read_timeout(Some(options.io_timeout)).map_err(io)?;
    stream.set_write_timeout(Some(options.io_timeout)).map_err(io)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: nixos-kexec/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    read_response(BufReader::new(stream))
}

fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<String, Failure> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| Failure::Transient(format!("reading the response: {e}")))?;
    if n > *budget {
        return Err(Failure::Transient("the response headers are too long".into()));
    }
    *budget -= n;
    if n == 0 {
        return Err(Failure::Transient(
            "the connection closed before the response was complete".into(),
        ));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Parses a response from the server (exposed to the tests through [`parse_response`]).
fn read_response(mut reader: impl BufRead) -> Result<Response, Failure> {
    let mut budget = MAX_HEADER_BYTES;
    let (status, reason, headers) = loop {
        let status_line = read_line(&mut reader, &mut budget)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
            return Err(Failure::Transient(format!(
                "not an HTTP/1.x status line: {status_line:?}"
            )));
        };
        let reason = parts.next().unwrap_or("").trim().to_string();
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader, &mut budget)?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        // 1xx answers (100 Continue) precede the real one.
        if !(100..200).contains(&status) {
            break (status, reason, headers);
        }
    };
    let mut response = Response {
        status,
        reason,
        headers,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        read_chunked(&mut reader)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| Failure::Transient(format!("bad Content-Length {length:?}")))?;
        if length > MAX_BODY {
            return Err(too_big());
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(|e| {
            Failure::Transient(format!("the body ended early (expected {length} bytes): {e}"))
        })?;
        body
    } else {
        let mut body = Vec::new();
        reader
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| Failure::Transient(format!("reading the body: {e}")))?;
        if body.len() > MAX_BODY {
            return Err(too_big());
        }
        body
    };
    Ok(response)
}

fn too_big() -> Failure {
    Failure::Final(user_error(
        format!(
            "The answer is larger than {} KiB, too large for runtime info.",
            MAX_BODY >> 10
        ),
        "point nixos_kexec.config_url at the runtime-info JSON itself.",
    ))
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    let mut budget = MAX_HEADER_BYTES;
    loop {
        let line = read_line(reader, &mut budget)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| Failure::Transient(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, then the empty line; a server that just closes is fine too.
            while let Ok(line) = read_line(reader, &mut budget) {
                if line.is_empty() {
                    break;
                }
            }
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(too_big());
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .map_err(|e| Failure::Transient(format!("a chunk ended early: {e}")))?;
        let end = read_line(reader, &mut budget)?;
        if !end.is_empty() {
            return Err(Failure::Transient("no line break after a chunk".into()));
        }
    }
}

/// Parses raw response bytes, for tests and tools.
pub fn parse_response(bytes: &[u8]) -> Result<Response> {
    read_response(bytes).map_err(|f| match f {
        Failure::Transient(why) => anyhow!(why),
        Failure::Final(e) => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    #[test]
    fn urls() {
        let u = Url::parse("http://10.0.2.2:8080/hosts/52:54:00:12:34:56.json?x=1#frag").unwrap();
        assert_eq!(
            u,
            Url {
                host: "10.0.2.2".into(),
                port: 8080,
                path: "/hosts/52:54:00:12:34:56.json?x=1".into()
            }
        );
        assert_eq!(
            u.to_string(),
            "http://10.0.2.2:8080/hosts/52:54:00:12:34:56.json?x=1"
        );
        let v6 = Url::parse("HTTP://[2001:db8::1]/x").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.path.as_str()),
            ("2001:db8::1", 80, "/x")
        );
        assert_eq!(v6.host_header(), "[2001:db8::1]");
        assert_eq!(Url::parse("http://conf.example?m=1").unwrap().path, "/?m=1");
        assert_eq!(Url::parse("http://conf.example").unwrap().path, "/");
        let https = Url::parse("https://conf.example/x").unwrap_err();
        assert!(crate::error::one_line(&https).contains("HTTPS"), "{https}");
        for bad in [
            "ftp://x/",
            "http://",
            "http://h:99999/",
            "http://u:p@h/",
            "http://h/a b",
            "httpé://x",
            "https:/é",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        let base = Url::parse("http://h:81/a/b").unwrap();
        assert_eq!(base.join("/c").unwrap().to_string(), "http://h:81/c");
        assert_eq!(base.join("http://other/d").unwrap().to_string(), "http://other/d");
    }

    #[test]
    fn status_lengths_and_chunks() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello-extra").unwrap();
        assert_eq!(
            (r.status, r.reason.as_str(), r.body.as_slice()),
            (200, "OK", &b"hello"[..])
        );
        assert_eq!(r.header("x"), Some("y"));
        let r = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nTrailer: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
        let r = parse_response(b"HTTP/1.0 404 Not Found\n\nno such host").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no such host"[..]));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        let huge = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(parse_response(huge.as_bytes()).is_err());
    }

    /// A server on 127.0.0.1 answering each connection with the next canned response (the
    /// last one repeats), recording request heads; it stops after `limit` connections.
    fn serve(responses: Vec<String>, limit: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().take(limit).enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                log.lock().unwrap().push(head);
                let response = &responses[i.min(responses.len() - 1)];
                let _ = stream.write_all(response.as_bytes());
            }
        });
        (base, seen)
    }

    fn quick() -> Options {
        Options {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            attempts: 5,
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"version\":1}";
    const FAIL: &str = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn retries_5xx_then_succeeds() {
        let (base, seen) = serve(vec![FAIL.into(), FAIL.into(), OK.into()], 3);
        let mut lines = Vec::new();
        let body = get(&format!("{base}/52:54:00:12:34:56.json"), &quick(), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
        assert_eq!(body, b"{\"version\":1}");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("attempt 1/5 failed: 500 Internal Server Error; retrying in 10 ms"));
        assert!(lines[1].contains("retrying in 20 ms"), "{lines:?}");
        let heads = seen.lock().unwrap();
        assert_eq!(heads.len(), 3);
        assert!(
            heads[0].starts_with("GET /52:54:00:12:34:56.json HTTP/1.1\r\n"),
            "{heads:?}"
        );
        assert!(heads[0].contains(&format!("Host: {}\r\n", base.trim_start_matches("http://"))));
        assert!(heads[0].contains("Connection: close"));
    }

    #[test]
    fn client_errors_are_final_and_name_url_and_status() {
        let (base, seen) = serve(
            vec!["HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into()],
            5,
        );
        let url = format!("{base}/nope.json");
        let err = get(&url, &quick(), &mut |_| {}).unwrap_err();
        let text = crate::error::one_line(&err);
        assert!(text.contains(&url) && text.contains("404 Not Found"), "{text}");
        assert!(crate::error::as_user_error(&err).is_some());
        assert_eq!(seen.lock().unwrap().len(), 1, "a 404 must not be retried");
    }

    #[test]
    fn gives_up_after_the_attempts_with_the_last_reason() {
        let (base, seen) = serve(vec![FAIL.into()], 3);
        let options = Options {
            attempts: 3,
            ..quick()
        };
        let err = get(&format!("{base}/x"), &options, &mut |_| {}).unwrap_err();
        let text = crate::error::one_line(&err);
        assert!(
            text.contains("3 attempts failed") && text.contains("500"),
            "{text}"
        );
        assert_eq!(seen.lock().unwrap().len(), 3);

        // Nothing listening: connection refused is transient too.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x", closed.local_addr().unwrap());
        drop(closed);
        let mut lines = 0;
        let err = get(&url, &options, &mut |_| lines += 1).unwrap_err();
        assert!(crate::error::one_line(&err).contains("cannot connect"), "{err}");
        assert_eq!(lines, 2);
    }

    #[test]
    fn follows_redirects_and_reads_chunked_bodies() {
        let (base, seen) = serve(
            vec![
                "HTTP/1.1 302 Found\r\nLocation: /final.json\r\nContent-Length: 0\r\n\r\n".into(),
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".into(),
            ],
            2,
        );
        let body = get(&format!("{base}/start"), &quick(), &mut |_| {}).unwrap();
        assert_eq!(body, b"{}");
        assert!(seen.lock().unwrap()[1].starts_with("GET /final.json "));
    }
}
