//! A minimal HTTP/1.1 client: GET for `nixos_kexec.config_url=` and binary caches, POST of
//! JSON for `report_url`; plain TCP, or TLS through [`crate::input::tls`] for `https://`.
//!
//! Responses may use `Content-Length`, `Transfer-Encoding: chunked`, or end at connection
//! close; a GET follows redirects, except from HTTPS down to plain HTTP, a POST none. Transient
//! failures (connection errors, timeouts, 5xx, 408, 429) are retried with exponential backoff;
//! any other 4xx, and any certificate or TLS protocol problem, is final.

use crate::error::user_error;
use crate::input::tls::Failure;
use anyhow::{anyhow, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Runtime info is small; anything bigger is a wrong URL (a directory listing, an image).
pub const MAX_BODY: usize = 1 << 20;
const MAX_HEADER_BYTES: usize = 64 << 10;
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url> {
        let bad = |why: &str| {
            user_error(
                format!("{:?} is not a usable URL: {why}.", redact(text)),
                "write it as http[s]://HOST[:PORT]/PATH, e.g. https://10.0.0.1:8443/hosts/${mac}.json.",
            )
        };
        let starts_with = |prefix: &str| {
            text.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        let (scheme, rest) = if starts_with("http://") {
            (Scheme::Http, &text[7..])
        } else if starts_with("https://") {
            (Scheme::Https, &text[8..])
        } else {
            return Err(bad("it does not start with http:// or https://"));
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
            None => scheme.default_port(),
        };
        Ok(Url {
            scheme,
            host,
            port,
            path,
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// This URL with `file` appended to its path (a file in the directory the URL names).
    pub fn join_file(&self, file: &str) -> Url {
        let directory = self
            .path
            .split_once('?')
            .map_or(self.path.as_str(), |(path, _)| path);
        Url {
            path: format!("{}/{file}", directory.trim_end_matches('/')),
            ..self.clone()
        }
    }

    /// Resolves `Location:` against this URL (absolute URLs and absolute paths). A redirect
    /// from HTTPS to plain HTTP is refused: it would silently drop the server's authentication.
    fn join(&self, location: &str) -> Result<Url> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Ok(Url {
                path: location.to_string(),
                ..self.clone()
            });
        }
        let next = Url::parse(location)?;
        if self.scheme == Scheme::Https && next.scheme == Scheme::Http {
            return Err(user_error(
                format!("{self} redirects to {next}, from HTTPS down to plain HTTP."),
                "make the server redirect to an https:// URL, or use the final URL.",
            ));
        }
        Ok(next)
    }
}

/// Shown in place of a query string, which often carries an access token.
const HIDDEN_QUERY: &str = "?<hidden>";

/// A URL as the console, the log and error messages may show it: a password or token in its
/// user part or query string is replaced, and the fragment dropped. For text that is not (yet)
/// a [`Url`], such as a config_url template or a URL that failed to parse.
pub fn redact(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let (before_query, query) = match rest.split_once('?') {
        Some((before, _)) => (before, HIDDEN_QUERY),
        None => (rest, ""),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<hidden>@{host}"),
        None => authority.to_string(),
    };
    format!("{scheme}{authority}{path}{query}")
}

impl Url {
    /// The whole URL, query included: for handing it on to another program, never to show.
    pub fn unredacted(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}{}", self.host_header(), self.path)
    }
}

/// Shown redacted (see [`redact`]); the request itself uses the whole path and query.
impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.unredacted()))
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
        header(&self.headers, name)
    }
}

/// The first of `headers` called `name` (any case, as HTTP names are).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone)]
pub struct Options {
    pub connect_timeout: Duration,
    /// For each read and write.
    pub io_timeout: Duration,
    /// For a whole attempt: connection, TLS handshake, headers and body.
    pub attempt_timeout: Duration,
    pub attempts: u32,
    /// Wait after the first failed attempt; doubled after each further one.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// CA certificate files and directories for `https://` (see [`crate::input::tls`]).
    pub trust: Vec<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(20),
            // Runtime info is a few KiB; a server slower than this is as good as down.
            attempt_timeout: Duration::from_secs(60),
            attempts: 5,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(16),
            trust: crate::input::tls::default_trust_sources(),
        }
    }
}

/// GETs `url` and returns the body of a 2xx answer, retrying transient failures. `report`
/// receives one line per failed attempt (for the console).
pub fn get(url: &str, options: &Options, report: &mut dyn FnMut(&str)) -> Result<Vec<u8>> {
    let url = Url::parse(url)?;
    let (answered, response) = get_response(&url, options, report).map_err(|e| match e.downcast::<Unreachable>() {
        Ok(unreachable) => user_error(
            unreachable.to_string(),
            "check that the config server is up and reachable from this machine (the network lines above show what the installer has).",
        ),
        Err(e) => e,
    })?;
    match response.status {
        200..=299 => Ok(response.body),
        status => Err(user_error(
            format!("{answered} answered {status} {}.", response.reason),
            if (400..500).contains(&status) {
                "check the URL and that the config server has an entry for this machine (the substituted URL is shown above)."
            } else {
                "make the config server answer 200 with the runtime-info JSON."
            },
        )),
    }
}

/// All attempts at a URL failed for reasons that may pass (connection, timeout, 5xx).
#[derive(Debug)]
pub struct Unreachable {
    pub url: Url,
    pub attempts: u32,
    pub last: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Could not fetch {}: {} attempts failed, the last with: {}.",
            self.url, self.attempts, self.last
        )
    }
}

impl std::error::Error for Unreachable {}

/// GETs `url`, following redirects and retrying transient failures, and returns the URL that
/// answered and its answer whatever the status, unless it stayed transient: then the error is
/// an [`Unreachable`]. Certificate and protocol problems are final errors at once.
pub fn get_response(url: &Url, options: &Options, report: &mut dyn FnMut(&str)) -> Result<(Url, Response)> {
    with_retries("GET", url, options, report, |tls| {
        get_following_redirects(url, options, tls)
    })
}

/// POSTs `body` as JSON to `url`, retrying transient failures as [`get_response`] does, and
/// succeeds on a 2xx answer. Any other answer is final, a redirect too: it is not followed.
pub fn post_json(url: &Url, body: &[u8], options: &Options, report: &mut dyn FnMut(&str)) -> Result<()> {
    with_retries("POST", url, options, report, |tls| {
        let response = send_once(url, &Request::PostJson(body), options, tls)?;
        match response.status {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(Failure::Transient(format!(
                "{} {}",
                response.status, response.reason
            ))),
            status => Err(Failure::Final(user_error(
                format!("{url} answered {status} {}.", response.reason),
                "make the server answer a POST of JSON with 2xx.",
            ))),
        }
    })
}

/// A file fetched whole by [`download`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// GETs `url` into `file` (made anew on each attempt), following redirects and retrying
/// transient failures from the start; returns the file's length and SHA-256. Only a 2xx
/// answer is written; any other is final, as is a file that cannot be written.
pub fn download(
    url: &Url,
    file: &std::path::Path,
    options: &Options,
    report: &mut dyn FnMut(&str),
) -> Result<Downloaded> {
    with_retries("GET", url, options, report, |tls| {
        let (_, downloaded) = following_redirects(url, &Request::Download, options, tls, |head, reader| {
            if !(200..=299).contains(&head.status) {
                return Err(Failure::Final(user_error(
                    format!("{url} answered {} {}.", head.status, head.reason),
                    "check the URL: it names a directory holding the bundle's files.",
                )));
            }
            let cannot_write = |e: std::io::Error| {
                Failure::Final(anyhow::Error::new(e).context(format!("writing {}", file.display())))
            };
            let mut out = std::fs::File::create(file).map_err(cannot_write)?;
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            let bytes = read_body(reader, &head.headers, &mut |piece| {
                digest.update(piece);
                out.write_all(piece).map_err(cannot_write)
            })?;
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(digest.finish().as_ref());
            Ok(Downloaded { bytes, sha256 })
        })?;
        Ok(downloaded)
    })
}

/// Makes attempts at `url` until one succeeds or fails for good, waiting longer after each
/// transient failure; `method` names the request in the lines for `report`. When every attempt
/// failed transiently, the error is an [`Unreachable`].
fn with_retries<T>(
    method: &str,
    url: &Url,
    options: &Options,
    report: &mut dyn FnMut(&str),
    mut attempt_once: impl FnMut(&mut Option<crate::input::tls::Client>) -> Result<T, Failure>,
) -> Result<T> {
    let mut delay = options.first_delay;
    let mut last = String::new();
    let attempts = options.attempts.max(1);
    // Loaded on the first https:// request, then shared by redirects and retries.
    let mut tls = None;
    for attempt in 1..=attempts {
        match attempt_once(&mut tls) {
            Ok(answer) => return Ok(answer),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Transient(why)) => {
                last = why;
                if attempt < attempts {
                    report(&format!(
                        "{method} {url}: attempt {attempt}/{attempts} failed: {last}; retrying in {}",
                        describe_delay(delay)
                    ));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(options.max_delay);
                }
            }
        }
    }
    Err(anyhow::Error::new(Unreachable {
        url: url.clone(),
        attempts,
        last,
    }))
}

fn describe_delay(delay: Duration) -> String {
    if delay.as_millis().is_multiple_of(1000) {
        format!("{} s", delay.as_secs())
    } else {
        format!("{} ms", delay.as_millis())
    }
}

fn get_following_redirects(
    url: &Url,
    options: &Options,
    tls: &mut Option<crate::input::tls::Client>,
) -> Result<(Url, Response), Failure> {
    following_redirects(url, &Request::Get, options, tls, |head, reader| {
        head.with_body_from(reader)
    })
}

/// GETs `url`, following redirects, and hands the final answer's head and its unread body to
/// `finish`. Transient statuses (408, 429, 5xx) are transient failures; any other status goes
/// to `finish`.
fn following_redirects<T>(
    url: &Url,
    request: &Request,
    options: &Options,
    tls: &mut Option<crate::input::tls::Client>,
    finish: impl FnOnce(Head, &mut dyn BufRead) -> Result<T, Failure>,
) -> Result<(Url, T), Failure> {
    let mut current = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let (head, mut reader) = open(&current, request, options, tls)?;
        match head.status {
            301 | 302 | 303 | 307 | 308 => {
                let location = header(&head.headers, "location").ok_or_else(|| {
                    Failure::Final(user_error(
                        format!(
                            "{current} answered {} {} without a Location.",
                            head.status, head.reason
                        ),
                        "fix the server's redirect, or use the final URL.",
                    ))
                })?;
                let next = current.join(location).map_err(Failure::Final)?;
                log::info!("{current} redirects to {next}");
                current = next;
            }
            408 | 429 | 500..=599 => {
                return Err(Failure::Transient(format!("{} {}", head.status, head.reason)))
            }
            _ => {
                let answer = finish(head, &mut reader)?;
                return Ok((current, answer));
            }
        }
    }
    Err(Failure::Final(user_error(
        format!("{url} redirects more than {MAX_REDIRECTS} times."),
        "use the final URL.",
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

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// What a request sends.
enum Request<'a> {
    Get,
    /// A GET of a file of any type, perhaps large.
    Download,
    /// A JSON document as the body.
    PostJson(&'a [u8]),
}

/// One request on a fresh connection (`Connection: close`), its answer read whole.
fn send_once(
    url: &Url,
    request: &Request,
    options: &Options,
    tls: &mut Option<crate::input::tls::Client>,
) -> Result<Response, Failure> {
    let (head, mut reader) = open(url, request, options, tls)?;
    head.with_body_from(&mut reader)
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the answer's head;
/// the body is left in the reader. `tls` holds the client once the CA certificates are loaded.
fn open(
    url: &Url,
    request: &Request,
    options: &Options,
    tls: &mut Option<crate::input::tls::Client>,
) -> Result<(Head, BufReader<Box<dyn Stream>>), Failure> {
    if url.scheme == Scheme::Https && tls.is_none() {
        // Before connecting: a bundle without CA certificates is not a network problem.
        *tls = Some(crate::input::tls::load_client(&options.trust).map_err(Failure::Final)?);
    }
    let until = Instant::now() + options.attempt_timeout;
    let tcp = connect(url, options)?;
    let io = |e: std::io::Error| Failure::Transient(format!("{e}"));
    let tcp = Deadline {
        tcp,
        until,
        io_timeout: options.io_timeout,
        whole: options.attempt_timeout,
    };
    let mut stream: Box<dyn Stream> = match (url.scheme, tls.as_ref()) {
        (Scheme::Https, Some(client)) => Box::new(client.connect(&url.host, tcp)?),
        _ => Box::new(tcp),
    };
    let (method, accept, body_headers, body): (_, _, _, &[u8]) = match request {
        Request::Get => ("GET", "application/json", String::new(), &[]),
        Request::Download => ("GET", "*/*", String::new(), &[]),
        Request::PostJson(body) => (
            "POST",
            "application/json",
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body,
        ),
    };
    let head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: nixos-kexec/{}\r\nAccept: {accept}\r\n{body_headers}Connection: close\r\n\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)?;
    Ok((head, reader))
}

/// A connection that gives up at `until`: each read and write waits at most `io_timeout` and
/// never past `until`, so a server that sends a byte now and then, each just in time, cannot
/// hold the installer for longer than one attempt may take.
struct Deadline {
    tcp: TcpStream,
    until: Instant,
    io_timeout: Duration,
    whole: Duration,
}

impl Deadline {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.too_late());
        }
        let wait = Some(left.min(self.io_timeout));
        self.tcp.set_read_timeout(wait)?;
        self.tcp.set_write_timeout(wait)
    }

    fn too_late(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the server took longer than {} s to answer", self.whole.as_secs()),
        )
    }

    /// A wait cut short by the deadline says so, rather than "temporarily unavailable".
    fn explain(&self, error: std::io::Error) -> std::io::Error {
        let timed_out = matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        if timed_out && Instant::now() >= self.until {
            self.too_late()
        } else {
            error
        }
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.tcp.read(buf).map_err(|e| self.explain(e))
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.tcp.write(buf).map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

fn read_line(reader: &mut dyn BufRead, budget: &mut usize) -> Result<String, Failure> {
    let mut line = Vec::new();
    let n = Read::take(&mut *reader, *budget as u64 + 1)
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

/// An answer's status line and headers.
struct Head {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The whole answer: this head and the body that follows it in `reader`.
    fn with_body_from(self, reader: &mut dyn BufRead) -> Result<Response, Failure> {
        let body = read_body_to_vec(reader, &self.headers)?;
        Ok(Response {
            status: self.status,
            reason: self.reason,
            headers: self.headers,
            body,
        })
    }
}

/// Parses a response from the server (exposed to the tests through [`parse_response`]).
fn read_response(mut reader: impl BufRead) -> Result<Response, Failure> {
    read_head(&mut reader)?.with_body_from(&mut reader)
}

fn read_head(reader: &mut dyn BufRead) -> Result<Head, Failure> {
    let mut budget = MAX_HEADER_BYTES;
    loop {
        let status_line = read_line(reader, &mut budget)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
            return Err(Failure::Transient(format!(
                "not an HTTP/1.x status line: {}",
                quote_start(&status_line)
            )));
        };
        let reason = parts.next().unwrap_or("").trim().to_string();
        let mut headers = Vec::new();
        loop {
            let line = read_line(reader, &mut budget)?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        // 1xx answers (100 Continue) precede the real one.
        if !(100..200).contains(&status) {
            return Ok(Head {
                status,
                reason,
                headers,
            });
        }
    }
}

/// A small body (runtime info, a cache's answer), whole, at most [`MAX_BODY`] bytes.
fn read_body_to_vec(reader: &mut dyn BufRead, headers: &[(String, String)]) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    read_body(reader, headers, &mut |bytes| {
        if body.len() + bytes.len() > MAX_BODY {
            return Err(too_big());
        }
        body.extend_from_slice(bytes);
        Ok(())
    })?;
    Ok(body)
}

/// Reads the body that `headers` describe (`Content-Length`, chunked, or up to the close) into
/// `sink`, piece by piece; returns its length. The sink's errors are the caller's, passed on.
fn read_body(
    reader: &mut dyn BufRead,
    headers: &[(String, String)],
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    let chunked =
        header(headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    // One buffer for the whole body, however many chunks it comes in.
    let mut buffer = vec![0u8; 64 << 10];
    if chunked {
        return read_chunked(reader, &mut buffer, sink);
    }
    if let Some(length) = header(headers, "content-length") {
        let length: u64 = length
            .parse()
            .map_err(|_| Failure::Transient(format!("bad Content-Length {}", quote_start(length))))?;
        let got = pump(&mut Read::take(reader, length), &mut buffer, sink)?;
        if got < length {
            return Err(Failure::Transient(format!(
                "the body ended early (expected {length} bytes, got {got})"
            )));
        }
        return Ok(got);
    }
    pump(reader, &mut buffer, sink)
}

/// Hands everything `reader` gives, up to its end, to `sink` in pieces of at most `buffer`'s
/// size; returns how much.
fn pump(
    reader: &mut dyn Read,
    buffer: &mut [u8],
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    let mut total = 0u64;
    loop {
        match reader.read(buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                sink(&buffer[..n])?;
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A TLS server that closes without close_notify: common, and like curl we take
            // what came as all there is; a caller that knows the length says it ended early,
            // and what reads a close-delimited body (the runtime-info parser, a download's
            // SHA-256) rejects a truncated one.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(Failure::Transient(format!("reading the body: {e}"))),
        }
    }
}

/// What the server sent, quoted for a message: at most its first characters, so a server
/// that answers with something else (binary data, a page without line breaks) cannot fill the
/// console, the result line and the report with it.
fn quote_start(text: &str) -> String {
    const SHOWN: usize = 40;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
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

fn read_chunked(
    reader: &mut dyn BufRead,
    buffer: &mut [u8],
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    let mut budget = MAX_HEADER_BYTES;
    let mut total = 0u64;
    loop {
        let line = read_line(reader, &mut budget)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| Failure::Transient(format!("bad chunk size {}", quote_start(&line))))?;
        if size == 0 {
            // Trailers, then the empty line; a server that just closes is fine too.
            while let Ok(line) = read_line(reader, &mut budget) {
                if line.is_empty() {
                    break;
                }
            }
            return Ok(total);
        }
        let got = pump(&mut Read::take(&mut *reader, size), buffer, sink)?;
        if got < size {
            return Err(Failure::Transient(format!(
                "a chunk ended early (expected {size} bytes, got {got})"
            )));
        }
        total += got;
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
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    #[test]
    fn urls() {
        let u = Url::parse("http://10.0.2.2:8080/hosts/52:54:00:12:34:56.json?x=1#frag").unwrap();
        assert_eq!(
            u,
            Url {
                scheme: Scheme::Http,
                host: "10.0.2.2".into(),
                port: 8080,
                path: "/hosts/52:54:00:12:34:56.json?x=1".into()
            }
        );
        assert_eq!(
            u.to_string(),
            "http://10.0.2.2:8080/hosts/52:54:00:12:34:56.json?<hidden>"
        );
        let v6 = Url::parse("HTTP://[2001:db8::1]/x").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.path.as_str()),
            ("2001:db8::1", 80, "/x")
        );
        assert_eq!(v6.host_header(), "[2001:db8::1]");
        assert_eq!(Url::parse("http://conf.example?m=1").unwrap().path, "/?m=1");
        assert_eq!(Url::parse("http://conf.example").unwrap().path, "/");
        let https = Url::parse("HTTPS://conf.example/x").unwrap();
        assert_eq!((https.scheme, https.port), (Scheme::Https, 443));
        assert_eq!(https.to_string(), "https://conf.example/x");
        assert_eq!(
            Url::parse("https://c:8443/").unwrap().to_string(),
            "https://c:8443/"
        );
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
        let secure = Url::parse("https://h/a").unwrap();
        assert_eq!(secure.join("/b").unwrap().to_string(), "https://h/b");
        let down = secure.join("http://h/b").unwrap_err();
        assert!(
            crate::error::one_line(&down).contains("down to plain HTTP"),
            "{down}"
        );
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
        let error = parse_response(b"SSH-2.0-OpenSSH\r\n\r\n")
            .unwrap_err()
            .to_string();
        assert_eq!(error, r#"not an HTTP/1.x status line: "SSH-2.0-OpenSSH""#);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        let cut = |answer: &[u8]| parse_response(answer).unwrap_err().to_string();
        assert_eq!(
            cut(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"),
            "the body ended early (expected 9 bytes, got 5)"
        );
        assert_eq!(
            cut(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
            "a chunk ended early (expected 5 bytes, got 2)"
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        let huge = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(parse_response(huge.as_bytes()).is_err());
    }

    #[test]
    fn garbage_is_quoted_only_as_far_as_it_helps() {
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 0x80) as u8 | 0x80).collect();
        let error = parse_response(&garbage).unwrap_err().to_string();
        assert!(error.starts_with("not an HTTP/1.x status line: \""), "{error}");
        assert!(error.ends_with("\"..."), "{error}");
        assert!(error.len() < 200, "{} bytes: {error}", error.len());
        let chunk = parse_response(
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}\r\n",
                "z".repeat(5000)
            )
            .as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(chunk, format!("bad chunk size {:?}...", "z".repeat(40)));
        // Multi-byte characters are cut between characters, not inside one.
        assert_eq!(quote_start(&"é".repeat(50)), format!("{:?}...", "é".repeat(40)));
    }

    /// A server on 127.0.0.1 answering each connection with the next canned response (the
    /// last one repeats), recording request heads (or why none came); it stops after `limit`
    /// connections. With `tls`, it speaks HTTPS and ends each answer with close_notify.
    pub(super) fn serve_with(
        responses: Vec<String>,
        limit: usize,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().take(limit).enumerate() {
                let Ok(tcp) = stream else { continue };
                let response = responses[i.min(responses.len() - 1)].as_bytes();
                match &tls {
                    None => answer(&mut { tcp }, response, &log),
                    Some(config) => {
                        let connection = rustls::ServerConnection::new(config.clone()).unwrap();
                        let mut stream = rustls::StreamOwned::new(connection, tcp);
                        answer(&mut stream, response, &log);
                        stream.conn.send_close_notify();
                        let _ = stream.flush();
                    }
                }
            }
        });
        (base, seen)
    }

    /// Logs the request head and its body (or why none came) before answering, so a client
    /// that has its answer finds its request logged.
    fn answer(stream: &mut impl Stream, response: &[u8], log: &Mutex<Vec<String>>) {
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            let why = match stream.read(&mut byte) {
                Ok(1) => {
                    head.push(byte[0]);
                    continue;
                }
                Ok(_) => "(closed before a request)".to_string(),
                Err(e) => format!("(no request: {e})"),
            };
            log.lock().unwrap().push(why);
            return;
        }
        let mut request = String::from_utf8_lossy(&head[..head.len() - 2]).into_owned();
        let length = request
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(str::to_string)
            })
            .map_or(0, |value| value.trim().parse().unwrap());
        let mut body = vec![0; length];
        if stream.read_exact(&mut body).is_ok() {
            request.push_str(&String::from_utf8_lossy(&body));
        }
        log.lock().unwrap().push(request);
        let _ = stream.write_all(response);
    }

    pub(crate) fn serve(responses: Vec<String>, limit: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        serve_with(responses, limit, None)
    }

    pub(crate) fn quick() -> Options {
        Options {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(10),
            attempts: 5,
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            trust: Vec::new(),
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"version\":1}";

    #[test]
    fn tokens_in_urls_are_not_shown() {
        assert_eq!(
            redact("https://me:s3cret@cfg.example/h/${mac}.json?token=abc#x"),
            "https://<hidden>@cfg.example/h/${mac}.json?<hidden>"
        );
        assert_eq!(
            redact("http://10.0.2.2:8080/a.json"),
            "http://10.0.2.2:8080/a.json"
        );
        let url = Url::parse("https://cfg.example/h.json?token=abc").unwrap();
        assert_eq!(url.to_string(), "https://cfg.example/h.json?<hidden>");
        assert_eq!(
            url.path, "/h.json?token=abc",
            "the request still carries the query"
        );
        let err = Url::parse("https://me:s3cret@cfg.example/x").unwrap_err();
        assert!(!crate::error::one_line(&err).contains("s3cret"), "{err}");
    }

    #[test]
    fn a_chunk_size_past_any_length_is_refused_not_a_panic() {
        for size in ["ffffffffffffffff", "fffffffffffffff0", "10000000000000000"] {
            let answer =
                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nx\r\n0\r\n\r\n");
            assert!(parse_response(answer.as_bytes()).is_err(), "{size}");
        }
    }

    #[test]
    fn a_server_dripping_bytes_cannot_hold_an_attempt_past_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
            // Each byte well inside io_timeout, the whole answer never.
            for _ in 0..1000 {
                std::thread::sleep(Duration::from_millis(100));
                if stream.write_all(b"x").is_err() {
                    return;
                }
            }
        });
        let options = Options {
            io_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_millis(1500),
            attempts: 1,
            ..quick()
        };
        let started = std::time::Instant::now();
        let err = get(&format!("{base}/slow.json"), &options, &mut |_| {}).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let text = crate::error::one_line(&err);
        assert!(text.contains("took longer than 1 s"), "{text}");
    }

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

    #[test]
    fn posts_json_and_retries_server_errors() {
        let (base, seen) = serve(vec![FAIL.into(), "HTTP/1.1 204 No Content\r\n\r\n".into()], 2);
        let url = Url::parse(&format!("{base}/report/52:54:00:12:34:56")).unwrap();
        let mut lines = Vec::new();
        post_json(&url, br#"{"event":"started"}"#, &quick(), &mut |l| {
            lines.push(l.to_string())
        })
        .unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with(&format!("POST {url}: attempt 1/5 failed: 500")));
        let requests = seen.lock().unwrap();
        assert_eq!(requests.len(), 2);
        for request in requests.iter() {
            assert!(
                request.starts_with("POST /report/52:54:00:12:34:56 HTTP/1.1\r\n"),
                "{request}"
            );
            assert!(
                request.contains("Content-Type: application/json\r\n"),
                "{request}"
            );
            assert!(request.contains("Content-Length: 19\r\n"), "{request}");
            assert!(request.ends_with("\r\n{\"event\":\"started\"}"), "{request}");
        }
    }

    #[test]
    fn a_post_is_not_redirected_and_a_client_error_is_final() {
        for (answer, status) in [
            (
                "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
                "302 Found",
            ),
            (
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                "404 Not Found",
            ),
        ] {
            let (base, seen) = serve(vec![answer.into()], 5);
            let url = Url::parse(&format!("{base}/report")).unwrap();
            let err = post_json(&url, b"{}", &quick(), &mut |_| {}).unwrap_err();
            let text = crate::error::one_line(&err);
            assert!(text.contains(&format!("answered {status}")), "{text}");
            assert_eq!(
                seen.lock().unwrap().len(),
                1,
                "{status} must not be retried or followed"
            );
        }
    }

    pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        out
    }

    /// A body larger than one read, so it is streamed in pieces (printable, as `serve` sends
    /// strings).
    fn big_body() -> Vec<u8> {
        (0..200_000u32).map(|i| (33 + i * 7 % 94) as u8).collect()
    }

    fn raw(head: &str, body: &[u8]) -> String {
        format!("{head}{}", String::from_utf8_lossy(body))
    }

    #[test]
    fn downloads_stream_to_a_file_with_their_digest() {
        let body = big_body();
        let chunked = {
            let mut b = Vec::new();
            for piece in body.chunks(70_001) {
                b.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                b.extend_from_slice(piece);
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"0\r\n\r\n");
            b
        };
        for (what, response) in [
            (
                "Content-Length",
                raw(
                    &format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
                    &body,
                ),
            ),
            (
                "chunked",
                raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", &chunked),
            ),
            ("until close", raw("HTTP/1.1 200 OK\r\n\r\n", &body)),
        ] {
            let (base, seen) = serve(vec![response], 1);
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("initrd");
            let url = Url::parse(&format!("{base}/bundle/initrd")).unwrap();
            let got = download(&url, &file, &quick(), &mut |_| {}).unwrap();
            assert_eq!(got.bytes, body.len() as u64, "{what}");
            assert_eq!(got.sha256, sha256(&body), "{what}");
            assert!(std::fs::read(&file).unwrap() == body, "{what}");
            let requests = seen.lock().unwrap();
            assert!(
                requests[0].starts_with("GET /bundle/initrd HTTP/1.1\r\n"),
                "{requests:?}"
            );
            assert!(requests[0].contains("Accept: */*"), "{requests:?}");
        }
    }

    #[test]
    fn downloads_follow_redirects_and_retry_from_the_start() {
        let body = big_body();
        let full = raw(
            &format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
            &body,
        );
        // Cut short: the connection closes after half the body.
        let cut = raw(
            &format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
            &body[..body.len() / 2],
        );
        let (base, seen) = serve(
            vec![
                "HTTP/1.1 302 Found\r\nLocation: /mirror/initrd\r\nContent-Length: 0\r\n\r\n".into(),
                cut,
                "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".into(),
                "HTTP/1.1 302 Found\r\nLocation: /mirror/initrd\r\nContent-Length: 0\r\n\r\n".into(),
                full,
            ],
            5,
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("initrd");
        let mut retries = Vec::new();
        let got = download(
            &Url::parse(&format!("{base}/initrd")).unwrap(),
            &file,
            &quick(),
            &mut |line| retries.push(line.to_string()),
        )
        .unwrap();
        assert_eq!(got.sha256, sha256(&body));
        assert!(
            std::fs::read(&file).unwrap() == body,
            "the retry did not start the file anew"
        );
        assert_eq!(retries.len(), 2, "{retries:?}");
        assert!(retries[0].contains("ended early"), "{retries:?}");
        assert!(retries[1].contains("503"), "{retries:?}");
        assert_eq!(seen.lock().unwrap().len(), 5);
    }

    #[test]
    fn a_download_answered_404_fails_at_once_and_names_the_url() {
        let (base, seen) = serve(
            vec!["HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here!".into()],
            5,
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("initrd");
        let error = download(
            &Url::parse(&format!("{base}/x/initrd")).unwrap(),
            &file,
            &quick(),
            &mut |_| {},
        )
        .unwrap_err();
        let text = crate::error::one_line(&error);
        assert!(text.contains("/x/initrd answered 404 Not Found"), "{text}");
        assert!(!file.exists(), "a 404 page was written as the file");
        assert_eq!(seen.lock().unwrap().len(), 1, "a 404 was retried");
    }
}

#[cfg(test)]
mod tls_tests {
    //! `https://` against an in-process rustls server with certificates made per test.
    use super::tests::serve_with;
    use super::*;
    use rustls::pki_types::PrivateKeyDer;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    struct TestPki {
        ca_pem: String,
        server: Arc<rustls::ServerConfig>,
    }

    /// A CA and a server certificate for `names`, valid now or long expired.
    fn pki(names: &[&str], expired: bool) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nixos-kexec test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
        TestPki {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        }
    }

    /// Options trusting only the PEM files written into `dir/ca/` (the bundle path is absent).
    fn trusting(dir: &Path, cas: &[&str]) -> Options {
        let ca_dir = dir.join("ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        for (i, pem) in cas.iter().enumerate() {
            std::fs::write(ca_dir.join(format!("ca{i}.pem")), pem).unwrap();
        }
        Options {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(10),
            attempts: 3,
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            trust: vec![dir.join("absent-bundle.crt"), ca_dir],
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"version\":1}";

    fn final_error(base: &str, options: &Options, seen: &Mutex<Vec<String>>) -> String {
        let err = get(&format!("{base}/x.json"), options, &mut |_| {}).unwrap_err();
        assert!(crate::error::as_user_error(&err).is_some(), "{err:#}");
        // The server notices the rejection after the client has given up.
        for _ in 0..100 {
            if !seen.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "a TLS rejection must not be retried"
        );
        crate::error::one_line(&err)
    }

    #[test]
    fn fetches_over_https_trusting_a_ca_from_the_extra_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&["127.0.0.1"], false);
        let close_delimited = "HTTP/1.0 200 OK\r\n\r\n{\"version\":1}".to_string();
        let (base, seen) = serve_with(vec![OK.into(), close_delimited], 2, Some(ours.server.clone()));
        let options = trusting(dir.path(), &[&pki(&["x"], false).ca_pem, &ours.ca_pem]);
        for _ in 0..2 {
            let body = get(&format!("{base}/52:54:00:12:34:56.json"), &options, &mut |_| {}).unwrap();
            assert_eq!(body, b"{\"version\":1}");
        }
        let heads = seen.lock().unwrap();
        assert!(
            heads[0].starts_with("GET /52:54:00:12:34:56.json HTTP/1.1\r\n"),
            "{heads:?}"
        );
        assert!(heads[0].contains(&format!("Host: {}\r\n", base.trim_start_matches("https://"))));
    }

    #[test]
    fn a_server_from_another_ca_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (base, seen) = serve_with(vec![OK.into()], 5, Some(pki(&["127.0.0.1"], false).server));
        let text = final_error(&base, &trusting(dir.path(), &[&pki(&["x"], false).ca_pem]), &seen);
        assert!(
            text.contains("not signed by a CA this installer trusts"),
            "{text}"
        );
        assert!(
            text.contains("(1 from ") && text.contains("ca0.pem)"),
            "names what it trusts: {text}"
        );
        assert!(text.contains(crate::input::tls::EXTRA_DIR), "{text}");
    }

    #[test]
    fn an_expired_certificate_names_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&["127.0.0.1"], true);
        let (base, seen) = serve_with(vec![OK.into()], 5, Some(ours.server.clone()));
        let text = final_error(&base, &trusting(dir.path(), &[&ours.ca_pem]), &seen);
        assert!(text.contains("expired by this machine's clock"), "{text}");
        assert!(text.contains("hardware clock"), "{text}");
    }

    #[test]
    fn a_certificate_for_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&["config.example"], false);
        let (base, seen) = serve_with(vec![OK.into()], 5, Some(ours.server.clone()));
        let text = final_error(&base, &trusting(dir.path(), &[&ours.ca_pem]), &seen);
        assert!(text.contains("is not issued for 127.0.0.1"), "{text}");
    }

    #[test]
    fn https_to_a_plain_http_port_is_a_final_tls_error() {
        let dir = tempfile::tempdir().unwrap();
        // Like nginx on a plain port: a 400 for the bytes of a ClientHello, then close.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().take(5).flatten() {
                log.lock().unwrap().push(String::new());
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let text = final_error(&base, &trusting(dir.path(), &[&pki(&["x"], false).ca_pem]), &seen);
        assert!(text.contains("TLS handshake with 127.0.0.1 failed"), "{text}");
    }

    #[test]
    fn without_ca_certificates_nothing_is_contacted() {
        let dir = tempfile::tempdir().unwrap();
        let (base, seen) = serve_with(vec![OK.into()], 5, Some(pki(&["127.0.0.1"], false).server));
        let options = Options {
            trust: vec![dir.path().join("none.crt")],
            ..trusting(dir.path(), &[])
        };
        let err = get(&format!("{base}/x"), &options, &mut |_| {}).unwrap_err();
        assert!(
            crate::error::one_line(&err).contains("no CA certificates"),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(seen.lock().unwrap().is_empty());
    }
}
