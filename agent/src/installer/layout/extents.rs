//! Where each partition starts and how large it is, in bytes on 1 MiB boundaries: sizes and
//! starts parsed, `rest` resolved, and refused when they leave the disk's usable part or overlap.

use super::checks::err_at;
use super::content::{holds_store, min_size};
use super::{PlanIds, ALIGNMENT, LUKS2_HEADER, MIN_ROOT_SIZE};
use crate::error::user_error;
use crate::installer::storage::{self, FsSpec, FsType, Storage, Table, GIB, MIB};
use crate::machine::facts::{Disk, Firmware};
use anyhow::Result;

/// GPT reserves 128 entries of 128 bytes after each header.
const GPT_ENTRIES_BYTES: u64 = 128 * 128;
/// The MBR can address 2^32 sectors (2 TiB with 512-byte sectors).
const MBR_MAX_SECTORS: u64 = 1 << 32;

pub(super) fn align_up(value: u64) -> u64 {
    value.div_ceil(ALIGNMENT) * ALIGNMENT
}

pub(super) fn align_down(value: u64) -> u64 {
    value / ALIGNMENT * ALIGNMENT
}

enum Size {
    Fixed(u64),
    Rest,
}

/// The least a partition holding `fs` may have.
fn min_partition(fs: Option<&FsSpec>, sector: u64) -> u64 {
    let Some(fs) = fs else { return MIB };
    let inner = |fs: &FsSpec| {
        let floor = if holds_store(fs) { MIN_ROOT_SIZE } else { MIB };
        min_size(&fs.kind, sector).max(floor)
    };
    match &fs.kind {
        FsType::Luks { content, .. } => LUKS2_HEADER + inner(content),
        _ => inner(fs),
    }
}

/// Where the partitions must end: before the backup GPT, or within the MBR's reach (after
/// refusing an MBR where it cannot work).
pub(super) fn usable_end(
    storage: &Storage,
    table: Table,
    disk: &Disk,
    firmware: Firmware,
    ids: &PlanIds,
) -> Result<u64> {
    let sector = disk.logical_sector as u64;
    let count = storage.partitions.len();
    if count == 0 {
        return Err(user_error(
            "storage lists no partitions.",
            "describe at least the partition that holds /.",
        ));
    }
    Ok(match table {
        Table::Mbr => {
            if firmware == Firmware::Uefi {
                return Err(user_error(
                    "table=mbr was asked for, but this machine booted with UEFI, which needs a GPT with an EFI system partition to boot from this disk.",
                    "drop table=mbr (GPT is the default and also boots BIOS machines).",
                ));
            }
            let limit = MBR_MAX_SECTORS * sector;
            if disk.size_bytes > limit {
                return Err(user_error(
                    format!(
                        "{} is {} GiB; an MBR can address only {} GiB of it ({} sectors of {sector} bytes).",
                        disk.dev_path,
                        disk.size_bytes / GIB,
                        limit / GIB,
                        MBR_MAX_SECTORS
                    ),
                    "use table=gpt (the default): it boots BIOS machines too, through the BIOS boot partition.",
                ));
            }
            if count > 4 {
                return Err(user_error(
                    format!("storage lists {count} partitions; an MBR written by this installer holds 4 (primary partitions only)."),
                    "use 4 partitions or fewer with table=mbr, or table=gpt.",
                ));
            }
            align_down(disk.size_bytes)
        }
        Table::Gpt => {
            if count > ids.partition_guids.len() {
                return Err(user_error(
                    format!(
                        "storage lists {count} partitions; this installer writes at most {}.",
                        ids.partition_guids.len()
                    ),
                    "use fewer partitions (btrfs subvolumes need none).",
                ));
            }
            // The backup GPT (entries + header) sits in the disk's last sectors.
            let backup = GPT_ENTRIES_BYTES.div_ceil(sector) * sector + sector;
            align_down(disk.size_bytes.saturating_sub(backup))
        }
    })
}

/// `(start, size)` in bytes of every partition, in the listed order: sizes and starts parsed,
/// `rest` resolved, and refused when they do not fit the disk or overlap.
pub(super) fn extents(storage: &Storage, disk: &Disk, usable_end: u64) -> Result<Vec<(u64, u64)>> {
    let sector = disk.logical_sector as u64;
    let count = storage.partitions.len();
    let overhead = disk.size_bytes - usable_end;
    let mut sizes = Vec::new();
    let mut starts = Vec::new();
    let mut rest_index = None;
    for (i, p) in storage.partitions.iter().enumerate() {
        let at = format!("partitions[{i}]");
        let size = if p.size.trim() == "rest" {
            if rest_index.replace(i).is_some() {
                return Err(err_at(
                    &at,
                    "a second partition asks for the rest of the disk",
                    "give all but one partition a fixed size.",
                ));
            }
            Size::Rest
        } else {
            let bytes = storage::parse_size(&p.size, &format!("storage: {at}: size"))?;
            if bytes == 0 {
                return Err(err_at(
                    &at,
                    "size 0",
                    "give the partition a size such as 512M, or \"rest\".",
                ));
            }
            Size::Fixed(align_up(bytes))
        };
        let start = match &p.start {
            None => None,
            Some(text) => {
                let bytes = storage::parse_size(text, &format!("storage: {at}: start"))?;
                if bytes % ALIGNMENT != 0 || bytes < ALIGNMENT {
                    return Err(err_at(
                        &at,
                        format!("start {text} is not on a 1 MiB boundary at or after 1 MiB"),
                        "start partitions at whole MiB (the first MiB holds the partition table and boot code).",
                    ));
                }
                Some(bytes)
            }
        };
        sizes.push(size);
        starts.push(start);
    }
    let explicit = starts.iter().any(Option::is_some);
    if let (true, Some(rest)) = (explicit, rest_index) {
        if rest != count - 1 {
            return Err(user_error(
                "storage: with explicit \"start\" offsets, only the last partition may ask for the rest of the disk.",
                "move the \"rest\" partition to the end, or drop the start offsets.",
            ));
        }
    }
    // Each size is below storage::MAX_SIZE, but sixteen of them can still pass u64::MAX.
    let fixed_total = sizes
        .iter()
        .map(|s| match s {
            Size::Fixed(b) => *b,
            Size::Rest => 0,
        })
        .try_fold(0u64, u64::checked_add)
        .unwrap_or(u64::MAX);
    let rest_min = rest_index.map_or(0, |i| {
        min_partition(storage.partitions[i].filesystem.as_ref(), sector)
    });
    let describe_needs = |needed: u64| {
        user_error(
            format!(
                "{} is {} MiB, too small for this layout: its partitions need at least {} MiB of disk.",
                disk.dev_path,
                disk.size_bytes / MIB,
                needed.div_ceil(MIB)
            ),
            "choose a larger disk, smaller fixed partitions (e.g. less swap), or another layout.",
        )
    };
    let mut extents = Vec::new();
    let mut cursor = ALIGNMENT;
    for (i, size) in sizes.iter().enumerate() {
        let start = starts[i].unwrap_or(cursor);
        let bytes = match size {
            Size::Fixed(b) => *b,
            Size::Rest if explicit => usable_end.saturating_sub(start),
            Size::Rest => usable_end.saturating_sub(ALIGNMENT.saturating_add(fixed_total)),
        };
        // What the layout needs, for the message only: saturating is exact enough there.
        let layout_needs = || {
            ALIGNMENT
                .saturating_add(fixed_total)
                .saturating_add(rest_min)
                .saturating_add(overhead)
        };
        if matches!(size, Size::Rest) && bytes < rest_min {
            return Err(describe_needs(layout_needs()));
        }
        let end = start.checked_add(bytes).filter(|end| *end <= usable_end);
        let Some(end) = end else {
            let needed = if explicit {
                start.saturating_add(bytes).saturating_add(overhead)
            } else {
                layout_needs()
            };
            return Err(describe_needs(needed));
        };
        extents.push((start, bytes));
        cursor = end;
    }
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by_key(|&i| extents[i].0);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if extents[a].0 + extents[a].1 > extents[b].0 {
            return Err(user_error(
                format!(
                    "storage: partitions[{a}] ({} MiB at {} MiB) and partitions[{b}] (at {} MiB) overlap.",
                    extents[a].1 / MIB,
                    extents[a].0 / MIB,
                    extents[b].0 / MIB
                ),
                "fix the start offsets and sizes so the partitions do not overlap.",
            ));
        }
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Layout;
    use crate::installer::layout::tests::{assert_refusals, custom, esp, mounts, owned, preset, text};
    use crate::installer::layout::{TYPE_ESP, TYPE_LINUX};

    #[test]
    fn mbr_is_refused_on_uefi_and_beyond_its_reach() {
        let err = preset(Layout::Ext4, Table::Mbr, 0, 8 * GIB, 512, Firmware::Uefi).unwrap_err();
        assert!(text(err).contains("UEFI"));
        let err = preset(Layout::Ext4, Table::Mbr, 0, (2 << 40) + GIB, 512, Firmware::Bios).unwrap_err();
        assert!(text(err).contains("2048 GiB"));
        // 4096-byte sectors reach 16 TiB.
        assert!(preset(Layout::Ext4, Table::Mbr, 0, 3 << 40, 4096, Firmware::Bios).is_ok());
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused_with_what_they_need() {
        for layout in Layout::PRESETS {
            for sector in [512, 4096] {
                let err = preset(layout, Table::Gpt, 0, 1200 * MIB, sector, Firmware::Uefi).unwrap_err();
                let text = text(err);
                assert!(
                    text.contains("too small") && text.contains("at least 15"),
                    "{layout:?}: {text}"
                );
            }
        }
        // Swap counts: 3 GiB of disk holds the root but not 4 GiB of swap besides.
        let err = preset(Layout::Ext4, Table::Gpt, 4 * GIB, 3 * GIB, 512, Firmware::Bios).unwrap_err();
        let text_of = text(err);
        assert!(text_of.contains("at least 5635 MiB"), "{text_of}");
        // LUKS needs room for its header on top of the root's minimum.
        let luks = preset(Layout::LuksExt4, Table::Gpt, 0, 1540 * MIB, 512, Firmware::Bios).unwrap_err();
        assert!(text(luks).contains("too small"));
        assert!(preset(Layout::Ext4, Table::Gpt, 0, 1540 * MIB, 512, Firmware::Bios).is_ok());
    }

    #[test]
    fn declarative_layout_with_start_offsets_and_data_filesystem() {
        let placed = custom(
            serde_json::json!({"partitions": [
                esp(),
                {"size": "4G", "start": "1G", "filesystem": {"type": "ext4", "label": "root", "mountpoint": "/"}},
                {"size": "rest", "filesystem": {"type": "btrfs", "mountpoint": "/srv",
                    "mount_options": ["noatime"], "subvolumes": [{"name": "data", "mountpoint": "/srv/data"}]}}
            ]}),
            Firmware::Uefi,
        )
        .unwrap();
        let extents: Vec<(u64, u64)> = placed
            .partitions
            .iter()
            .map(|p| (p.start_bytes, p.size_bytes))
            .collect();
        assert_eq!(
            extents,
            [(MIB, 512 * MIB), (GIB, 4 * GIB), (5 * GIB, 5 * GIB - MIB)]
        );
        assert_eq!(
            mounts(&placed),
            owned(&[
                ("/", "ext4", ""),
                ("/boot", "vfat", ""),
                ("/srv", "btrfs", "noatime"),
                ("/srv/data", "btrfs", "subvol=data"),
            ])
        );
        assert_eq!(placed.partitions[0].type_guid, TYPE_ESP);
        assert_eq!(placed.partitions[2].type_guid, TYPE_LINUX);
    }

    #[test]
    fn declarative_errors_name_the_problem() {
        let cases = [
            (
                serde_json::json!({"partitions": [esp(), {"size": "2G", "start": "100M",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "overlap",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "20G",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "too small",
            ),
            (
                // 2^64 - 1 MiB: aligning it up once wrapped to a 0-byte, then 16 EiB partition.
                serde_json::json!({"partitions": [esp(), {"size": "17592186044415M",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "larger than any disk",
            ),
            (
                serde_json::json!({"partitions": [esp(),
                {"size": "1048575T", "filesystem": {"type": "ext4", "mountpoint": "/"}},
                {"size": "1048575T", "filesystem": {"type": "ext4", "mountpoint": "/a"}},
                {"size": "1048575T", "filesystem": {"type": "ext4", "mountpoint": "/b"}},
                {"size": "1048575T", "filesystem": {"type": "ext4", "mountpoint": "/c"}},
                {"size": "1048575T", "filesystem": {"type": "ext4", "mountpoint": "/d"}}]}),
                "too small",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}, {"size": "rest",
                "filesystem": {"type": "swap"}}]}),
                "second partition asks for the rest",
            ),
        ];
        assert_refusals(&cases);
    }
}
