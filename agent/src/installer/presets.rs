//! The one-word layouts, written in the declarative form of [`crate::installer::storage`] so the planner
//! has one input. Each returns the same partitions the README's layout table shows.

use crate::input::config::Layout;
use crate::installer::storage::{
    format_size, FsSpec, FsType, MountSpec, PartitionSpec, Storage, SubvolumeSpec, Table, TmpfsSpec,
};
use anyhow::{bail, Result};

/// Mount options of every preset btrfs subvolume: zstd compression pays for itself on the Nix
/// store, and access-time updates would turn every read into a write of copied-on-write metadata.
pub const BTRFS_OPTIONS: [&str; 2] = ["compress=zstd", "noatime"];
/// The ESP is readable by root only: it holds the initrd secrets (initrd SSH host key).
pub const ESP_OPTIONS: [&str; 2] = ["fmask=0077", "dmask=0077"];
pub const LUKS_NAME: &str = "cryptroot";
pub const PERSIST: &str = "/persist";

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn subvolume(name: &str, mountpoint: &str) -> SubvolumeSpec {
    SubvolumeSpec {
        name: name.into(),
        mount: MountSpec {
            mountpoint: Some(mountpoint.into()),
            mount_options: strings(&BTRFS_OPTIONS),
            needed_for_boot: false,
        },
    }
}

fn btrfs(subvolumes: Vec<SubvolumeSpec>) -> FsSpec {
    FsSpec {
        label: Some("nixos".into()),
        kind: FsType::Btrfs {
            mount: MountSpec::default(),
            subvolumes,
        },
    }
}

fn ext4(label: &str, mountpoint: &str) -> FsSpec {
    FsSpec {
        label: Some(label.into()),
        kind: FsType::Ext4(MountSpec {
            mountpoint: Some(mountpoint.into()),
            ..MountSpec::default()
        }),
    }
}

fn luks(inner: FsSpec) -> FsSpec {
    FsSpec {
        label: None,
        kind: FsType::Luks {
            name: Some(LUKS_NAME.into()),
            content: Box::new(inner),
        },
    }
}

/// The root partition's content, and whether `/` is a tmpfs (so /boot must be elsewhere).
fn root_content(layout: Layout) -> Result<(FsSpec, bool)> {
    let standard = || {
        btrfs(vec![
            subvolume("@", "/"),
            subvolume("@nix", "/nix"),
            subvolume("@home", "/home"),
            subvolume("@log", "/var/log"),
        ])
    };
    // Only the store and /persist survive a reboot. NixOS mounts /nix in the initrd by itself
    // (pathsNeededForBoot in nixos/lib/utils.nix); /persist must be asked for, as the host keys
    // and machine-id it holds are needed before stage 2.
    let impermanent = || {
        let mut persist = subvolume("@persist", PERSIST);
        persist.mount.needed_for_boot = true;
        btrfs(vec![subvolume("@nix", "/nix"), persist])
    };
    Ok(match layout {
        Layout::Ext4 => (ext4("nixos", "/"), false),
        Layout::Btrfs => (standard(), false),
        Layout::BtrfsImpermanence => (impermanent(), true),
        Layout::LuksBtrfs => (luks(standard()), false),
        Layout::LuksExt4 => (luks(ext4("nixos", "/")), false),
        Layout::LuksBtrfsImpermanence => (luks(impermanent()), true),
        Layout::Custom => bail!("the custom layout has no preset (a bug in nixos-kexec)"),
    })
}

/// The declarative storage of a preset: `swap_bytes` 0 for none. `uefi_only`: the machine's
/// architecture boots through UEFI only (aarch64), so GPT disks get no BIOS boot partition.
pub fn storage_for(layout: Layout, table: Table, swap_bytes: u64, uefi_only: bool) -> Result<Storage> {
    let (root, tmpfs_root) = root_content(layout)?;
    let encrypted = matches!(root.kind, FsType::Luks { .. });
    let mut partitions = Vec::new();
    match table {
        Table::Gpt => {
            // Both boot paths on every x86 GPT disk: GRUB embeds itself in the BIOS boot
            // partition, UEFI firmware reads the ESP, and the disk stays bootable if moved
            // between the two. ARM servers have no BIOS to move to.
            if !uefi_only {
                partitions.push(PartitionSpec {
                    name: Some("bios-boot".into()),
                    size: "1M".into(),
                    part_type: Some("bios-boot".into()),
                    ..PartitionSpec::default()
                });
            }
            partitions.push(PartitionSpec {
                name: Some("ESP".into()),
                size: "512M".into(),
                part_type: Some("esp".into()),
                filesystem: Some(FsSpec {
                    label: Some("ESP".into()),
                    kind: FsType::Vfat(MountSpec {
                        mountpoint: Some("/boot".into()),
                        mount_options: strings(&ESP_OPTIONS),
                        needed_for_boot: false,
                    }),
                }),
                ..PartitionSpec::default()
            });
        }
        Table::Mbr => {
            // GRUB reads ext4 and btrfs, but not LUKS2 (argon2id) and not a tmpfs that does not
            // exist yet: then /boot gets its own partition.
            if encrypted || tmpfs_root {
                partitions.push(PartitionSpec {
                    name: Some("boot".into()),
                    size: "1G".into(),
                    bootable: true,
                    filesystem: Some(ext4("boot", "/boot")),
                    ..PartitionSpec::default()
                });
            }
        }
    }
    if swap_bytes > 0 {
        partitions.push(PartitionSpec {
            name: Some("swap".into()),
            size: format_size(swap_bytes),
            part_type: Some("swap".into()),
            filesystem: Some(FsSpec {
                label: (!encrypted).then(|| "swap".into()),
                // Next to an encrypted root, swap must not keep plaintext pages across boots.
                kind: FsType::Swap {
                    random_encryption: encrypted,
                },
            }),
            ..PartitionSpec::default()
        });
    }
    let boot_on_root = table == Table::Mbr && !(encrypted || tmpfs_root);
    partitions.push(PartitionSpec {
        name: Some("nixos".into()),
        size: "rest".into(),
        bootable: boot_on_root,
        filesystem: Some(root),
        ..PartitionSpec::default()
    });
    Ok(Storage {
        table: Some(table.name().into()),
        partitions,
        tmpfs: if tmpfs_root {
            vec![TmpfsSpec {
                mountpoint: "/".into(),
                // 755: a tmpfs root is 1777 by default, which sshd and others refuse.
                mount_options: strings(&["defaults", "size=25%", "mode=755"]),
            }]
        } else {
            vec![]
        },
        persist: tmpfs_root.then(|| PERSIST.into()),
    })
}
