//! Creates the filesystems: FAT32 natively for the ESP, `mkfs.*` for the rest.

use crate::plan::{Filesystem, FsKind, Plan};
use crate::runner;
use anyhow::{Context, Result};
use std::process::Command;

pub fn run(plan: &Plan) -> Result<()> {
    for fs in &plan.filesystems {
        match fs.kind {
            FsKind::Vfat => format_esp(
                fs,
                plan.esp_volume_id,
                plan.disk.logical_sector,
                esp_size(plan, fs)?,
            )
            .with_context(|| format!("formatting {} as FAT32", fs.device))?,
            FsKind::Ext4 => {
                runner::run(
                    Command::new("mkfs.ext4").args(["-F", "-q", "-L", &fs.label, "-U", &fs.uuid, &fs.device]),
                )?;
            }
        }
        log::info!(
            "{} is {:?} labelled {} with UUID {}",
            fs.device,
            fs.kind,
            fs.label,
            fs.uuid
        );
    }
    Ok(())
}

fn esp_size(plan: &Plan, fs: &Filesystem) -> Result<u64> {
    plan.partitions
        .iter()
        .find(|p| p.device == fs.device)
        .map(|p| p.size_bytes)
        .context("the ESP has no partition in the plan")
}

/// FAT32 with the disk's logical sector size (the kernel will not mount a FAT whose sectors are
/// smaller than the device's) and the plan's volume id (the default is the same on every disk).
pub fn format_esp(fs: &Filesystem, volume_id: u32, sector: u32, size_bytes: u64) -> Result<()> {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fs.device)
        .with_context(|| format!("opening {}", fs.device))?;
    let mut label = [b' '; 11];
    for (slot, byte) in label.iter_mut().zip(fs.label.bytes()) {
        *slot = byte.to_ascii_uppercase();
    }
    let total_sectors = u32::try_from(size_bytes / sector as u64).context("ESP too large for FAT32")?;
    let options = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_sector(sector as u16)
        .total_sectors(total_sectors)
        .volume_id(volume_id)
        .volume_label(label);
    fatfs::format_volume(device, options).context("fatfs format_volume")?;
    Ok(())
}
