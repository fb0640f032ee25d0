//! Earlier installs: the reinstall guard's look at the disks before the plan is made. A
//! machine that boots the installer again after a finished install (PXE first in the boot
//! order) must not lose that install; the plan refuses such a disk unless told to replace it.

use crate::installer::report::{Marker, Outcome, Summary, FILE_NAME, REPORT_DIR};
use crate::installer::steps::crypt;
use crate::machine::blockdev::Mount;
use crate::machine::facts::{Evidence, Facts, PreviousInstall};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

impl PreviousInstall {
    pub fn describe(&self) -> String {
        let what = match &self.stopped_before {
            Some(step) => format!("a NixOS prepared (stopped before {step}) by"),
            None => "a NixOS installed by".to_string(),
        };
        let version = match (&self.nixos_kexec_version, &self.evidence) {
            (Some(version), _) => format!(" {version}"),
            // A marker leaves the version out when the hostname needs the room.
            (None, Some(Evidence::LuksHeader { .. })) => String::new(),
            (None, _) => " (unknown version)".to_string(),
        };
        let text = format!(
            "{} holds {what} nixos-kexec{version} for host {}",
            self.disk,
            self.hostname.as_deref().unwrap_or("(unknown)")
        );
        let partition = &self.partition;
        text + &match &self.evidence {
            None => format!("; its report is /{REPORT_DIR}/{FILE_NAME} on {partition}"),
            Some(Evidence::Report { path }) => format!("; its report is /{path} on {partition}"),
            Some(Evidence::LuksHeader { date }) => format!(
                " on {date}; the LUKS2 header of {partition} says so (the report is inside, encrypted)"
            ),
        }
    }
}

fn finished(summary: Summary, disk: &str, partition: &str) -> Option<PreviousInstall> {
    (summary.result == Outcome::Success).then(|| PreviousInstall {
        disk: disk.to_string(),
        partition: partition.to_string(),
        hostname: summary.hostname,
        nixos_kexec_version: summary.nixos_kexec_version,
        stopped_before: summary.stopped_before,
        evidence: None,
    })
}

/// Where, from the top of a filesystem, the report directory can be. A run writes it at
/// [`REPORT_DIR`] under the state directory, so a filesystem or subvolume mounted there, or at
/// `var` or `var/log` of it, holds it at the matching tail of that path. On btrfs the
/// subvolumes are directories at the top level, and each is looked into as well: `@log` holds
/// `nixos-kexec`, `@persist` (impermanence's state directory) `var/log/nixos-kexec`, and so
/// does the `@` of a layout without `@log`.
fn report_dirs(top: &Path, btrfs: bool) -> Vec<String> {
    let mut bases = vec![String::new()];
    if btrfs {
        let mut names: Vec<String> = fs::read_dir(top)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort();
        bases.extend(names.into_iter().map(|name| name + "/"));
    }
    let tails: Vec<&str> = (0..REPORT_DIR.len())
        .filter(|&at| at == 0 || REPORT_DIR.as_bytes()[at - 1] == b'/')
        .map(|at| &REPORT_DIR[at..])
        .collect();
    bases
        .iter()
        .flat_map(|base| tails.iter().map(move |tail| format!("{base}{tail}")))
        .collect()
}

/// `relative` under `top`, if no part of it is a symbolic link: one could point out of the
/// disk into the installer's own files.
fn on_disk(top: &Path, relative: &str) -> Option<PathBuf> {
    let mut path = top.to_path_buf();
    for part in relative.split('/') {
        path.push(part);
        if !fs::symlink_metadata(&path).ok()?.is_dir() {
            return None;
        }
    }
    Some(path)
}

/// The install on `partition` of `disk` whose report lies where [`report_dirs`] looks in the
/// partition's filesystem, mounted at `top`: `Some` only when the run ended in success (also
/// when it stopped before `install` on purpose). No report, or one that cannot be read, is no
/// install.
pub fn read(top: &Path, btrfs: bool, disk: &str, partition: &str) -> Option<PreviousInstall> {
    report_dirs(top, btrfs).into_iter().find_map(|relative| {
        let dir = on_disk(top, &relative)?;
        if !fs::symlink_metadata(dir.join(FILE_NAME)).ok()?.is_file() {
            return None;
        }
        let mut previous = finished(Summary::read(&dir).ok()?, disk, partition)?;
        if relative != REPORT_DIR {
            previous.evidence = Some(Evidence::Report {
                path: format!("{relative}/{FILE_NAME}"),
            });
        }
        Some(previous)
    })
}

/// The install whose marker is in the LUKS2 header at the start of `head`, read without the
/// passphrase (see `steps::finish`).
fn marked(head: &[u8], disk: &str, partition: &str) -> Option<PreviousInstall> {
    let marker = Marker::from_text(&crypt::subsystem(head)?)?;
    let mut previous = finished(marker.summary, disk, partition)?;
    previous.evidence = Some(Evidence::LuksHeader { date: marker.date });
    Some(previous)
}

/// What a partition can be that we can look into without a key, and an encrypted one whose
/// header we can read.
fn sniff_filesystem(head: &[u8]) -> Option<&'static str> {
    crate::machine::devlinks::signatures(head)
        .into_iter()
        .map(|fs| fs.kind)
        .find(|kind| matches!(*kind, "ext4" | "btrfs" | "crypto_LUKS"))
}

/// Looks for our own report on every partition of every disk nothing uses, mounting ext4 and
/// btrfs filesystems read-only (without replaying journals: not one byte changes; btrfs at its
/// top level, whatever its default subvolume) under `probe_dir`, and for our marker in LUKS2
/// headers, and records what it finds in `facts`. What cannot be read (damaged, another
/// filesystem) counts as no install.
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
            if fstype == "crypto_LUKS" {
                found.extend(marked(&head, &disk.dev_path, &device));
                continue;
            }
            let target = probe_dir.join(&part.name);
            // The bare `nologreplay` of old kernels is refused by new ones; `rescue=` has the
            // same meaning since Linux 5.9.
            let options = if fstype == "ext4" {
                "noload"
            } else {
                "rescue=nologreplay,subvolid=5"
            };
            let mount = match Mount::read_only(&device, &target, fstype, options) {
                Ok(m) => m,
                Err(e) => {
                    log::info!("previous install: cannot look into {device}: {e:#}");
                    continue;
                }
            };
            let previous = read(&target, fstype == "btrfs", &disk.dev_path, &device);
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
            text.ends_with("; its report is /var/log/nixos-kexec/report.json on /dev/vda3"),
            "{text}"
        );
        let in_subvolume = PreviousInstall {
            evidence: Some(Evidence::Report {
                path: "@log/nixos-kexec/report.json".into(),
            }),
            ..previous
        };
        assert!(
            in_subvolume
                .describe()
                .ends_with("for host web1; its report is /@log/nixos-kexec/report.json on /dev/vda3"),
            "{}",
            in_subvolume.describe()
        );
        assert!(from_bytes(br#"{"result":"failure"}"#).is_none());
        assert!(from_bytes(b"not json").is_none());
    }

    fn put_report(dir: &Path, json: &[u8]) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(FILE_NAME), json).unwrap();
    }

    #[test]
    fn finds_the_report_in_the_subvolume_that_holds_it() {
        let ok = br#"{"result":"success","hostname":"web1"}"#;
        for (relative, btrfs, evidence) in [
            ("var/log/nixos-kexec", false, None),
            ("var/log/nixos-kexec", true, None),
            ("@log/nixos-kexec", true, Some("@log/nixos-kexec/report.json")),
            (
                "@persist/var/log/nixos-kexec",
                true,
                Some("@persist/var/log/nixos-kexec/report.json"),
            ),
            (
                "@/var/log/nixos-kexec",
                true,
                Some("@/var/log/nixos-kexec/report.json"),
            ),
        ] {
            let top = tempfile::tempdir().unwrap();
            fs::create_dir_all(top.path().join("@nix/store")).unwrap();
            put_report(&top.path().join(relative), ok);
            let previous = read(top.path(), btrfs, "/dev/vda", "/dev/vda3")
                .unwrap_or_else(|| panic!("{relative}: not found"));
            assert_eq!(previous.hostname.as_deref(), Some("web1"));
            let expected = evidence.map(|path| Evidence::Report { path: path.into() });
            assert_eq!(previous.evidence, expected, "{relative}");
        }
        // Subvolumes are a btrfs thing: on ext4, /home/x/var/log/... is not a report.
        let top = tempfile::tempdir().unwrap();
        put_report(&top.path().join("home/var/log/nixos-kexec"), ok);
        assert_eq!(read(top.path(), false, "/dev/vda", "/dev/vda3"), None);
    }

    #[test]
    fn a_failed_report_beside_a_finished_one_does_not_hide_it_and_links_are_not_followed() {
        let top = tempfile::tempdir().unwrap();
        put_report(
            &top.path().join("@/var/log/nixos-kexec"),
            br#"{"result":"failure","hostname":"new"}"#,
        );
        assert_eq!(read(top.path(), true, "/dev/vda", "/dev/vda3"), None);
        put_report(
            &top.path().join("@log/nixos-kexec"),
            br#"{"result":"success","hostname":"old"}"#,
        );
        let previous = read(top.path(), true, "/dev/vda", "/dev/vda3").unwrap();
        assert_eq!(previous.hostname.as_deref(), Some("old"));

        let elsewhere = tempfile::tempdir().unwrap();
        put_report(
            &elsewhere.path().join("nixos-kexec"),
            br#"{"result":"success","hostname":"installer"}"#,
        );
        for link in ["@link", "@home"] {
            let top = tempfile::tempdir().unwrap();
            let target = if link == "@link" {
                top.path().join(link)
            } else {
                fs::create_dir_all(top.path().join("@home/var")).unwrap();
                top.path().join("@home/var/log")
            };
            std::os::unix::fs::symlink(elsewhere.path(), &target).unwrap();
            assert_eq!(read(top.path(), true, "/dev/vda", "/dev/vda3"), None, "{link}");
        }
    }

    /// The first 4 KiB of a LUKS2 container whose subsystem field holds `subsystem`.
    fn luks2_head(subsystem: &str) -> Vec<u8> {
        assert!(subsystem.len() < 48);
        let mut head = vec![0u8; 65608];
        head[..6].copy_from_slice(b"LUKS\xba\xbe");
        head[6..8].copy_from_slice(&[0, 2]);
        head[208..208 + subsystem.len()].copy_from_slice(subsystem.as_bytes());
        head
    }

    #[test]
    fn a_marked_luks_header_is_an_install_and_an_unmarked_one_is_not() {
        let head = luks2_head("nixos-kexec 2025-06-01 vault version=0.1.0");
        assert_eq!(sniff_filesystem(&head), Some("crypto_LUKS"));
        let previous = marked(&head, "/dev/vdb", "/dev/vdb3").unwrap();
        assert_eq!(previous.hostname.as_deref(), Some("vault"));
        assert_eq!(
            previous.describe(),
            "/dev/vdb holds a NixOS installed by nixos-kexec 0.1.0 for host vault on 2025-06-01; the LUKS2 header of /dev/vdb3 says so (the report is inside, encrypted)"
        );
        let stopped = marked(
            &luks2_head("nixos-kexec 2025-06-01 vault before=install"),
            "/dev/vdb",
            "/dev/vdb3",
        )
        .unwrap();
        assert!(
            stopped.describe().starts_with(
                "/dev/vdb holds a NixOS prepared (stopped before install) by nixos-kexec for host vault on 2025-06-01;"
            ),
            "{}",
            stopped.describe()
        );
        for other in ["", "systemd", "nixos-kexec", "nixos-kexec yesterday vault"] {
            assert_eq!(
                marked(&luks2_head(other), "/dev/vdb", "/dev/vdb3"),
                None,
                "{other:?}"
            );
        }
        let mut luks1 = luks2_head("nixos-kexec 2025-06-01 vault");
        luks1[7] = 1;
        assert_eq!(marked(&luks1, "/dev/vdb", "/dev/vdb3"), None);
    }

    #[test]
    fn reads_the_report_under_a_mounted_root() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read(root.path(), false, "/dev/vda", "/dev/vda3"), None);
        let dir = root.path().join(REPORT_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("report.json"),
            br#"{"result":"success","hostname":"web1"}"#,
        )
        .unwrap();
        let previous = read(root.path(), false, "/dev/vda", "/dev/vda3").unwrap();
        assert_eq!(previous.hostname.as_deref(), Some("web1"));
        assert_eq!(previous.nixos_kexec_version, None);
    }
}
