//! TLS for the tests' servers, with tools we did not write: a CA that openssl makes for one
//! test, server certificates it signs, and socat ending TLS in front of a plain-HTTP loopback
//! server ([`crate::http_server`]).

use crate::tool;
use anyhow::{ensure, Context, Result};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA for one test, in a directory of its own.
pub struct TestCa {
    dir: tempfile::TempDir,
    key: PathBuf,
    pem: PathBuf,
}

/// A server's certificate and key, signed by a [`TestCa`], as PEM files.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const EC_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `openssl` with `args`, the words of `with_key` (a new key) in front of them.
fn openssl(with_key: bool, args: &[String]) -> Result<()> {
    let mut words: Vec<String> = args[..1].to_vec();
    if with_key {
        words.extend(EC_KEY.map(String::from));
    }
    words.extend_from_slice(&args[1..]);
    tool("openssl", words).map(drop)
}

impl TestCa {
    pub fn new() -> Result<TestCa> {
        let dir = tempfile::tempdir()?;
        let (key, pem) = (dir.path().join("ca.key"), dir.path().join("ca.pem"));
        let words = ["req", "-x509", "-keyout", &text(&key), "-out", &text(&pem)];
        let more = ["-days", "2", "-subj", "/CN=nixos-kexec test CA"];
        openssl(
            true,
            &words
                .iter()
                .chain(&more)
                .map(|w| w.to_string())
                .collect::<Vec<_>>(),
        )?;
        Ok(TestCa { dir, key, pem })
    }

    /// The CA's certificate, as clients are told to trust it.
    pub fn pem_path(&self) -> &Path {
        &self.pem
    }

    pub fn pem(&self) -> Result<String> {
        std::fs::read_to_string(&self.pem).context("reading the test CA's certificate")
    }

    /// A certificate for a server called `name` (its subject), valid for `subject_alt_names`
    /// (`IP:10.0.2.2`, `DNS:git.example`).
    pub fn server_cert(&self, name: &str, subject_alt_names: &[&str]) -> Result<ServerCert> {
        let file = |ext: &str| self.dir.path().join(format!("{name}.{ext}"));
        let (key, csr, cert, ext) = (file("key"), file("csr"), file("pem"), file("ext"));
        let request = [
            "req",
            "-keyout",
            &text(&key),
            "-out",
            &text(&csr),
            "-subj",
            &format!("/CN={name}"),
        ];
        openssl(true, &request.map(String::from))?;
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                subject_alt_names.join(",")
            ),
        )?;
        let sign = [
            "x509",
            "-req",
            "-in",
            &text(&csr),
            "-CA",
            &text(&self.pem),
            "-CAkey",
            &text(&self.key),
            "-CAcreateserial",
            "-out",
            &text(&cert),
            "-days",
            "2",
            "-extfile",
            &text(&ext),
        ];
        openssl(false, &sign.map(String::from))?;
        Ok(ServerCert { cert, key })
    }
}

/// A free port on 127.0.0.1 for a server that binds it itself.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something listens on `port` of 127.0.0.1; `what` names it in the error.
pub fn wait_for_listener(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// socat on 127.0.0.1 ending TLS with a [`ServerCert`] and passing the plain bytes on to a
/// loopback server; a process per connection. Stops when dropped.
pub struct TlsFront {
    child: Child,
    port: u16,
}

impl TlsFront {
    pub fn start(cert: &ServerCert, backend_port: u16) -> Result<TlsFront> {
        let port = free_port()?;
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                cert.cert.display(),
                cert.key.display()
            ))
            .arg(format!("TCP:127.0.0.1:{backend_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting socat (apt-get install socat, or tests/setup-host)")?;
        let front = TlsFront { child, port };
        wait_for_listener(port, "socat's TLS listener")?;
        Ok(front)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
