//! A server for `nixos_kexec.config_url` on the host's loopback, which a guest with QEMU's user
//! networking reaches as 10.0.2.2.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// Per request path, the `(status, body)` answers a [`ConfigServer`] gives in turn.
pub type Routes = Vec<(String, Vec<(u16, String)>)>;

/// What to send for a request: given its path and how many requests for that path came
/// before, the raw bytes of the whole answer.
type Answer = Box<dyn Fn(&str, usize) -> Vec<u8> + Send>;

/// A config server on 127.0.0.1. It answers at most `max_requests` requests, one a connection
/// (closed after the answer), keeps their paths and stops when dropped.
pub struct ConfigServer {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
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
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                500 => "Internal Server Error",
                _ => "Whatever",
            };
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        Self::serve(Box::new(answer), max_requests)
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
        Self::serve(Box::new(answer), max_requests)
    }

    fn serve(answer: Answer, max_requests: usize) -> Result<ConfigServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the config server")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = requests.clone();
            let stop = stop.clone();
            std::thread::spawn(move || serve(listener, answer, max_requests, &requests, &stop))
        };
        Ok(ConfigServer {
            port,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// The server as the guest sees it.
    pub fn guest_url(&self) -> String {
        format!("http://10.0.2.2:{}", self.port)
    }

    /// Request paths so far (percent-decoded).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for ConfigServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    listener: TcpListener,
    answer: Answer,
    max_requests: usize,
    requests: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) {
    // A hard limit besides the drop, so a forgotten server cannot outlive a stuck test for long.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut served = 0;
    while served < max_requests && !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                served += 1;
                if let Err(e) = answer_one(stream, &answer, requests) {
                    eprintln!("config server: {e:#}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                eprintln!("config server: accept: {e}");
                return;
            }
        }
    }
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

/// Reads the request up to its empty line, then sends the answer; the connection closes when
/// `stream` is dropped.
fn answer_one(stream: TcpStream, answer: &Answer, requests: &Mutex<Vec<String>>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let path = percent_decode(request_line.split_whitespace().nth(1).unwrap_or(""));
    let seen_before = {
        let mut log = requests.lock().map_err(|_| anyhow!("poisoned"))?;
        let n = log.iter().filter(|p| **p == path).count();
        log.push(path.clone());
        n
    };
    eprintln!("config server: GET {path}");
    let mut stream = stream;
    stream.write_all(&answer(&path, seen_before))?;
    Ok(())
}
