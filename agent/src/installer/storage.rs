//! The declarative form of a disk layout: partitions and what goes on them, as the runtime info
//! JSON carries it under `storage` (README, "Declarative storage").
//!
//! The presets (`layout=btrfs`, ...) are written in this same form by [`crate::installer::presets`], and the
//! planner ([`crate::installer::layout`]) reads only this form, so a preset and the equivalent hand-written
//! description produce the same plan.
//!
//! Unknown fields are refused here, unlike at the top level of the runtime info: a misspelt
//! `mount_options` silently ignored would install a system that differs from what was asked.

use crate::error::user_error;
use anyhow::Result;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// `gpt` (default) or `mbr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    pub partitions: Vec<PartitionSpec>,
    /// Filesystems in RAM, e.g. `/` for an impermanent system.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<TmpfsSpec>,
    /// Where state that must survive a reboot goes when `/` is a tmpfs: host keys, machine-id,
    /// the host flake, the install report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// GPT partition name (PARTLABEL); ignored on MBR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `512M`, `2G`, ... or `rest` (what the other partitions leave).
    pub size: String,
    /// Byte offset (`1M`, ...); by default right after the previous partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// `bios-boot`, `esp`, `linux`, `swap`, a GPT type GUID, or an MBR type byte (`0x83`).
    /// By default from the filesystem: swap for swap, esp for vfat on /boot, linux otherwise.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub part_type: Option<String>,
    /// MBR boot flag; by default on the partition holding /boot (or /).
    #[serde(default, skip_serializing_if = "is_false")]
    pub bootable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsSpec>,
}

/// What a partition or a LUKS container holds. Read through its JSON form, `FsWire`, so an
/// unknown type or a field of another type is refused while the runtime info is read, with
/// the type the field belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FsWire", into = "FsWire")]
pub struct FsSpec {
    /// Filesystem, swap or LUKS label.
    pub label: Option<String>,
    pub kind: FsType,
}

/// The `type` of a filesystem, with the fields only that type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsType {
    Vfat(MountSpec),
    Ext4(MountSpec),
    Btrfs {
        /// The top level; mounting it is optional next to subvolumes.
        mount: MountSpec,
        subvolumes: Vec<SubvolumeSpec>,
    },
    Swap {
        /// A new random key at every boot (`randomEncryption.enable`).
        random_encryption: bool,
    },
    Luks {
        /// The device-mapper name (`/dev/mapper/<name>`, `boot.initrd.luks.devices.<name>`).
        name: Option<String>,
        /// What is inside the container.
        content: Box<FsSpec>,
    },
}

impl FsType {
    /// As written in `type`.
    pub fn name(&self) -> &'static str {
        match self {
            FsType::Vfat(_) => "vfat",
            FsType::Ext4(_) => "ext4",
            FsType::Btrfs { .. } => "btrfs",
            FsType::Swap { .. } => "swap",
            FsType::Luks { .. } => "luks",
        }
    }

    /// The fields of this type, for the refusal of any other.
    fn fields(&self) -> &'static str {
        match self {
            FsType::Vfat(_) | FsType::Ext4(_) => "type, label, mountpoint, mount_options and needed_for_boot",
            FsType::Btrfs { .. } => "type, label, mountpoint, mount_options, needed_for_boot and subvolumes",
            FsType::Swap { .. } => "type, label and random_encryption",
            FsType::Luks { .. } => "type, label, name and filesystem",
        }
    }
}

/// Where and how a filesystem or a btrfs subvolume is mounted (`fileSystems.<mountpoint>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// `fileSystems.<mountpoint>.neededForBoot`: mounted by the initrd.
    #[serde(default, skip_serializing_if = "is_false")]
    pub needed_for_boot: bool,
}

impl MountSpec {
    fn is_empty(&self) -> bool {
        *self == MountSpec::default()
    }
}

/// The JSON form of [`FsSpec`]: every field of every type, as the README lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FsWire {
    /// `vfat`, `ext4`, `btrfs`, `swap` or `luks`.
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    #[serde(flatten)]
    mount: MountSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    subvolumes: Vec<SubvolumeSpec>,
    #[serde(default, skip_serializing_if = "is_false")]
    random_encryption: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filesystem: Option<Box<FsSpec>>,
    /// Refused, with the fields the type has (serde's own refusal would not know the type).
    #[serde(flatten, skip_serializing)]
    unknown: BTreeMap<String, IgnoredAny>,
}

impl TryFrom<FsWire> for FsSpec {
    /// serde prints it (problem and fix) with where in the JSON it is.
    type Error = anyhow::Error;

    fn try_from(wire: FsWire) -> Result<FsSpec> {
        let FsWire {
            kind: type_name,
            label,
            mount,
            subvolumes,
            random_encryption,
            name,
            filesystem,
            unknown,
        } = wire;
        let refuse = |problem: &str, fix: &str| {
            Err(user_error(
                format!("storage: {type_name} filesystem: {problem}"),
                fix,
            ))
        };
        if type_name != "btrfs" && !subvolumes.is_empty() {
            return refuse(
                "only btrfs has subvolumes",
                "remove \"subvolumes\" or use type btrfs.",
            );
        }
        if type_name != "swap" && random_encryption {
            return refuse(
                "random_encryption is for swap only",
                "remove it, or use type swap.",
            );
        }
        if type_name != "luks" && (name.is_some() || filesystem.is_some()) {
            return refuse(
                "\"name\" and \"filesystem\" belong to a luks container",
                "remove them, or use type luks.",
            );
        }
        let kind = match type_name.as_str() {
            "vfat" => FsType::Vfat(mount),
            "ext4" => FsType::Ext4(mount),
            "btrfs" => FsType::Btrfs { mount, subvolumes },
            "swap" | "luks" if !mount.is_empty() => {
                return refuse(
                    &format!("{type_name} is not mounted"),
                    "remove mountpoint, mount_options and needed_for_boot from it.",
                )
            }
            "swap" => FsType::Swap { random_encryption },
            "luks" => match filesystem {
                Some(content) => FsType::Luks { name, content },
                None => {
                    return refuse(
                        "a luks container needs a \"filesystem\" inside",
                        "add e.g. \"filesystem\": {\"type\": \"ext4\", \"mountpoint\": \"/\"}.",
                    )
                }
            },
            "zfs" | "zpool" => return Err(zfs_refusal(&format!("storage: filesystem type {type_name:?}"))),
            other => {
                return Err(user_error(
                    format!("storage: filesystem type {other:?} is not one this installer creates"),
                    "use vfat, ext4, btrfs, swap, or luks containing one of those.",
                ))
            }
        };
        if let Some(field) = unknown.keys().next() {
            return refuse(
                &format!("unknown field {field:?}"),
                &format!("check its spelling; type {type_name} takes {}.", kind.fields()),
            );
        }
        Ok(FsSpec { label, kind })
    }
}

impl From<FsSpec> for FsWire {
    fn from(spec: FsSpec) -> FsWire {
        let mut wire = FsWire {
            kind: spec.kind.name().into(),
            label: spec.label,
            mount: MountSpec::default(),
            subvolumes: Vec::new(),
            random_encryption: false,
            name: None,
            filesystem: None,
            unknown: BTreeMap::new(),
        };
        match spec.kind {
            FsType::Vfat(mount) | FsType::Ext4(mount) => wire.mount = mount,
            FsType::Btrfs { mount, subvolumes } => {
                wire.mount = mount;
                wire.subvolumes = subvolumes;
            }
            FsType::Swap { random_encryption } => wire.random_encryption = random_encryption,
            FsType::Luks { name, content } => {
                wire.name = name;
                wire.filesystem = Some(content);
            }
        }
        wire
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubvolumeSpec {
    pub name: String,
    #[serde(flatten)]
    pub mount: MountSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmpfsSpec {
    pub mountpoint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Gpt,
    Mbr,
}

impl Table {
    pub fn parse(text: &str) -> Result<Table> {
        match text {
            "gpt" => Ok(Table::Gpt),
            "mbr" | "dos" | "msdos" => Ok(Table::Mbr),
            _ => Err(user_error(
                format!("Partition table {text:?} is not one this installer writes."),
                "use table=gpt (the default) or table=mbr (BIOS-only machines).",
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Gpt => "gpt",
            Table::Mbr => "mbr",
        }
    }
}

/// A size as written in the runtime info or on the command line: a whole number with an
/// optional binary unit (`K`, `M`, `G`, `T`, also written `KiB`, `MB`, ...; all powers of 1024),
/// no unit meaning bytes.
pub fn parse_size(text: &str, what: &str) -> Result<u64> {
    let bad = || {
        user_error(
            format!("{what} {text:?} is not a size."),
            "write a whole number with a unit, e.g. 512M, 2G or 1T (units are powers of 1024).",
        )
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let bytes = number.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes > MAX_SIZE {
        return Err(user_error(
            format!("{what} {text:?} is larger than any disk (the most this installer takes is 1 EiB)."),
            "check the number and its unit (M, G and T are powers of 1024).",
        ));
    }
    Ok(bytes)
}

/// No disk comes near it, and with sizes below it, aligning one never overflows; sums of
/// sizes are still added with checks.
pub const MAX_SIZE: u64 = 1 << 60;

/// The `swap` option: a size, or `0`/`none`/`off` for no swap. Rounded up to whole MiB.
pub fn parse_swap(text: &str) -> Result<u64> {
    if matches!(text.trim(), "none" | "off" | "no" | "") {
        return Ok(0);
    }
    let bytes = parse_size(text, "swap size")?;
    let bytes = bytes.div_ceil(MIB) * MIB;
    if bytes != 0 && bytes < 16 * MIB {
        return Err(user_error(
            format!("swap={text} is smaller than 16 MiB, too small to help."),
            "give swap a size such as 1G or 2G, or swap=0 for none.",
        ));
    }
    Ok(bytes)
}

/// `1G`, `512M`, `12345K`: the largest unit that divides the size, for readable presets.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The refusal for ZFS, wherever it is asked for: the layout name or a filesystem type.
pub fn zfs_refusal(asked: &str) -> anyhow::Error {
    user_error(
        format!(
            "{asked} asks for ZFS, which this installer does not support yet: the installer carries no ZFS tools or kernel module, so a ZFS pool could not be created or checked here."
        ),
        "choose layout btrfs (subvolumes, zstd compression, snapshots), luks-btrfs (the same, encrypted) or ext4; a ZFS pool can be added on other disks after the first boot.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M", "x").unwrap(), 512 * MIB);
        assert_eq!(parse_size("2G", "x").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB", "x").unwrap(), 2 << 30);
        assert_eq!(parse_size("1t", "x").unwrap(), 1 << 40);
        assert_eq!(parse_size("4096", "x").unwrap(), 4096);
        for bad in ["", "G", "1.5G", "-1G", "2X", "99999999999999999999T"] {
            assert!(parse_size(bad, "x").is_err(), "{bad}");
        }
        assert_eq!(format_size(512 * MIB), "512M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1536 * MIB), "1536M");
    }

    #[test]
    fn swap_option() {
        assert_eq!(parse_swap("0").unwrap(), 0);
        assert_eq!(parse_swap("none").unwrap(), 0);
        assert_eq!(parse_swap("2G").unwrap(), 2 << 30);
        assert_eq!(parse_swap("100000K").unwrap(), 98 * MIB);
        assert!(parse_swap("1M").is_err());
        assert!(parse_swap("lots").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"partitions":[{"size":"rest","filesystem":{"type":"ext4","mountpiont":"/"}}]}"#;
        let err = serde_json::from_str::<Storage>(json).unwrap_err();
        assert!(
            err.to_string().contains(
                "unknown field \"mountpiont\" Fix: check its spelling; type ext4 takes type, label, mountpoint,"
            ),
            "{err}"
        );
        let json = r#"{"partitions":[{"size":"rest","filesystem":{"type":"btrfs",
            "subvolumes":[{"name":"@","mountpiont":"/"}]}}]}"#;
        let err = serde_json::from_str::<Storage>(json).unwrap_err();
        assert!(err.to_string().contains("unknown field `mountpiont`"), "{err}");
        let json = serde_json::json!({"partitions": [{"size": "1G", "part_type": "x"}]});
        let err = serde_json::from_value::<Storage>(json).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    fn refusal(filesystem: serde_json::Value) -> String {
        let json = serde_json::json!({"partitions": [{"size": "rest", "filesystem": filesystem}]});
        let err = serde_json::from_value::<Storage>(json).expect_err(&filesystem.to_string());
        err.to_string()
    }

    #[test]
    fn an_unknown_type_or_a_field_of_another_type_is_refused_with_the_fix() {
        let cases = [
            (
                serde_json::json!({"type": "xfs", "mountpoint": "/"}),
                "filesystem type \"xfs\" is not one this installer creates Fix: use vfat, ext4, btrfs, swap, or luks",
            ),
            (serde_json::json!({"type": "zfs", "mountpoint": "/"}), "asks for ZFS"),
            (
                serde_json::json!({"type": "ext4", "mountpoint": "/", "subvolumes": [{"name": "@"}]}),
                "storage: ext4 filesystem: only btrfs has subvolumes Fix: remove \"subvolumes\" or use type btrfs.",
            ),
            (
                serde_json::json!({"type": "btrfs", "random_encryption": true}),
                "random_encryption is for swap only",
            ),
            (
                serde_json::json!({"type": "vfat", "name": "x"}),
                "\"name\" and \"filesystem\" belong to a luks container",
            ),
            (
                serde_json::json!({"type": "swap", "mountpoint": "/swap"}),
                "storage: swap filesystem: swap is not mounted Fix: remove mountpoint",
            ),
            (
                serde_json::json!({"type": "luks", "needed_for_boot": true,
                    "filesystem": {"type": "ext4", "mountpoint": "/"}}),
                "luks is not mounted",
            ),
            (
                serde_json::json!({"type": "luks", "name": "cryptroot"}),
                "a luks container needs a \"filesystem\" inside",
            ),
            (
                serde_json::json!({"type": "luks", "filesystem": {"type": "ext4", "subvolumes": [{"name": "@"}]}}),
                "ext4 filesystem: only btrfs has subvolumes",
            ),
        ];
        for (filesystem, needle) in cases {
            let text = refusal(filesystem.clone());
            assert!(text.contains(needle), "{filesystem}: {text}");
        }
    }

    #[test]
    fn the_json_form_reads_back_as_written() {
        let json = serde_json::json!({"table": "gpt", "partitions": [
            {"name": "bios", "size": "1M", "type": "bios-boot"},
            {"size": "512M", "filesystem": {"type": "vfat", "label": "ESP", "mountpoint": "/boot",
                "mount_options": ["fmask=0077"]}},
            {"size": "2G", "filesystem": {"type": "swap", "label": "swap", "random_encryption": true}},
            {"size": "8G", "filesystem": {"type": "luks", "label": "x", "name": "cryptroot",
                "filesystem": {"type": "btrfs", "label": "nixos", "mountpoint": "/top",
                    "subvolumes": [{"name": "@", "mountpoint": "/", "mount_options": ["noatime"],
                        "needed_for_boot": true}, {"name": "@snapshots"}]}}},
            {"size": "rest", "bootable": true, "filesystem": {"type": "ext4", "mountpoint": "/srv",
                "needed_for_boot": true}}],
            "tmpfs": [{"mountpoint": "/tmp", "mount_options": ["size=1G"]}], "persist": "/persist"});
        let storage: Storage = serde_json::from_value(json.clone()).unwrap();
        let FsType::Luks { name, content } = &storage.partitions[3].filesystem.as_ref().unwrap().kind else {
            panic!("{storage:?}")
        };
        assert_eq!(name.as_deref(), Some("cryptroot"));
        assert!(matches!(&content.kind, FsType::Btrfs { subvolumes, .. } if subvolumes.len() == 2));
        assert_eq!(serde_json::to_value(&storage).unwrap(), json);
        // Empty lists and false flags of another type mean "none", as they always did.
        let quiet = serde_json::json!({"type": "ext4", "subvolumes": [], "random_encryption": false});
        let spec: FsSpec = serde_json::from_value(quiet).unwrap();
        assert_eq!(spec.kind, FsType::Ext4(MountSpec::default()));
    }
}
