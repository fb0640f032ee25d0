//! Removes old signatures so nothing (blkid, mdadm, LVM, ZFS, the firmware) mistakes the disk
//! for what it was before: the primary and backup GPT, the MBR, and filesystem, RAID, LVM and
//! ZFS labels, which sit within the first and last MiB of the disk and of each old partition.

use crate::installer::plan::Plan;
use crate::installer::storage::MIB;
use crate::machine::blockdev;
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

/// btrfs keeps superblock copies at 64 MiB and 256 GiB into the device.
const BTRFS_MIRRORS: [u64; 2] = [64 * MIB, 256 << 30];

pub fn ranges(plan: &Plan) -> Vec<(u64, u64)> {
    let size = plan.disk.size_bytes;
    let mut ranges = vec![(0, MIB.min(size)), (size.saturating_sub(MIB), MIB.min(size))];
    for &(start, len) in &plan.disk.old_partitions {
        ranges.push((start, MIB.min(len)));
        ranges.push((start + len.saturating_sub(MIB), MIB.min(len)));
        for mirror in BTRFS_MIRRORS {
            if mirror + 4096 <= len {
                ranges.push((start + mirror, 4096));
            }
        }
    }
    for mirror in BTRFS_MIRRORS {
        if mirror + 4096 <= size {
            ranges.push((mirror, 4096));
        }
    }
    ranges.retain(|&(start, len)| len > 0 && start + len <= size);
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

pub fn run(plan: &Plan) -> Result<()> {
    let path = &plan.disk.dev_path;
    let mut disk = blockdev::open_exclusive(path)?;
    for (start, len) in ranges(plan) {
        zero(&mut disk, start, len)
            .with_context(|| format!("zeroing {len} bytes at offset {start} of {path}"))?;
    }
    blockdev::reread_partitions(&disk, path)?;
    log::info!("wiped old signatures on {path}");
    Ok(())
}

fn zero(disk: &mut File, start: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; MIB as usize];
    disk.seek(SeekFrom::Start(start))?;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(MIB) as usize;
        disk.write_all(&zeros[..chunk])?;
        left -= chunk as u64;
    }
    Ok(())
}
