//! Earlier installs: the reinstall guard's look at the disks before the plan is made. A
//! machine that boots the installer again after a finished install (PXE first in the boot
//! order) must not lose that install; the plan refuses such a disk unless told to replace it.

use crate::installer::report::{Outcome, Summary, FILE_NAME, REPORT_DIR};
use crate::machine::blockdev::Mount;
use crate::machine::facts::{Facts, PreviousInstall};
use std::fs;
use std::io::Read;
use std::path::Path;

impl PreviousInstall {
    pub fn describe(&self) -> String {
        let what = match &self.stopped_before {
            Some(step) => format!("a NixOS prepared (stopped before {step}) by"),
            None => "a NixOS installed by".to_string(),
        };
        let text = format!(
            "{} holds {what} nixos-kexec {} for host {}",
            self.disk,
            self.nixos_kexec_version.as_deref().unwrap_or("(unknown version)"),
            self.hostname.as_deref().unwrap_or("(unknown)")
        );
        text + &format!("; its report is /{REPORT_DIR}/{FILE_NAME} on {}", self.partition)
    }
}

/// The install on `partition` of `disk` whose report lies under `root`, where that partition's
/// filesystem is mounted: `Some` only when the run ended in success (also when it stopped
/// before `install` on purpose). No report, or one that cannot be read, is no install.
pub fn read(root: &Path, disk: &str, partition: &str) -> Option<PreviousInstall> {
    finished(Summary::read(&root.join(REPORT_DIR)).ok()?, disk, partition)
}

fn finished(summary: Summary, disk: &str, partition: &str) -> Option<PreviousInstall> {
    (summary.result == Outcome::Success).then(|| PreviousInstall {
        disk: disk.to_string(),
        partition: partition.to_string(),
        hostname: summary.hostname,
        nixos_kexec_version: summary.nixos_kexec_version,
        stopped_before: summary.stopped_before,
    })
}

/// Filesystems a root can be on that we can read without a key.
fn sniff_filesystem(head: &[u8]) -> Option<&'static str> {
    crate::machine::devlinks::signatures(head)
        .into_iter()
        .map(|fs| fs.kind)
        .find(|kind| matches!(*kind, "ext4" | "btrfs"))
}

/// Looks for our own report on every partition of every disk nothing uses, mounting ext4 and
/// btrfs filesystems read-only (without replaying journals: not one byte changes) under
/// `probe_dir`, and records what it finds in `facts`. What cannot be read (encrypted,
/// damaged, another filesystem) counts as no install.
pub fn find_on_disks(facts: &mut Facts, probe_dir: &Path) {
    let mut found = Vec::new();
    for disk in &facts.disks {
        if !disk.mounted_at.is_empty() || !disk.holders.is_empty() {
            continue;
        }
        for part in &disk.partitions {
            let device = format!("/dev/{}", part.name);
            let mut head = Vec::new();
            if let Err(e) = fs::File::open(&device).and_then(|f| f.take(65608).read_to_end(&mut head)) {
                log::info!("previous install: cannot read {device}: {e}");
                continue;
            }
            let Some(fstype) = sniff_filesystem(&head) else {
                continue;
            };
            let target = probe_dir.join(&part.name);
            let options = if fstype == "ext4" { "noload" } else { "nologreplay" };
            let mount = match Mount::read_only(&device, &target, fstype, options) {
                Ok(m) => m,
                Err(e) => {
                    log::info!("previous install: cannot look into {device}: {e:#}");
                    continue;
                }
            };
            let previous = read(&target, &disk.dev_path, &device);
            if let Err(e) = mount.unmount() {
                log::warn!("previous install: {e:#}");
            }
            let _ = fs::remove_dir(&target);
            found.extend(previous);
        }
    }
    facts.previous_installs = found;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_and_btrfs_are_recognised() {
        let mut head = vec![0u8; 65608];
        assert_eq!(sniff_filesystem(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(sniff_filesystem(&head), Some("ext4"));
        let mut btrfs = vec![0u8; 65608];
        btrfs[65600..].copy_from_slice(b"_BHRfS_M");
        assert_eq!(sniff_filesystem(&btrfs), Some("btrfs"));
        assert_eq!(sniff_filesystem(&btrfs[..1000]), None);
    }

    fn from_bytes(json: &[u8]) -> Option<PreviousInstall> {
        finished(Summary::from_json(json).ok()?, "/dev/vda", "/dev/vda3")
    }

    #[test]
    fn a_successful_report_is_an_install() {
        let ok = br#"{"result":"success","hostname":"web1","nixos_kexec_version":"0.1.0","stopped_before":"install"}"#;
        let previous = from_bytes(ok).unwrap();
        assert_eq!(previous.hostname.as_deref(), Some("web1"));
        assert_eq!(previous.stopped_before.as_deref(), Some("install"));
        let text = previous.describe();
        assert!(
            text.contains(
                "/dev/vda holds a NixOS prepared (stopped before install) by nixos-kexec 0.1.0 for host web1"
            ),
            "{text}"
        );
        assert!(
            text.contains("/var/log/nixos-kexec/report.json on /dev/vda3"),
            "{text}"
        );
        assert!(from_bytes(br#"{"result":"failure"}"#).is_none());
        assert!(from_bytes(b"not json").is_none());
    }

    #[test]
    fn reads_the_report_under_a_mounted_root() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read(root.path(), "/dev/vda", "/dev/vda3"), None);
        let dir = root.path().join(REPORT_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("report.json"),
            br#"{"result":"success","hostname":"web1"}"#,
        )
        .unwrap();
        let previous = read(root.path(), "/dev/vda", "/dev/vda3").unwrap();
        assert_eq!(previous.hostname.as_deref(), Some("web1"));
        assert_eq!(previous.nixos_kexec_version, None);
    }
}
