//! Removes old signatures so nothing (blkid, mdadm, LVM, ZFS, the firmware) mistakes the disk
//! for what it was before: the primary and backup GPT, the MBR, and filesystem, RAID, LVM and
//! ZFS labels, which sit within the first and last MiB of the disk and of each old partition.

use crate::installer::plan::Plan;
use crate::installer::storage::MIB;
use crate::installer::way_back::DiskWrites;
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

/// Notes in `writes` the moment the disk is about to change: after it was opened (a disk in
/// use is refused unchanged), before the first write.
pub fn run(plan: &Plan, writes: &mut DiskWrites) -> Result<()> {
    let path = &plan.disk.dev_path;
    let mut disk = blockdev::open_exclusive(path)?;
    writes.begin(path);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Config;
    use crate::installer::plan::tests::{disk, facts, ids};

    /// A disk that cannot be opened is left as it was and counts as unwritten; one that
    /// opens counts as written before the first zero lands.
    #[test]
    fn the_disk_counts_as_written_from_the_first_write_on() {
        let config = Config {
            disk_auto: true,
            ..Config::default()
        };
        let mut plan =
            crate::installer::plan::make(&config, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids())
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        plan.disk.dev_path = image.to_string_lossy().into_owned();
        let mut writes = DiskWrites::default();
        assert!(run(&plan, &mut writes).is_err(), "there is no image yet");
        assert_eq!(writes.begun_on(), None);
        std::fs::write(&image, b"old signature").unwrap();
        let old = File::options().write(true).open(&image).unwrap();
        old.set_len(plan.disk.size_bytes).unwrap();
        run(&plan, &mut writes).unwrap();
        assert_eq!(writes.begun_on(), Some(plan.disk.dev_path.as_str()));
        let mut start = [1u8; 13];
        std::io::Read::read_exact(&mut File::open(&image).unwrap(), &mut start).unwrap();
        assert_eq!(start, [0u8; 13], "the wipe wrote");
    }
}
