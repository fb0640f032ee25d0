//! `nixos-kexec gather`: runtime info about the running system, read natively from sysfs and
//! procfs (no ip, lsblk or udevadm needed).

use crate::input::authorized_keys::{self, AuthorizedKey};
use crate::input::runtime_info::{self, RuntimeInfo};
use crate::machine::facts::{read_trimmed, Disk, Facts, Firmware};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What `gather` prints: runtime info plus the machine facts an operator wants to see.
/// Only `info` travels to the installer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gathered {
    #[serde(flatten)]
    pub info: RuntimeInfo,
    pub machine: Machine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub firmware: Firmware,
    pub ram_bytes: u64,
    pub arch: String,
    pub dmi_vendor: Option<String>,
    pub dmi_product: Option<String>,
    pub disks: Vec<Disk>,
    /// The disk that holds the running root filesystem, if any (a cloud image's own disk).
    pub root_disk: Option<String>,
}

/// The keys of an authorized_keys file (the operator's way in now), as lines with their options.
pub fn root_authorized_keys(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    authorized_keys::parse_file(&text)
        .iter()
        .map(AuthorizedKey::line)
        .collect()
}

/// The keys of the user who ran `sudo nixos-kexec run`, for when root itself has none: on a
/// cloud image that user is the operator. `passwd` is /etc/passwd's text.
pub fn sudo_user_keys(sudo_user: &str, passwd: &str) -> Option<(PathBuf, Vec<String>)> {
    if sudo_user.is_empty() || sudo_user == "root" {
        return None;
    }
    let home = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 7 && fields[0] == sudo_user).then(|| fields[5].to_string())
    })?;
    let path = Path::new(&home).join(".ssh/authorized_keys");
    let keys = root_authorized_keys(&path);
    (!keys.is_empty()).then_some((path, keys))
}

pub fn gather(facts: &Facts, network: Option<runtime_info::Network>) -> Result<Gathered> {
    let hostname = sysinfo::System::host_name()
        .map(|h| h.split('.').next().unwrap_or(&h).to_string())
        .filter(|h| runtime_info::validate_hostname(h).is_ok());
    let root_disk = facts
        .disks
        .iter()
        .find(|d| d.mounted_at.iter().any(|m| m == "/"))
        .map(|d| d.dev_path.clone());
    Ok(Gathered {
        info: RuntimeInfo {
            version: runtime_info::VERSION,
            hostname,
            ssh_authorized_keys: root_authorized_keys(Path::new("/root/.ssh/authorized_keys")),
            network,
            ..RuntimeInfo::default()
        },
        machine: Machine {
            firmware: facts.firmware,
            ram_bytes: facts.ram_bytes,
            arch: std::env::consts::ARCH.to_string(),
            dmi_vendor: read_trimmed(Path::new("/sys/class/dmi/id/sys_vendor")),
            dmi_product: read_trimmed(Path::new("/sys/class/dmi/id/product_name")),
            disks: facts.disks.clone(),
            root_disk,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorized_keys_with_options_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        std::fs::write(
            &path,
            "# comment\n\nfrom=\"10.0.0.0/8\",no-pty ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD me@host\ngarbage line\n",
        )
        .unwrap();
        let keys = root_authorized_keys(&path);
        assert_eq!(keys.len(), 1);
        assert!(
            keys[0].starts_with("from=\"10.0.0.0/8\",no-pty ssh-ed25519 AAAA"),
            "{keys:?}"
        );
    }

    #[test]
    fn the_sudo_users_keys_stand_in_for_roots() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("alice");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        std::fs::write(
            home.join(".ssh/authorized_keys"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD alice@laptop\n",
        )
        .unwrap();
        let passwd = format!(
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice:{}:/bin/bash\n",
            home.display()
        );
        let (path, keys) = sudo_user_keys("alice", &passwd).unwrap();
        assert_eq!(path, home.join(".ssh/authorized_keys"));
        assert_eq!(keys.len(), 1);
        assert!(sudo_user_keys("root", &passwd).is_none());
        assert!(sudo_user_keys("bob", &passwd).is_none());
    }
}
