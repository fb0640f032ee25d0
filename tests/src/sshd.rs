//! Debian's OpenSSH server in a throwaway rescue system, as a rented machine's rescue system
//! runs one: the `openssh-server` package downloaded into build-dev's cache (never installed on
//! the host), its libraries as `ldd` finds them on this host (the same Debian release), a
//! configuration that lets root in with keys only, and the lines of `/init` that start it.

use crate::{run_tool, Cpio};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The lines of a rescue system's `/init` that start sshd (after the network is up). sshd
/// forks before it listens, and writes its pid file once it does: "started" is said then.
pub const START_SSHD: &str = r#"mkdir -p /run/sshd /var/empty; chmod 755 /run/sshd
if /usr/sbin/sshd -E /run/sshd.log; then
    while [ ! -s /run/sshd.pid ]; do sleep 0.2; done
    echo "rescue: sshd started"
else
    echo "rescue: sshd did not start"; cat /run/sshd.log
fi"#;

const SSHD_CONFIG: &str = "Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile .ssh/authorized_keys
PidFile /run/sshd.pid
";

/// Root with a shell and a home; sshd's privilege-separation user.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
sshd:x:100:65534::/run/sshd:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// The cached `openssh-server` .deb, downloaded on the first use.
fn openssh_server_deb() -> Result<PathBuf> {
    let cache = std::env::var_os("NIXOS_KEXEC_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nixos-kexec"))
        .join("debs");
    let find = || -> Result<Option<PathBuf>> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("openssh-server_") && n.ends_with("_amd64.deb"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        Ok(found.pop())
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    run_tool(
        Command::new("apt-get")
            .args([
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                "openssh-server:amd64",
            ])
            .current_dir(&cache),
    )?;
    find()?.context("apt-get download openssh-server left no .deb")
}

/// The shared libraries `ldd` says `binary` loads, with the dynamic loader.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listed = run_tool(Command::new("ldd").arg(binary))?.stdout_str();
    let mut found = Vec::new();
    for line in listed.lines() {
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            found.push(PathBuf::from(path));
        }
    }
    if found.is_empty() {
        bail!("ldd found no library for {}:\n{listed}", binary.display());
    }
    Ok(found)
}

/// Adds Debian's sshd with its libraries and configuration to `cpio`: root logs in with
/// `authorized_key` only, and the server's host key is `host_key` (an OpenSSH private key).
pub fn add_sshd(mut cpio: Cpio, host_key: &Path, authorized_key: &str) -> Result<Cpio> {
    let unpacked = tempfile::tempdir()?;
    run_tool(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(openssh_server_deb()?)
            .arg(unpacked.path()),
    )?;
    let sshd = unpacked.path().join("usr/sbin/sshd");
    cpio = cpio.file("usr/sbin/sshd", 0o755, std::fs::read(&sshd)?);
    for library in libraries(&sshd)? {
        let data = std::fs::read(&library).with_context(|| format!("reading {}", library.display()))?;
        cpio = cpio.file(&library.to_string_lossy(), 0o755, data);
    }
    Ok(cpio
        .file("etc/ssh/sshd_config", 0o644, SSHD_CONFIG)
        .file("etc/ssh/ssh_host_ed25519_key", 0o600, std::fs::read(host_key)?)
        .file("etc/passwd", 0o644, PASSWD)
        .file("etc/group", 0o644, GROUP)
        .dir("root", 0o700)
        .dir("root/.ssh", 0o700)
        .file("root/.ssh/authorized_keys", 0o600, format!("{authorized_key}\n")))
}
