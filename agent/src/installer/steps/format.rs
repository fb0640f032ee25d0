//! Creates what goes on the partitions: LUKS containers first (opened for the rest), then
//! FAT32 natively for the ESP, `mkfs.*` for the rest, btrfs subvolumes, and swap signatures.

use super::{crypt, swap, Execution};
use crate::installer::layout::{Filesystem, FsKind};
use crate::installer::plan::Plan;
use crate::machine::blockdev::Mount;
use crate::machine::runner;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    if !plan.luks.is_empty() {
        // Dropped (and so wiped from memory) when this step ends, however it ends.
        let passphrase = execution
            .passphrase
            .take()
            .context("the disk passphrase was not read before the format step (a bug in nixos-kexec)")?;
        for volume in &plan.luks {
            let opened = crypt::format_and_open(volume, &passphrase)
                .with_context(|| format!("encrypting {}", volume.device))?;
            execution.opened.push(opened);
            log::info!(
                "{} is LUKS2 {} with UUID {}, open at {}",
                volume.device,
                volume.name,
                volume.uuid,
                volume.open_device
            );
        }
    }
    for fs in &plan.filesystems {
        match fs.kind {
            FsKind::Vfat => format_esp(fs, plan.disk.logical_sector)
                .with_context(|| format!("formatting {} as FAT32", fs.device))?,
            FsKind::Ext4 => {
                let mut command = Command::new("mkfs.ext4");
                command.args(["-F", "-q", "-U", &fs.uuid]);
                if let Some(label) = &fs.label {
                    command.args(["-L", label]);
                }
                runner::run(command.arg(&fs.device))?;
            }
            FsKind::Btrfs => {
                let mut command = Command::new("mkfs.btrfs");
                command.args(["-f", "-q", "-U", &fs.uuid]);
                if let Some(label) = &fs.label {
                    command.args(["-L", label]);
                }
                runner::run(command.arg(&fs.device))?;
                create_subvolumes(fs)?;
            }
        }
        log::info!(
            "{} is {} labelled {} with UUID {}",
            fs.device,
            fs.kind.name(),
            fs.label.as_deref().unwrap_or("-"),
            fs.uuid
        );
    }
    for area in &plan.swaps {
        if area.random_encryption {
            execution.opened.push(crypt::open_random_swap(area)?);
        }
        swap::make(area)?;
    }
    // New filesystems: by-uuid and by-label, which fileSystems and swapDevices name.
    if crate::machine::blockdev::is_block_device_path(&plan.disk.dev_path) {
        crate::machine::devlinks::refresh().context("making /dev/disk links for the new filesystems")?;
    }
    Ok(())
}

/// Mounts the new btrfs at its top level for a moment and creates the subvolumes there.
fn create_subvolumes(fs: &Filesystem) -> Result<()> {
    if fs.subvolumes.is_empty() {
        return Ok(());
    }
    // A mount point of its own: tests format several filesystems at once, and two mounts on
    // one path would stack (the first unmount then meets the other's, busy).
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = PathBuf::from(format!(
        "/run/nixos-kexec/btrfs-top-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let top = Mount::new(&fs.device, &dir, "btrfs", &["subvolid=5".into()])?;
    for name in &fs.subvolumes {
        crate::machine::btrfs::create_subvolume(top.target(), name)?;
        log::info!("created btrfs subvolume {name} on {}", fs.device);
    }
    top.unmount()?;
    std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// FAT32 with the disk's logical sector size (the kernel will not mount a FAT whose sectors are
/// smaller than the device's) and the plan's volume id (the default is the same on every disk).
pub fn format_esp(fs: &Filesystem, sector: u32) -> Result<()> {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fs.device)
        .with_context(|| format!("opening {}", fs.device))?;
    let mut label = [b' '; 11];
    for (slot, byte) in label
        .iter_mut()
        .zip(fs.label.as_deref().unwrap_or("NO NAME").bytes())
    {
        *slot = byte.to_ascii_uppercase();
    }
    let total_sectors = u32::try_from(fs.size_bytes / sector as u64).context("ESP too large for FAT32")?;
    let volume_id = fs
        .volume_id
        .context("a FAT filesystem without a volume id in the plan (a bug in nixos-kexec)")?;
    let options = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_sector(sector as u16)
        .total_sectors(total_sectors)
        .volume_id(volume_id)
        .volume_label(label);
    fatfs::format_volume(device, options).context("fatfs format_volume")?;
    Ok(())
}
