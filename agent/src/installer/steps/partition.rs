//! Writes the partition table (GPT with its protective MBR, or an MBR with primary partitions
//! only) and waits for the kernel's partition nodes.

use crate::installer::plan::Plan;
use crate::installer::storage::Table;
use crate::machine::blockdev;
use anyhow::{anyhow, bail, Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use std::collections::BTreeMap;
use std::time::Duration;

pub fn run(plan: &Plan) -> Result<()> {
    let path = &plan.disk.dev_path;
    let disk = blockdev::open_exclusive(path)?;
    let disk = match plan.table {
        Table::Gpt => write_gpt(disk, plan).with_context(|| format!("writing GPT to {path}"))?,
        Table::Mbr => write_mbr(disk, plan).with_context(|| format!("writing MBR to {path}"))?,
    };
    blockdev::reread_partitions(&disk, path)?;
    drop(disk);
    let devices: Vec<String> = plan.partitions.iter().map(|p| p.device.clone()).collect();
    if blockdev::is_block_device_path(path) {
        blockdev::wait_for_nodes(&devices, Duration::from_secs(15))?;
    }
    for p in &plan.partitions {
        log::info!(
            "{} {}: {} MiB at {} MiB",
            p.device,
            p.name,
            p.size_bytes >> 20,
            p.start_bytes >> 20
        );
    }
    // New partitions, new by-partuuid names; the old partitions' links must go.
    if blockdev::is_block_device_path(path) {
        crate::machine::devlinks::refresh().context("making /dev/disk links for the new partitions")?;
    }
    Ok(())
}

/// Writes the protective MBR and both GPT copies to `disk` (a device or an image file).
pub fn write_gpt(mut disk: std::fs::File, plan: &Plan) -> Result<std::fs::File> {
    let sector = plan.disk.logical_sector as u64;
    let block_size = match sector {
        512 => LogicalBlockSize::Lb512,
        4096 => LogicalBlockSize::Lb4096,
        other => bail!("unsupported logical sector size {other}"),
    };
    // The gpt crate leaves LBA 0 alone; without a protective MBR, BIOS tools see no table.
    let sectors = plan.disk.size_bytes / sector;
    let protective_len = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    ProtectiveMBR::with_lb_size(protective_len)
        .overwrite_lba0(&mut disk)
        .context("writing the protective MBR")?;

    let guid = plan.disk_guid.parse().context("disk GUID in the plan")?;
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(block_size)
        .create_from_device(disk, Some(guid))
        .map_err(|e| anyhow!("{e}"))
        .context("creating an empty GPT")?;
    let mut entries = BTreeMap::new();
    for p in &plan.partitions {
        let part_type: gpt::partition_types::Type = uuid::Uuid::parse_str(&p.type_guid)
            .with_context(|| format!("partition type {:?} in the plan", p.type_guid))?
            .into();
        entries.insert(
            p.number,
            Partition {
                part_type_guid: part_type,
                part_guid: p.guid.parse().context("partition GUID in the plan")?,
                first_lba: p.start_bytes / sector,
                last_lba: (p.start_bytes + p.size_bytes) / sector - 1,
                flags: 0,
                name: p.name.clone(),
            },
        );
    }
    gpt.update_partitions(entries)
        .map_err(|e| anyhow!("{e}"))
        .context("adding partitions")?;
    let disk = gpt
        .write()
        .map_err(|e| anyhow!("{e}"))
        .context("writing the GPT headers")?;
    disk.sync_all().context("flushing the new partition table")?;
    Ok(disk)
}

/// The CHS address of a sector with the geometry fdisk uses (255 heads, 63 sectors a track),
/// or the "beyond CHS" marker 1023/254/63: old BIOSes, the reason for an MBR, may still look.
fn chs(lba: u64) -> mbrman::CHS {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    if lba >= 1024 * HEADS * SECTORS {
        return mbrman::CHS::new(1023, 254, 63);
    }
    mbrman::CHS::new(
        (lba / (HEADS * SECTORS)) as u16,
        ((lba / SECTORS) % HEADS) as u8,
        (lba % SECTORS + 1) as u8,
    )
}

/// Writes an MBR with primary partitions only (mbrman's logical partitions past 4 GiB corrupt
/// the first partition) to `disk`, keeping the disk signature of the plan (PARTUUIDs derive
/// from it).
pub fn write_mbr(mut disk: std::fs::File, plan: &Plan) -> Result<std::fs::File> {
    let sector = plan.disk.logical_sector as u64;
    if plan.partitions.len() > 4 {
        bail!(
            "an MBR holds 4 primary partitions, the plan has {}",
            plan.partitions.len()
        );
    }
    let mut mbr = mbrman::MBR::new_from(&mut disk, sector as u32, plan.mbr_signature.to_le_bytes())
        .map_err(|e| anyhow!("{e}"))
        .context("creating an empty MBR")?;
    for p in &plan.partitions {
        let first = p.start_bytes / sector;
        let count = p.size_bytes / sector;
        let entry = mbr
            .header
            .get_mut(p.number as usize)
            .with_context(|| format!("MBR entry {} does not exist", p.number))?;
        *entry = mbrman::MBRPartitionEntry {
            boot: if p.bootable {
                mbrman::BOOT_ACTIVE
            } else {
                mbrman::BOOT_INACTIVE
            },
            first_chs: chs(first),
            sys: p.mbr_type,
            last_chs: chs(first + count - 1),
            starting_lba: u32::try_from(first).context("partition start beyond the MBR's reach")?,
            sectors: u32::try_from(count).context("partition size beyond the MBR's reach")?,
        };
    }
    mbr.write_into(&mut disk)
        .map_err(|e| anyhow!("{e}"))
        .context("writing the MBR")?;
    disk.sync_all().context("flushing the new partition table")?;
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_like_fdisk() {
        let c = chs(2048);
        assert_eq!((c.cylinder, c.head, c.sector), (0, 32, 33));
        let c = chs(1 << 30);
        assert_eq!((c.cylinder, c.head, c.sector), (1023, 254, 63));
    }
}
