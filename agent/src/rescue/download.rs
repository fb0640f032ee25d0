//! `deploy --bundle-url`: the rescue system fetches the bundle's files from a web server (a
//! CI artifact, a release) instead of receiving them over the operator's uplink. Each file must
//! have the SHA-256 of the same file in the operator's local bundle, so what the installer
//! boots is what the operator built, whoever serves it.

use crate::console;
use crate::error::user_error;
use crate::input::http::{self, Url};
use anyhow::{Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A SHA-256 digest, written as 64 hex digits as `sha256sum` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn parse(text: &str) -> Result<Sha256> {
        let text = text.trim();
        let bad = || {
            user_error(
                format!("{text:?} is not a SHA-256 (64 hex digits)."),
                "give the digest as sha256sum prints it.",
            )
        };
        // Checked here, not left to from_str_radix, which also takes a sign ("+f").
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Sha256(digest))
    }

    /// The digest of the file at `path`, read in pieces (a bundle's initrd is hundreds of MiB).
    pub fn of_file(path: &Path) -> Result<Sha256> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buffer)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            digest.update(&buffer[..n]);
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.finish().as_ref());
        Ok(Sha256(bytes))
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A download's file until it is known good: removed when dropped before [`Partial::keep`].
struct Partial {
    path: PathBuf,
    kept: bool,
}

impl Partial {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How long one attempt at a bundle file may take in all: an initrd of a few hundred MiB over a
/// slow link. A server that stalls is caught by the per-read timeout long before.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Fetches `url` to `dest` and keeps it only when its SHA-256 is `expected`; prints one line
/// per retry and one for the result.
pub fn fetch_checked(url: &Url, expected: Sha256, dest: &Path) -> Result<()> {
    let options = http::Options {
        io_timeout: Duration::from_secs(60),
        attempt_timeout: ATTEMPT_TIMEOUT,
        ..http::Options::default()
    };
    let started = Instant::now();
    let partial = Partial {
        path: dest.to_path_buf(),
        kept: false,
    };
    let downloaded = http::download(url, dest, &options, &mut |line| console::line(line)).map_err(|e| {
        match e.downcast::<http::Unreachable>() {
            Ok(unreachable) => user_error(
                unreachable.to_string(),
                "check that the bundle's web server is up and reachable from the rescue system, or drop --bundle-url to copy the bundle over SSH.",
            ),
            Err(e) => e,
        }
    })?;
    let got = Sha256(downloaded.sha256);
    if got != expected {
        return Err(user_error(
            format!(
                "{url} ({} bytes) has SHA-256 {got}, not {expected}, the SHA-256 of the same file in your --bundle.",
                downloaded.bytes
            ),
            "publish the bundle you pass as --bundle at --bundle-url (or pass the bundle the URL serves).",
        ));
    }
    partial.keep();
    console::line(&format!(
        "fetched {url}: {:.1} MiB in {:.1}s, SHA-256 {got} as expected",
        downloaded.bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The hidden `nixos-kexec fetch` on the rescue system: the URL comes on stdin (one line), so
/// a token in it shows in no process list or command log.
pub fn fetch_from_stdin(expected: Sha256, dest: &Path) -> Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .read_line(&mut text)
        .context("reading the URL from stdin")?;
    let url = Url::parse(text.trim())?;
    fetch_checked(&url, expected, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_print_and_parse_as_sha256sum_does() {
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("empty");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(Sha256::of_file(&file).unwrap().to_string(), empty);
        assert_eq!(Sha256::parse(empty).unwrap().to_string(), empty);
        assert_eq!(Sha256::parse(&empty.to_uppercase()).unwrap().to_string(), empty);
        for bad in [
            "",
            "abc",
            &empty[1..],
            &format!("{empty}0"),
            &format!("{}zz", &empty[2..]),
            &format!("{}+f", &empty[2..]),
            &"é".repeat(32),
        ] {
            assert!(Sha256::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_file_with_another_digest_is_refused_and_removed() {
        let body = "not the initrd you built";
        let (base, _) = crate::input::http::tests::serve(
            vec![format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )],
            2,
        );
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("initrd");
        let url = Url::parse(&format!("{base}/initrd")).unwrap();
        let expected = Sha256([7; 32]);
        let error = fetch_checked(&url, expected, &dest).unwrap_err();
        let text = crate::error::one_line(&error);
        assert!(
            text.contains(&format!("/initrd ({} bytes) has SHA-256", body.len())),
            "{text}"
        );
        assert!(text.contains(&format!("not {expected}")), "{text}");
        assert!(!dest.exists(), "the wrong file was kept");

        let good = Sha256(crate::input::http::tests::sha256(body.as_bytes()));
        let (base, _) = crate::input::http::tests::serve(
            vec![format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )],
            1,
        );
        fetch_checked(&Url::parse(&format!("{base}/initrd")).unwrap(), good, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), body);
    }
}
