//! HTTP/1.1 servers on the host's loopback, which a guest with QEMU's user networking reaches
//! as 10.0.2.2: the core that the config server ([`crate::ConfigServer`]) and the static file
//! server for binary caches ([`FileServer`]) share. Each connection gets a thread that answers
//! its requests in turn (keep-alive) until the client or the answer closes it; every request
//! is recorded, and dropping the server closes every connection and joins every thread.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One request as the server read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target, percent-decoded, query included.
    pub path: String,
    /// Whether the client lets the connection stay open after the answer (HTTP/1.1 without
    /// `Connection: close`).
    pub keep_alive: bool,
    /// The header lines as sent, names as the client wrote them.
    pub headers: Vec<(String, String)>,
    /// What came after the head, by its Content-Length.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        nixos_kexec::input::http::header(&self.headers, name)
    }
}

/// What the connection does after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAnswer {
    /// Read the next request from it.
    KeepOpen,
    Close,
}

/// Answers a request on the stream: given the request and how many requests for the same
/// path came before it.
pub type Handler = dyn Fn(&HttpRequest, usize, &mut TcpStream) -> Result<AfterAnswer> + Send + Sync;

/// How long a kept-alive connection may sit idle before the server closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The open connections: a handle to shut each down, and its thread.
type Connections = Mutex<Vec<(TcpStream, JoinHandle<()>)>>;

/// A server on 127.0.0.1 with a random port, serving until dropped.
pub struct LoopbackServer {
    port: u16,
    requests: Arc<Mutex<Vec<HttpRequest>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    connections: Arc<Connections>,
}

impl LoopbackServer {
    /// Serves with `handler` until dropped, or until `max_requests` requests were read (then
    /// it takes no new connections: a forgotten server cannot serve a later test). `name`
    /// prefixes its log lines.
    pub fn start(name: &'static str, handler: Arc<Handler>, max_requests: usize) -> Result<LoopbackServer> {
        let listener = TcpListener::bind("127.0.0.1:0").with_context(|| format!("binding the {name}"))?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("making the {name}'s listener non-blocking"))?;
        let port = listener.local_addr().context("the listener's address")?.port();
        let shared = Shared {
            name,
            handler,
            max_requests,
            requests: Arc::new(Mutex::new(Vec::new())),
            counted: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let requests = shared.requests.clone();
        let stop = shared.stop.clone();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept_thread = {
            let connections = connections.clone();
            std::thread::spawn(move || accept_loop(listener, shared, &connections))
        };
        Ok(LoopbackServer {
            port,
            requests,
            stop,
            accept_thread: Some(accept_thread),
            connections,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server as a guest with user networking sees it.
    pub fn guest_url(&self) -> String {
        format!("http://10.0.2.2:{}", self.port)
    }

    /// The server as the host sees it.
    pub fn host_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The requests so far, in the order they were read.
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        let connections = self
            .connections
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        for (stream, thread) in connections {
            // Wakes a thread blocked reading the next request or writing a long answer.
            let _ = stream.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }
}

/// What every connection thread needs.
#[derive(Clone)]
struct Shared {
    name: &'static str,
    handler: Arc<Handler>,
    max_requests: usize,
    requests: Arc<Mutex<Vec<HttpRequest>>>,
    counted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

fn accept_loop(listener: TcpListener, shared: Shared, connections: &Connections) {
    // A hard limit besides the drop, so a forgotten server cannot outlive a stuck test for long.
    let deadline = Instant::now() + Duration::from_secs(900);
    while !shared.stop.load(Ordering::SeqCst)
        && shared.counted.load(Ordering::SeqCst) < shared.max_requests
        && Instant::now() < deadline
    {
        match listener.accept() {
            Ok((stream, _)) => {
                let spawned = stream.try_clone().map(|clone| {
                    let shared = shared.clone();
                    let thread = std::thread::spawn(move || {
                        if let Err(e) = serve_connection(stream, &shared) {
                            eprintln!("{}: {e:#}", shared.name);
                        }
                    });
                    (clone, thread)
                });
                match (spawned, connections.lock()) {
                    (Ok(entry), Ok(mut list)) => {
                        list.retain(|(_, thread)| !thread.is_finished());
                        list.push(entry);
                    }
                    (Err(e), _) => eprintln!("{}: cloning a connection: {e}", shared.name),
                    (Ok(_), Err(_)) => return,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                eprintln!("{}: accept: {e}", shared.name);
                return;
            }
        }
    }
}

/// Answers the requests of one connection until either side closes it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> Result<()> {
    let closer = stream.try_clone().context("cloning the connection")?;
    let result = answer_requests(stream, shared);
    // The handle the server keeps for its drop holds the socket open: the client sees the end
    // of an answer without Content-Length (or a cut one) only by this.
    let _ = closer.shutdown(Shutdown::Write);
    result
}

fn answer_requests(stream: TcpStream, shared: &Shared) -> Result<()> {
    stream
        .set_nonblocking(false)
        .context("making a connection blocking")?;
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .context("setting the read timeout")?;
    let mut reader = BufReader::new(stream.try_clone().context("cloning the connection")?);
    let mut writer = stream;
    while !shared.stop.load(Ordering::SeqCst) {
        let Some(request) = read_request(&mut reader)? else {
            return Ok(());
        };
        shared.counted.fetch_add(1, Ordering::SeqCst);
        let seen_before = {
            let mut log = shared
                .requests
                .lock()
                .map_err(|_| anyhow::anyhow!("the request log is poisoned"))?;
            let n = log.iter().filter(|r| r.path == request.path).count();
            log.push(request.clone());
            n
        };
        eprintln!("{}: {} {}", shared.name, request.method, request.path);
        let after = (shared.handler)(&request, seen_before, &mut writer)
            .with_context(|| format!("answering {} {}", request.method, request.path))?;
        writer.flush().context("flushing the answer")?;
        if after == AfterAnswer::Close || !request.keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads a request head and a body with Content-Length; `None` when the client closed the
/// connection before a new request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<HttpRequest>> {
    let mut request_line = String::new();
    match reader.read_line(&mut request_line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        // Idle past the timeout, or shut down by the server's drop.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).context("reading a request line"),
    }
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = percent_decode(words.next().unwrap_or(""));
    let version = words.next().unwrap_or("");
    let mut keep_alive = version == "HTTP/1.1";
    let mut body_length = 0u64;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading a request header")? == 0 || line.trim().is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("content-length") {
            body_length = value.parse().unwrap_or(0);
        }
        headers.push((name.to_string(), value.to_string()));
    }
    let mut body = Vec::new();
    reader
        .by_ref()
        .take(body_length)
        .read_to_end(&mut body)
        .context("reading a request body")?;
    Ok(Some(HttpRequest {
        method,
        path,
        keep_alive,
        headers,
        body,
    }))
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reason phrase for the statuses these servers send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Whatever",
    }
}

/// Serves the files under a directory, e.g. a `file://` binary cache as an `http://` one: GET
/// and HEAD, with Content-Length, the file streamed from disk; 404 for what is not a regular
/// file inside the directory. Stops when dropped.
pub struct FileServer {
    server: LoopbackServer,
}

impl FileServer {
    pub fn start(root: &Path) -> Result<FileServer> {
        let root = root
            .canonicalize()
            .with_context(|| format!("the directory to serve, {}", root.display()))?;
        let handler =
            move |request: &HttpRequest, _: usize, stream: &mut TcpStream| serve_file(&root, request, stream);
        Ok(FileServer {
            server: LoopbackServer::start("file server", Arc::new(handler), usize::MAX)?,
        })
    }

    /// The server as a guest with user networking sees it.
    pub fn guest_url(&self) -> String {
        self.server.guest_url()
    }

    /// The server as the host sees it.
    pub fn host_url(&self) -> String {
        self.server.host_url()
    }

    /// The requests so far, in the order they were read.
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.server.requests()
    }
}

/// The file under `root` that a request path names, if it is one: no `..`, no query.
fn file_for(root: &Path, request_path: &str) -> Option<PathBuf> {
    let path = request_path.split('?').next().unwrap_or("");
    let relative = Path::new(path.strip_prefix('/')?);
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let file = root.join(relative);
    file.is_file().then_some(file)
}

fn serve_file(root: &Path, request: &HttpRequest, stream: &mut TcpStream) -> Result<AfterAnswer> {
    let connection = if request.keep_alive { "keep-alive" } else { "close" };
    let head = |status: u16, length: u64| {
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Length: {length}\r\nConnection: {connection}\r\n\r\n",
            reason_phrase(status)
        )
    };
    if request.method != "GET" && request.method != "HEAD" {
        stream.write_all(head(405, 0).as_bytes()).context("sending 405")?;
        return Ok(AfterAnswer::Close);
    }
    let Some(path) = file_for(root, &request.path) else {
        let body = "not found\n";
        stream
            .write_all(head(404, body.len() as u64).as_bytes())
            .context("sending 404")?;
        if request.method == "GET" {
            stream.write_all(body.as_bytes()).context("sending 404")?;
        }
        return Ok(AfterAnswer::KeepOpen);
    };
    let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let length = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    stream
        .write_all(head(200, length).as_bytes())
        .context("sending a header")?;
    if request.method == "GET" {
        // std::io::copy from a file to a socket is sendfile(2): nothing is held in memory.
        let sent = std::io::copy(&mut file, stream).with_context(|| format!("sending {}", path.display()))?;
        if sent != length {
            bail!(
                "{} changed size while it was sent ({sent} of {length} bytes)",
                path.display()
            );
        }
    }
    Ok(AfterAnswer::KeepOpen)
}
