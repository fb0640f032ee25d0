//! TLS for `https://` config URLs: rustls with ring, trusting CA certificates from files.
//!
//! Trust comes from the bundle, not from the binary, so it can be updated and extended
//! without rebuilding the agent: the Nix bundle carries Mozilla's set at
//! [`SYSTEM_BUNDLE`], and an operator with a private CA appends an initrd that adds PEM files
//! under [`EXTRA_DIR`]. An appended file at the bundle path would replace the public set;
//! a file in the extra directory adds to it.

use crate::error::user_error;
use anyhow::Result;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const EXTRA_DIR: &str = "/etc/nixos-kexec/ca";

/// Where CA certificates are looked for, in this order: files, or directories whose `*.pem`
/// and `*.crt` files are read. Missing ones are skipped.
pub fn default_trust_sources() -> Vec<PathBuf> {
    vec![PathBuf::from(SYSTEM_BUNDLE), PathBuf::from(EXTRA_DIR)]
}

pub type TlsStream<S> = StreamOwned<ClientConnection, S>;

/// How one attempt went wrong: worth another try, or not. The handshake tells a network error
/// from a rejected certificate; the HTTP client above sorts everything after it the same way.
#[derive(Debug)]
pub(crate) enum Failure {
    Transient(String),
    Final(anyhow::Error),
}

/// A client configuration and what it trusts (for error messages).
pub struct Client {
    config: Arc<ClientConfig>,
    trusted: String,
}

fn no_trust(sources: &[PathBuf]) -> anyhow::Error {
    let names: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
    user_error(
        format!(
            "The config URL uses HTTPS, but this installer has no CA certificates to check the server with (looked in {}).",
            names.join(" and ")
        ),
        format!(
            "use a bundle built with CA certificates (the Nix bundle has them), append an initrd with your CA as a PEM file under {EXTRA_DIR}/, or use http:// on a network you trust."
        ),
    )
}

fn pem_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        user_error(
            format!("Cannot read the CA directory {}: {e}.", dir.display()),
            format!("make {} a directory of PEM files.", dir.display()),
        )
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == "pem" || ext == "crt"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every certificate from `sources` into a root store.
pub fn load_client(sources: &[PathBuf]) -> Result<Client> {
    let mut roots = RootCertStore::empty();
    let mut used = Vec::new();
    for source in sources {
        let files = if source.is_dir() {
            pem_files_in(source)?
        } else if source.exists() {
            vec![source.clone()]
        } else {
            continue;
        };
        for file in files {
            let pem = std::fs::read(&file).map_err(|e| {
                user_error(
                    format!("Cannot read the CA certificates in {}: {e}.", file.display()),
                    "make the file readable, or remove it from the bundle.",
                )
            })?;
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    user_error(
                        format!("{} is not a PEM certificate file: {e}.", file.display()),
                        "write CA certificates as PEM (-----BEGIN CERTIFICATE----- blocks).",
                    )
                })?;
            let (added, _unusable) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(user_error(
                    format!("{} holds no usable CA certificate.", file.display()),
                    "write CA certificates as PEM (-----BEGIN CERTIFICATE----- blocks), or remove the file.",
                ));
            }
            used.push(format!("{added} from {}", file.display()));
        }
    }
    if roots.is_empty() {
        return Err(no_trust(sources));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("setting up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Client {
        config: Arc::new(config),
        trusted: used.join(", "),
    })
}

impl Client {
    /// Completes the handshake with `host` over `tcp`, so that certificate problems surface
    /// here, classified, rather than as a read error later: a network error is worth another
    /// try, a certificate or TLS protocol problem is not.
    pub(crate) fn connect<S: Read + Write>(&self, host: &str, mut tcp: S) -> Result<TlsStream<S>, Failure> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            Failure::Final(user_error(
                format!("{host:?} cannot be checked against a certificate (not a DNS name or IP address)."),
                "use the host name or address the server's certificate names.",
            ))
        })?;
        let mut connection = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| Failure::Final(anyhow::anyhow!("starting TLS with {host}: {e}")))?;
        while connection.is_handshaking() {
            if let Err(e) = connection.complete_io(&mut tcp) {
                let tls_error = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>());
                return Err(match tls_error {
                    Some(tls_error) => Failure::Final(self.describe(host, tls_error)),
                    None => Failure::Transient(format!("TLS handshake: {e}")),
                });
            }
        }
        Ok(StreamOwned::new(connection, tcp))
    }

    fn describe(&self, host: &str, error: &rustls::Error) -> anyhow::Error {
        let clock = |state: &str| {
            user_error(
                format!(
                    "The certificate of {host} is {state} by this machine's clock ({} UTC).",
                    utc_text(SystemTime::now())
                ),
                "if the clock is wrong, set the hardware clock in the firmware setup and boot again; otherwise renew the server's certificate.",
            )
        };
        match error {
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => user_error(
                    format!(
                        "The certificate of {host} is not signed by a CA this installer trusts ({}).",
                        self.trusted
                    ),
                    format!(
                        "append an initrd with your CA as a PEM file under {EXTRA_DIR}/ (see the README), or give the server a certificate from a public CA."
                    ),
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => clock("expired"),
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    clock("not valid yet")
                }
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    user_error(
                        format!("The certificate of {host} is not issued for {host}."),
                        "write the host in nixos_kexec.config_url as the certificate names it, or reissue the certificate for it.",
                    )
                }
                other => user_error(
                    format!("The certificate of {host} was rejected: {other:?}."),
                    "give the server a valid certificate chain for this host.",
                ),
            },
            other => user_error(
                format!("The TLS handshake with {host} failed: {other}."),
                "check that the URL's port serves HTTPS (TLS 1.2 or 1.3), or use http:// if it serves plain HTTP.",
            ),
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, for telling an operator what the machine thinks the time is.
pub fn utc_text(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_text_matches_known_dates() {
        let at = |s: u64| utc_text(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_795_219_200 + 3_723), "2026-11-21 01:02:03");
        assert_eq!(at(4_107_542_399), "2100-02-28 23:59:59");
    }

    #[test]
    fn no_certificates_anywhere_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let sources = vec![dir.path().join("missing.crt"), dir.path().join("missing-dir")];
        let err = load_client(&sources).err().expect("no trust");
        let user = crate::error::as_user_error(&err).expect("a user error");
        assert!(user.problem.contains("no CA certificates"), "{user}");
        assert!(user.fix.contains(EXTRA_DIR), "{user}");
    }

    #[test]
    fn a_file_without_certificates_in_the_ca_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.pem"), "not a certificate\n").unwrap();
        std::fs::write(dir.path().join("README"), "ignored: not .pem or .crt\n").unwrap();
        let err = load_client(&[dir.path().to_path_buf()]).err().expect("refused");
        assert!(crate::error::one_line(&err).contains("mine.pem"), "{err}");
    }
}
