//! Writes the GPT (with its protective MBR) and waits for the kernel's partition nodes.

use crate::blockdev;
use crate::plan::{PartitionRole, Plan};
use anyhow::{anyhow, bail, Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types;
use std::collections::BTreeMap;
use std::time::Duration;

pub fn run(plan: &Plan) -> Result<()> {
    let path = &plan.disk.dev_path;
    let disk = blockdev::open_exclusive(path)?;
    let disk = write_gpt(disk, plan).with_context(|| format!("writing GPT to {path}"))?;
    blockdev::reread_partitions(&disk, path)?;
    drop(disk);
    let devices: Vec<String> = plan.partitions.iter().map(|p| p.device.clone()).collect();
    if std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
    {
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
        let part_type = match p.role {
            PartitionRole::BiosBoot => partition_types::BIOS,
            PartitionRole::Esp => partition_types::EFI,
            PartitionRole::Root => partition_types::LINUX_FS,
        };
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
