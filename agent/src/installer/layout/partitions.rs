//! The partition table entries: types for the table, names, GUIDs or MBR PARTUUIDs, devices.

use super::checks::{check_name, err_at};
use super::{partition_device, PlanIds, PlannedPartition, TYPE_BIOS_BOOT, TYPE_ESP, TYPE_LINUX, TYPE_SWAP};
use crate::installer::storage::{FsType, Storage, Table};
use crate::machine::facts::Disk;
use anyhow::Result;

/// Resolves a partition type for the table: GPT type GUID or MBR type byte.
fn partition_type(at: &str, table: Table, asked: &str) -> Result<(String, u8)> {
    let gpt = |guid: &str| Ok((guid.to_string(), 0));
    match (table, asked) {
        (Table::Gpt, "bios-boot") => gpt(TYPE_BIOS_BOOT),
        (Table::Gpt, "esp") => gpt(TYPE_ESP),
        (Table::Gpt, "linux") => gpt(TYPE_LINUX),
        (Table::Gpt, "swap") => gpt(TYPE_SWAP),
        (Table::Gpt, other) => match uuid::Uuid::parse_str(other) {
            Ok(guid) if !guid.is_nil() => Ok((guid.to_string().to_uppercase(), 0)),
            _ => Err(err_at(
                at,
                format!("partition type {other:?} is not known for GPT"),
                "use bios-boot, esp, linux, swap or a GPT type GUID.",
            )),
        },
        (Table::Mbr, "linux") => Ok((String::new(), 0x83)),
        (Table::Mbr, "swap") => Ok((String::new(), 0x82)),
        (Table::Mbr, "esp") => Ok((String::new(), 0xef)),
        (Table::Mbr, other) => {
            let byte = u8::from_str_radix(other.trim_start_matches("0x"), 16).ok();
            match byte {
                // 0 marks an unused entry, the others are extended partitions (not written).
                Some(b) if !matches!(b, 0 | 0x05 | 0x0f | 0x85) => Ok((String::new(), b)),
                _ => Err(err_at(
                    at,
                    format!("partition type {other:?} is not known for MBR (bios-boot is for GPT only)"),
                    "use linux, swap, esp or a type byte such as 0x83.",
                )),
            }
        }
    }
}

/// The partition table entries: types for the table, names, GUIDs or MBR PARTUUIDs, devices.
pub(super) fn planned_partitions(
    storage: &Storage,
    table: Table,
    extents: &[(u64, u64)],
    disk: &Disk,
    ids: &PlanIds,
) -> Result<Vec<PlannedPartition>> {
    let mut partitions = Vec::new();
    for (i, p) in storage.partitions.iter().enumerate() {
        let at = format!("partitions[{i}]");
        let number = i as u32 + 1;
        let default_type = match p.filesystem.as_ref().map(|fs| &fs.kind) {
            Some(FsType::Swap { .. }) => "swap",
            Some(FsType::Vfat(mount)) if mount.mountpoint.as_deref() == Some("/boot") => "esp",
            _ => "linux",
        };
        let (type_guid, mbr_type) =
            partition_type(&at, table, p.part_type.as_deref().unwrap_or(default_type))?;
        let name = p.name.clone().unwrap_or_else(|| format!("part{number}"));
        if table == Table::Gpt {
            check_name(&at, "partition name", &name, 36, "")?;
        }
        if table == Table::Gpt && p.bootable {
            return Err(err_at(
                &at,
                "the boot flag is an MBR thing",
                "remove \"bootable\", or use table mbr.",
            ));
        }
        let (guid, partuuid) = match table {
            Table::Gpt => {
                let guid = ids.partition_guids[i].to_lowercase();
                (guid.clone(), guid)
            }
            Table::Mbr => (String::new(), format!("{:08x}-{number:02x}", ids.mbr_signature)),
        };
        partitions.push(PlannedPartition {
            number,
            name,
            type_guid,
            mbr_type,
            bootable: p.bootable,
            guid,
            partuuid,
            start_bytes: extents[i].0,
            size_bytes: extents[i].1,
            device: partition_device(&disk.dev_path, number),
        });
    }
    Ok(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Layout;
    use crate::installer::layout::tests::preset;
    use crate::installer::storage::{GIB, MIB};
    use crate::machine::facts::Firmware;

    #[test]
    fn mbr_layouts() {
        for sector in [512, 4096] {
            // Plain root: no ESP, no BIOS boot partition; the root carries the boot flag.
            let placed = preset(Layout::Ext4, Table::Mbr, GIB, 8 * GIB, sector, Firmware::Bios).unwrap();
            let summary: Vec<(u8, bool)> = placed
                .partitions
                .iter()
                .map(|p| (p.mbr_type, p.bootable))
                .collect();
            assert_eq!(summary, [(0x82, false), (0x83, true)]);
            assert_eq!(placed.partitions[0].partuuid, "11223344-01");
            assert_eq!(placed.partitions[1].start_bytes, MIB + GIB);
            assert_eq!(
                placed.partitions[1].start_bytes + placed.partitions[1].size_bytes,
                8 * GIB
            );
            // Encrypted or in RAM: /boot on its own flagged ext4 partition.
            for layout in [
                Layout::LuksExt4,
                Layout::LuksBtrfs,
                Layout::BtrfsImpermanence,
                Layout::LuksBtrfsImpermanence,
            ] {
                let placed = preset(layout, Table::Mbr, 0, 8 * GIB, sector, Firmware::Bios).unwrap();
                assert!(placed.partitions[0].bootable);
                assert_eq!(placed.partitions[0].mbr_type, 0x83);
                let boot = placed.mounts.iter().find(|m| m.mountpoint == "/boot").unwrap();
                assert_eq!(
                    (boot.fstype.as_str(), boot.source.as_str()),
                    ("ext4", placed.partitions[0].device.as_str())
                );
                assert_eq!(placed.partitions.iter().filter(|p| p.bootable).count(), 1);
            }
            let placed = preset(Layout::Btrfs, Table::Mbr, 0, 8 * GIB, sector, Firmware::Bios).unwrap();
            assert_eq!(placed.partitions.len(), 1);
            assert!(placed.partitions[0].bootable);
        }
    }
}
