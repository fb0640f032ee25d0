//! SSH host keys for the installed system, generated here so the operator can pin the
//! fingerprint before the first boot.

use super::Execution;
use crate::plan::Plan;
use anyhow::{anyhow, Context, Result};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let dir = execution
        .target_path("etc/ssh")
        .context("the target root is not mounted")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fingerprint = generate_ed25519(&dir, &format!("root@{}", plan.hostname))?;
    console_fingerprint(&fingerprint);
    execution.host_key_fingerprints.push(fingerprint);
    Ok(())
}

fn console_fingerprint(fingerprint: &str) {
    crate::console::line(&format!("host key: {fingerprint}"));
}

/// Writes `ssh_host_ed25519_key` (0600) and `.pub` (0644); returns `256 SHA256:... comment (ED25519)`
/// as `ssh-keygen -l` prints it.
pub fn generate_ed25519(dir: &Path, comment: &str) -> Result<String> {
    let mut key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519)
        .map_err(|e| anyhow!("{e}"))
        .context("generating an ed25519 host key")?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| anyhow!("{e}"))
        .context("encoding the host key")?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| anyhow!("{e}"))
        .context("encoding the public key")?;
    write_file(&dir.join("ssh_host_ed25519_key"), private.as_bytes(), 0o600)?;
    write_file(
        &dir.join("ssh_host_ed25519_key.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok(format!(
        "256 {} {comment} (ED25519)",
        key.fingerprint(HashAlg::Sha256)
    ))
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
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let Ok(out) = std::process::Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(dir.path().join("ssh_host_ed25519_key"))
            .output()
        else {
            panic!("ssh-keygen is needed for this test (Debian: openssh-client)");
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fingerprint);
    }
}
