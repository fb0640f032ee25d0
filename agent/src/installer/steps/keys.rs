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

/// A provided host key file: its bytes (kept from swap, overwritten when dropped) and the key.
fn read_provided(source: &Path) -> Result<(Secret, PrivateKey)> {
    let data = Secret::read(source)?;
    let key = parse_host_key(source, data.as_bytes(), PROVIDED_KEY_FIX)?;
    Ok((data, key))
}

/// A host private key as sshd can load it: OpenSSH's format, unencrypted. `path` names it in
/// the error, `fix` says where a good one comes from; the error never quotes the key.
pub fn parse_host_key(path: &Path, data: &[u8], fix: &str) -> Result<PrivateKey> {
    let key = PrivateKey::from_openssh(data).map_err(|e| {
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

/// Overwrites a secret in the initramfs before unlinking it, so its pages do not linger.
pub fn wipe_file(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::write(path, vec![0u8; meta.len() as usize]);
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
        for (kind, bits) in [
            ("ed25519", None),
            ("ecdsa", Some("256")),
            ("ecdsa", Some("521")),
            ("rsa", Some("3072")),
        ] {
            let path = dir
                .path()
                .join(format!("ssh_host_{kind}_{}_key", bits.unwrap_or("")));
            let mut keygen = std::process::Command::new("ssh-keygen");
            keygen
                .args(["-q", "-N", "", "-C", "root@old", "-t", kind])
                .arg("-f")
                .arg(&path);
            if let Some(bits) = bits {
                keygen.args(["-b", bits]);
            }
            assert!(keygen.status().unwrap().success());
            let key = PrivateKey::from_openssh(std::fs::read(&path).unwrap()).unwrap();
            let listed = std::process::Command::new("ssh-keygen")
                .arg("-lf")
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(
                fingerprint_line(&key),
                String::from_utf8_lossy(&listed.stdout).trim(),
                "{kind}"
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
}
