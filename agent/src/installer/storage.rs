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
use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1 << 20;

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

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpec {
    /// `vfat`, `ext4`, `btrfs`, `swap` or `luks`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// `fileSystems.<mountpoint>.neededForBoot`: mounted by the initrd.
    #[serde(default, skip_serializing_if = "is_false")]
    pub needed_for_boot: bool,
    /// btrfs only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subvolumes: Vec<SubvolumeSpec>,
    /// swap only: a new random key at every boot (`randomEncryption.enable`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub random_encryption: bool,
    /// luks only: the device-mapper name (`/dev/mapper/<name>`, `boot.initrd.luks.devices.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// luks only: what is inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<Box<FsSpec>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubvolumeSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub needed_for_boot: bool,
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
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

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
        assert!(err.to_string().contains("mountpiont"), "{err}");
    }
}
