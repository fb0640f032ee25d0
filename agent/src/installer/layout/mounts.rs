//! The mounts as a whole: tmpfs mounts, one root, nothing mounted twice, state that survives a
//! tmpfs root, a boot loader that can read /boot; then in mount order.

use super::checks::{check_mountpoint, check_options};
use super::{Placed, PlannedMount, TYPE_BIOS_BOOT, TYPE_ESP};
use crate::error::user_error;
use crate::installer::storage::{PartitionSpec, Table, TmpfsSpec};
use crate::machine::facts::Firmware;
use anyhow::Result;
use std::collections::BTreeSet;

/// A mount and where it lives, for the checks of the whole.
pub(super) struct MountOn {
    pub mount: PlannedMount,
    /// The index in `storage.partitions` of the partition it is on; `None` for a tmpfs.
    pub partition: Option<usize>,
}

/// The tmpfs mounts `storage` describes.
pub(super) fn tmpfs_mounts(tmpfs: &[TmpfsSpec]) -> Result<Vec<MountOn>> {
    let mut mounts = Vec::new();
    for (i, t) in tmpfs.iter().enumerate() {
        let at = format!("tmpfs[{i}]");
        check_mountpoint(&at, &t.mountpoint)?;
        check_options(&at, &t.mount_options)?;
        mounts.push(MountOn {
            mount: PlannedMount {
                source: "tmpfs".into(),
                fstype: "tmpfs".into(),
                mountpoint: t.mountpoint.clone(),
                options: t.mount_options.clone(),
                nix_device: "none".into(),
                needed_for_boot: false,
                subvolume: None,
            },
            partition: None,
        });
    }
    Ok(mounts)
}

/// Checks the set of mounts as a whole (one root, nothing twice, a boot loader can reach
/// /boot) and orders them parents first.
pub(super) fn check_mounts(
    placed: &mut Placed,
    mut mounts: Vec<MountOn>,
    firmware: Firmware,
    specs: &[PartitionSpec],
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for MountOn { mount, .. } in &mounts {
        if !seen.insert(mount.mountpoint.clone()) {
            return Err(if mount.mountpoint == "/" {
                user_error(
                    "storage describes two root filesystems (two mounts at /).",
                    "mount exactly one filesystem, subvolume or tmpfs at /.",
                )
            } else {
                user_error(
                    format!("storage mounts two filesystems at {}.", mount.mountpoint),
                    "give each filesystem its own mount point.",
                )
            });
        }
    }
    let find = |mounts: &[MountOn], path: &str| mounts.iter().position(|m| m.mount.mountpoint == path);
    let Some(root) = find(&mounts, "/") else {
        return Err(user_error(
            "storage has no root filesystem (nothing is mounted at /).",
            "give one filesystem, btrfs subvolume or tmpfs the mountpoint \"/\".",
        ));
    };
    let root_is_tmpfs = mounts[root].partition.is_none();
    match (&placed.persist, root_is_tmpfs) {
        (Some(persist), true) => {
            let Some(index) = mounts
                .iter()
                .position(|m| &m.mount.mountpoint == persist && m.partition.is_some())
            else {
                return Err(user_error(
                    format!("storage: persist is {persist}, but no disk filesystem is mounted there."),
                    "mount a filesystem or subvolume at the persist path, e.g. a btrfs subvolume at /persist.",
                ));
            };
            // Host keys and machine-id are read from it before stage 2 mounts anything.
            mounts[index].mount.needed_for_boot = true;
        }
        (None, true) => {
            return Err(user_error(
                "storage: / is a tmpfs, but no \"persist\" path says where host keys, machine-id and the host flake survive a reboot.",
                "add \"persist\": \"/persist\" and mount a disk filesystem there.",
            ))
        }
        (Some(_), false) => {
            return Err(user_error(
                "storage: \"persist\" is set, but / is on disk, so everything persists anyway.",
                "remove \"persist\", or make / a tmpfs.",
            ))
        }
        (None, false) => {}
    }
    if root_is_tmpfs && find(&mounts, "/nix").is_none_or(|i| mounts[i].partition.is_none()) {
        return Err(user_error(
            "storage: / is a tmpfs and /nix is not on disk, so the Nix store would live in RAM and vanish at reboot.",
            "mount a disk filesystem or btrfs subvolume at /nix.",
        ));
    }
    let boot = find(&mounts, "/boot").or(Some(root)).map(|i| &mounts[i]);
    let boot_readable =
        boot.is_some_and(|m| m.partition.is_some() && !m.mount.source.starts_with("/dev/mapper/"));
    match (placed.table, firmware) {
        (Table::Gpt, Firmware::Uefi) => {
            let esp = find(&mounts, "/boot").and_then(|i| {
                let MountOn { mount, partition } = &mounts[i];
                let part = &placed.partitions[(*partition)?];
                (mount.fstype == "vfat" && part.type_guid == TYPE_ESP).then_some(())
            });
            if esp.is_none() {
                return Err(user_error(
                    "storage: this machine boots with UEFI, but no EFI system partition (type esp, vfat) is mounted at /boot.",
                    "add a partition {\"type\": \"esp\", \"size\": \"512M\", \"filesystem\": {\"type\": \"vfat\", \"mountpoint\": \"/boot\"}}.",
                ));
            }
        }
        (Table::Gpt, Firmware::Bios) => {
            if !placed.partitions.iter().any(|p| p.type_guid == TYPE_BIOS_BOOT) {
                return Err(user_error(
                    "storage: this machine boots with BIOS from a GPT disk, but there is no BIOS boot partition for GRUB.",
                    "add {\"type\": \"bios-boot\", \"size\": \"1M\"} as the first partition.",
                ));
            }
            if !boot_readable {
                return Err(user_error(
                    "storage: GRUB could not read /boot: it would be inside LUKS or in RAM.",
                    "give /boot its own unencrypted partition (vfat or ext4).",
                ));
            }
        }
        (Table::Mbr, _) => {
            if !boot_readable {
                return Err(user_error(
                    "storage: GRUB could not read /boot: it would be inside LUKS or in RAM.",
                    "give /boot its own unencrypted ext4 partition.",
                ));
            }
            let flagged: Vec<usize> = specs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.bootable)
                .map(|(i, _)| i)
                .collect();
            match flagged.as_slice() {
                [] => {
                    // Some BIOSes boot only a disk with an active partition: flag /boot's.
                    if let Some(MountOn {
                        partition: Some(home),
                        ..
                    }) = boot
                    {
                        placed.partitions[*home].bootable = true;
                    }
                }
                [_] => {}
                _ => {
                    return Err(user_error(
                        "storage: more than one partition has the boot flag.",
                        "set \"bootable\" on one partition only (the one holding /boot).",
                    ))
                }
            }
        }
    }
    // Parents before children; stable, so the described order breaks ties.
    mounts.sort_by_key(|m| {
        if m.mount.mountpoint == "/" {
            0
        } else {
            m.mount.mountpoint.matches('/').count()
        }
    });
    placed.mounts = mounts.into_iter().map(|m| m.mount).collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Layout;
    use crate::installer::layout::tests::{assert_refusals, custom, esp, mounts, owned, preset, text};
    use crate::installer::storage::GIB;

    /// With or without LUKS: the same mounts, /persist needed for boot, and the subvolumes on
    /// the opened container when encrypted (the ESP stays outside it).
    #[test]
    fn impermanence_has_tmpfs_root_and_persist_needed_for_boot() {
        for layout in [Layout::BtrfsImpermanence, Layout::LuksBtrfsImpermanence] {
            let placed = preset(layout, Table::Gpt, 0, 8 * GIB, 512, Firmware::Bios).unwrap();
            assert_eq!(
                mounts(&placed),
                owned(&[
                    ("/", "tmpfs", "defaults,size=25%,mode=755"),
                    ("/boot", "vfat", "fmask=0077,dmask=0077"),
                    ("/nix", "btrfs", "subvol=@nix,compress=zstd,noatime"),
                    ("/persist", "btrfs", "subvol=@persist,compress=zstd,noatime"),
                ]),
                "{layout:?}"
            );
            assert_eq!(placed.persist.as_deref(), Some("/persist"));
            let persist = placed.mounts.iter().find(|m| m.mountpoint == "/persist").unwrap();
            assert!(persist.needed_for_boot);
            assert_eq!(placed.mounts[0].nix_device, "none");
            let sources: Vec<&str> = placed.mounts[1..].iter().map(|m| m.source.as_str()).collect();
            if layout.encrypts() {
                assert_eq!(placed.luks.len(), 1);
                let luks = &placed.luks[0];
                assert_eq!(luks.device, placed.partitions.last().unwrap().device);
                assert_eq!(
                    sources,
                    [
                        placed.partitions[1].device.as_str(),
                        &luks.open_device,
                        &luks.open_device
                    ]
                );
            } else {
                assert!(placed.luks.is_empty());
            }
        }
    }

    #[test]
    fn declarative_errors_name_the_problem() {
        let root = serde_json::json!({"size": "rest", "filesystem": {"type": "ext4", "mountpoint": "/"}});
        let cases = [
            (
                serde_json::json!({"partitions": [esp(), {"size": "2G",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}, root.clone()]}),
                "two root",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest",
                "filesystem": {"type": "ext4", "mountpoint": "/home"}}]}),
                "no root",
            ),
            (
                serde_json::json!({"partitions": [{"size": "rest",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "EFI system partition",
            ),
            (
                serde_json::json!({"partitions": [esp(), root.clone()], "tmpfs": [{"mountpoint": "/tmp"}],
                "persist": "/tmp"}),
                "persist",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "btrfs",
                "subvolumes": [{"name": "@persist", "mountpoint": "/persist"}]}}],
                "tmpfs": [{"mountpoint": "/"}], "persist": "/persist"}),
                "Nix store would live in RAM",
            ),
        ];
        assert_refusals(&cases);
    }

    #[test]
    fn bios_needs_a_readable_boot_and_a_bios_boot_partition() {
        let root_in_luks = serde_json::json!({"size": "rest", "filesystem": {"type": "luks",
            "filesystem": {"type": "ext4", "mountpoint": "/"}}});
        let err = custom(
            serde_json::json!({"partitions": [{"size": "1M", "type": "bios-boot"}, root_in_luks.clone()]}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("GRUB could not read /boot"));
        let err = custom(
            serde_json::json!({"partitions": [esp(), root_in_luks]}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("BIOS boot partition"));
        let err = custom(
            serde_json::json!({"table": "mbr", "partitions": [
                {"size": "1G", "bootable": true, "filesystem": {"type": "ext4", "mountpoint": "/boot"}},
                {"size": "rest", "bootable": true, "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("more than one partition has the boot flag"));
        let five: Vec<serde_json::Value> = (0..5).map(|_| serde_json::json!({"size": "1G"})).collect();
        let err = custom(
            serde_json::json!({"table": "mbr", "partitions": five}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("primary partitions only"));
    }
}
