//! SSH host keys for the installed system, generated here so the operator can pin the
//! fingerprint before the first boot.

use super::Execution;
use crate::error::user_error;
use crate::installer::plan::Plan;
use crate::secret::Secret;
use anyhow::{anyhow, Context, Result};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let dir = execution
        .target_path(&plan.state_path("etc/ssh"))
        .context("the target root is not mounted")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fingerprints = if plan.provided_host_keys.is_empty() {
        vec![generate_ed25519(&dir, &format!("root@{}", plan.hostname))?]
    } else {
        install_provided(&plan.provided_host_keys, &dir)?
    };
    for fingerprint in fingerprints {
        crate::console::line(&format!("host key: {fingerprint}"));
        execution.host_key_fingerprints.push(fingerprint);
    }
    if let Some(id) = &plan.machine_id {
        // With / in RAM, systemd would make a new machine-id at every boot (and journald lose
        // the history); the persistent one is linked to /etc by the generated persist.nix.
        let path = execution
            .target_path(&plan.state_path("etc/machine-id"))
            .context("the target root is not mounted")?;
        write_file(&path, format!("{id}\n").as_bytes(), 0o444)?;
    }
    if let Some(initrd) = &plan.initrd_ssh {
        // Its own key: it ends up in the initrd on the unencrypted /boot, where the system's
        // host key must never be.
        let path = execution
            .target_path(&initrd.host_key)
            .context("the target root is not mounted")?;
        let dir = path
            .parent()
            .context("initrd host key path without a directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
        let fingerprint = generate_ed25519(dir, &format!("initrd@{}", plan.hostname))?;
        crate::console::line(&format!(
            "initrd host key (port {}, for unlocking the disk): {fingerprint}",
            initrd.port
        ));
        execution
            .host_key_fingerprints
            .push(format!("initrd: {fingerprint}"));
    }
    Ok(())
}

/// How to hand over a host key the installer takes, for the errors that refuse one.
const PROVIDED_KEY_FIX: &str = "hand over host keys as ssh-keygen writes them (unencrypted OpenSSH private keys named ssh_host_<type>_key, e.g. with nixos-kexec run --host-keys DIR), or leave them out and the installer makes a new ed25519 key.";

/// Installs the operator's own host keys (from the secrets archive) so secrets encrypted to
/// the host key (sops-nix, agenix) work at first boot; then wipes them from RAM.
pub fn install_provided(private_keys: &[String], dir: &Path) -> Result<Vec<String>> {
    let mut fingerprints = Vec::new();
    for source in private_keys {
        let source = Path::new(source);
        let name = source.file_name().context("host key path without a file name")?;
        let (data, key) = read_provided(source)?;
        write_key(dir, &name.to_string_lossy(), data.as_bytes(), &key)?;
        fingerprints.push(fingerprint_line(&key));
        wipe_file(source);
    }
    Ok(fingerprints)
}

/// Reads and parses the operator's host keys as the keys step will, so a bad one is refused
/// while planning, before the disk is wiped. The files stay for the keys step; what they hold
/// is never printed.
pub fn check_provided(private_keys: &[String]) -> Result<()> {
    for source in private_keys {
        read_provided(Path::new(source))?;
    }
    Ok(())
}

/// The fingerprint line of a provided host key, read as the keys step reads it.
pub fn provided_fingerprint(source: &Path) -> Result<String> {
    read_provided(source).map(|(_, key)| fingerprint_line(&key))
}

/// A provided host key file: its bytes (kept from swap, overwritten when dropped) and the key.
fn read_provided(source: &Path) -> Result<(Secret, PrivateKey)> {
    let data = Secret::read(source)?;
    let key = parse_host_key(source, data.as_bytes(), PROVIDED_KEY_FIX)?;
    Ok((data, key))
}

/// A host private key as sshd can load it: OpenSSH's format, unencrypted. `path` names it in
/// the error, `fix` says where a good one comes from; the error never quotes the key.
pub fn parse_host_key(path: &Path, data: &[u8], fix: &str) -> Result<PrivateKey> {
    let parsed = PrivateKey::from_openssh(data).or_else(|e| {
        ecdsa_with_full_length_scalar(data)
            .and_then(|repaired| PrivateKey::from_openssh(repaired.as_bytes()).ok())
            .ok_or(e)
    });
    let key = parsed.map_err(|e| {
        user_error(
            format!("{} is not an OpenSSH private key ({e}).", path.display()),
            fix,
        )
    })?;
    if key.is_encrypted() {
        return Err(user_error(
            format!(
                "{} is encrypted with a passphrase, which sshd cannot type at boot.",
                path.display()
            ),
            fix,
        ));
    }
    Ok(key)
}

/// OpenSSH writes an ECDSA private scalar as a minimal mpint, so it is shorter than the curve's
/// size when its top bytes are zero (1 in 256 keys, 1 in 4 on P-521); ssh-key 0.6 reads only the
/// full length. The same unencrypted key with the scalar zero-padded to full length, in a new
/// PEM text, for reading its public half and comment (the key file itself is installed as
/// given). `None` when that is not the problem.
fn ecdsa_with_full_length_scalar(pem: &[u8]) -> Option<zeroize::Zeroizing<String>> {
    use base64::Engine;
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .split(BEGIN)
        .nth(1)?
        .split(END)
        .next()?
        .split_whitespace()
        .collect();
    let blob = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(body).ok()?);
    let mut reader = SshReader(&blob);
    let magic = reader.bytes(15)?;
    let cipher = reader.string()?;
    if magic != b"openssh-key-v1\0" || cipher != b"none" {
        return None;
    }
    let header_end = blob.len() - reader.0.len();
    let _kdf = reader.string()?;
    let _kdf_options = reader.string()?;
    let count = reader.u32()?;
    let public = reader.string()?;
    let mut private = SshReader(reader.string()?);
    let checkints = private.bytes(8)?;
    let kind = private.string()?;
    let curve = private.string()?;
    let point = private.string()?;
    let scalar = private.string()?;
    let comment = private.string()?;
    let size = match curve {
        b"nistp256" => 32,
        b"nistp384" => 48,
        b"nistp521" => 66,
        _ => return None,
    };
    if !kind.starts_with(b"ecdsa-sha2-") || scalar.len() >= size || count != 1 {
        return None;
    }
    let mut section = zeroize::Zeroizing::new(Vec::new());
    section.extend_from_slice(checkints);
    for field in [kind, curve, point] {
        put_string(&mut section, field);
    }
    let mut padded = zeroize::Zeroizing::new(vec![0u8; size - scalar.len()]);
    padded.extend_from_slice(scalar);
    put_string(&mut section, &padded);
    put_string(&mut section, comment);
    // The unencrypted section is padded with 1, 2, 3, ... to a multiple of 8.
    let mut next = 1u8;
    while section.len() % 8 != 0 {
        section.push(next);
        next += 1;
    }
    let mut out = zeroize::Zeroizing::new(blob[..header_end].to_vec());
    put_string(&mut out, b"none");
    put_string(&mut out, b"");
    out.extend_from_slice(&count.to_be_bytes());
    put_string(&mut out, public);
    put_string(&mut out, &section);
    let encoded = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*out));
    let mut pem = zeroize::Zeroizing::new(format!("{BEGIN}\n"));
    for line in encoded.as_bytes().chunks(70) {
        pem.push_str(std::str::from_utf8(line).ok()?);
        pem.push('\n');
    }
    pem.push_str(END);
    pem.push('\n');
    Some(pem)
}

/// Reads SSH wire encoding (RFC 4251): big-endian u32 and length-prefixed strings.
struct SshReader<'a>(&'a [u8]);

impl<'a> SshReader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.bytes(len)
    }
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn key_bits(key: &PrivateKey) -> u32 {
    match key.algorithm() {
        Algorithm::Ed25519 => 256,
        Algorithm::Ecdsa { curve } => match curve.as_str() {
            "nistp384" => 384,
            "nistp521" => 521,
            _ => 256,
        },
        Algorithm::Rsa { .. } => key
            .public_key()
            .key_data()
            .rsa()
            .and_then(|rsa| rsa.n.as_positive_bytes())
            .map_or(0, |n| {
                let leading = n.first().map_or(8, |b| b.leading_zeros());
                u32::try_from(n.len() * 8)
                    .unwrap_or(u32::MAX)
                    .saturating_sub(leading)
            }),
        _ => 0,
    }
}

/// Wipes every file in `dir` (the secrets the rescue system handed over) as [`wipe_file`] does.
pub fn wipe_dir(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            wipe_file(&entry.path());
        }
    }
}

/// Overwrites a secret in the initramfs before unlinking it, so its pages do not linger: in
/// place (truncating first would free the pages with the secret in them, unchanged).
pub fn wipe_file(path: &Path) {
    if let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(path) {
        if let Ok(meta) = file.metadata() {
            let _ = file.write_all(&vec![0u8; meta.len() as usize]);
            let _ = file.sync_all();
        }
    }
    let _ = std::fs::remove_file(path);
}

/// A new ed25519 host key: the OpenSSH private key text and the fingerprint line as
/// `ssh-keygen -l` prints it (`256 SHA256:... comment (ED25519)`).
pub fn new_ed25519(comment: &str) -> Result<(zeroize::Zeroizing<String>, String)> {
    let mut key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519)
        .map_err(|e| anyhow!("{e}"))
        .context("generating an ed25519 host key")?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| anyhow!("{e}"))
        .context("encoding the host key")?;
    Ok((private, fingerprint_line(&key)))
}

/// The fingerprint line of a private key, as `ssh-keygen -l` prints it.
pub fn fingerprint_line(key: &PrivateKey) -> String {
    format!(
        "{} {} {} ({})",
        key_bits(key),
        key.fingerprint(HashAlg::Sha256),
        key.comment(),
        type_name(key)
    )
}

/// The key type as ssh-keygen names it in a fingerprint line.
fn type_name(key: &PrivateKey) -> String {
    match key.algorithm() {
        Algorithm::Ecdsa { .. } => "ECDSA".into(),
        other => other.as_str().trim_start_matches("ssh-").to_uppercase(),
    }
}

/// Writes `ssh_host_ed25519_key` (0600) and `.pub` (0644); returns the fingerprint line.
pub fn generate_ed25519(dir: &Path, comment: &str) -> Result<String> {
    let (private, fingerprint) = new_ed25519(comment)?;
    install_key(dir, "ssh_host_ed25519_key", private.as_bytes())?;
    Ok(fingerprint)
}

/// Writes a private key (0600) and its public half (0644) into `dir`.
fn install_key(dir: &Path, name: &str, private: &[u8]) -> Result<()> {
    let key = PrivateKey::from_openssh(private)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("parsing {name}"))?;
    write_key(dir, name, private, &key)
}

/// Writes `private` (0600), the text of `key`, and its public half (0644) into `dir`.
fn write_key(dir: &Path, name: &str, private: &[u8], key: &PrivateKey) -> Result<()> {
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| anyhow!("{e}"))
        .context("encoding the public key")?;
    write_file(&dir.join(name), private, 0o600)?;
    write_file(
        &dir.join(format!("{name}.pub")),
        format!("{public}\n").as_bytes(),
        0o644,
    )
}

/// Creates a file with its final mode from the start, so a secret is never briefly readable.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    // The umask may have narrowed the mode; set it exactly.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keygen_accepts_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let fingerprint = generate_ed25519(dir.path(), "root@test").unwrap();
        let mode = std::fs::metadata(dir.path().join("ssh_host_ed25519_key"))
            .unwrap()
            .permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let Ok(out) = std::process::Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(dir.path().join("ssh_host_ed25519_key"))
            .output()
        else {
            panic!("ssh-keygen is needed for this test (Debian: openssh-client)");
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fingerprint);
    }

    /// What `ssh-keygen -A` leaves in /etc/ssh is what `--host-keys /etc/ssh` hands over: every
    /// type must be read, and its fingerprint line be the one ssh-keygen prints.
    #[test]
    fn host_keys_of_every_type_ssh_keygen_makes() {
        let dir = tempfile::tempdir().unwrap();
        // Many P-521 keys: about 1 in 4 has a short scalar, which ssh-key alone cannot read.
        let kinds = [("ed25519", None), ("rsa", Some("3072"))]
            .into_iter()
            .chain(std::iter::repeat_n(("ecdsa", Some("256")), 3))
            .chain(std::iter::repeat_n(("ecdsa", Some("384")), 3))
            .chain(std::iter::repeat_n(("ecdsa", Some("521")), 16));
        for (i, (kind, bits)) in kinds.enumerate() {
            let path = dir.path().join(format!("ssh_host_{kind}_{i}_key"));
            let mut keygen = std::process::Command::new("ssh-keygen");
            keygen
                .args(["-q", "-N", "", "-C", "root@old", "-t", kind])
                .arg("-f")
                .arg(&path);
            if let Some(bits) = bits {
                keygen.args(["-b", bits]);
            }
            assert!(keygen.status().unwrap().success());
            let key = parse_host_key(&path, &std::fs::read(&path).unwrap(), "fix").unwrap();
            let listed = std::process::Command::new("ssh-keygen")
                .arg("-lf")
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(
                fingerprint_line(&key),
                String::from_utf8_lossy(&listed.stdout).trim(),
                "{kind} {bits:?}"
            );
            let public = std::fs::read_to_string(path.with_extension("pub")).unwrap_or_default();
            let public = std::fs::read_to_string(format!("{}.pub", path.display())).unwrap_or(public);
            assert_eq!(
                key.public_key().to_openssh().unwrap(),
                public.trim(),
                "{kind} {bits:?}"
            );
        }
    }

    /// sshd cannot load a key behind a passphrase: refused like one that is no key at all.
    #[test]
    fn encrypted_or_broken_host_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh_host_ed25519_key");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-N", "a passphrase", "-t", "ed25519", "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let err = check_provided(&[path.to_string_lossy().into_owned()]).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(user.problem.contains("encrypted"), "{user}");
        std::fs::write(&path, b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n").unwrap();
        let err = check_provided(&[path.to_string_lossy().into_owned()]).unwrap_err();
        assert!(crate::error::as_user_error(&err).is_some(), "{err:#}");
        assert!(path.exists());
    }

    #[test]
    fn wiping_the_secrets_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ssh_host_ed25519_key", "ssh_host_rsa_key", "disk-passphrase"] {
            std::fs::write(dir.path().join(name), b"secret").unwrap();
        }
        wipe_dir(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        wipe_dir(&dir.path().join("absent"));
    }

    /// A P-521 key from ssh-keygen whose private scalar is one byte short (a test key, made for
    /// this test and used nowhere else).
    const SHORT_SCALAR_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAArAAAABNlY2RzYS\n1zaGEyLW5pc3RwNTIxAAAACG5pc3RwNTIxAAAAhQQANhlaJcVX4T3UzaedpYF7O3X3iXQk\nuKFHNMXnoQoEbakNToeJQkjEoy1cC6tYBMrQL/M4peL41EEVzDIXzvJ4gA4B2H9gQ3Vt9g\nZqrpFcAmbdOrzEWpeE8GjUucqBgEHFvV/1TP+c3FJE6WEOIsf6G/DwJG3vxs5TeRz9SKnx\nbuj8jEMAAAEIt8TlI7fE5SMAAAATZWNkc2Etc2hhMi1uaXN0cDUyMQAAAAhuaXN0cDUyMQ\nAAAIUEADYZWiXFV+E91M2nnaWBezt194l0JLihRzTF56EKBG2pDU6HiUJIxKMtXAurWATK\n0C/zOKXi+NRBFcwyF87yeIAOAdh/YEN1bfYGaq6RXAJm3Tq8xFqXhPBo1LnKgYBBxb1f9U\nz/nNxSROlhDiLH+hvw8CRt78bOU3kc/Uip8W7o/IxDAAAAQTjBBq5OBUOLQy/UUDQMaJaX\ndp4EDdSjyneVlTxl7Y90tjr7MWoe1k7fTsGEsUR6YBnJpfZ+cw36COVNYm5ldRx8AAAACH\nJvb3RAb2xkAQID\n-----END OPENSSH PRIVATE KEY-----\n";

    #[test]
    fn an_ecdsa_key_with_a_short_scalar_is_read() {
        assert!(
            PrivateKey::from_openssh(SHORT_SCALAR_KEY).is_err(),
            "ssh-key reads it now; drop the repair"
        );
        let key = parse_host_key(Path::new("short"), SHORT_SCALAR_KEY.as_bytes(), "fix").unwrap();
        // As `ssh-keygen -lf` prints it.
        assert_eq!(
            fingerprint_line(&key),
            "521 SHA256:21kCvNCjfD2vKnvkvv88vHk1HV4ybwgNZh6SPWGWSaI root@old (ECDSA)"
        );
    }
}
