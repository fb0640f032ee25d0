//! Block device access without udev: exclusive opens, telling the kernel to re-read the
//! partition table, waiting for the partition nodes, and mounts that undo themselves.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

nix::ioctl_none!(blkrrpart, 0x12, 95);
nix::ioctl_none!(blkflsbuf, 0x12, 97);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// The size of a block device (BLKGETSIZE64) or of a regular file (tests use image files).
pub fn size_bytes(path: &str) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    if !is_block_device(&file) {
        return Ok(file
            .metadata()
            .with_context(|| format!("reading the size of {path}"))?
            .len());
    }
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which outlives the call.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }
        .with_context(|| format!("reading the size of {path} (BLKGETSIZE64)"))?;
    Ok(size)
}

/// Splits fstab-style options into mount(2) flags and the filesystem's own options: `noatime`,
/// `nodev` and the like are flags the kernel's filesystem parsers reject as data, and
/// `defaults`, `nofail` and `x-*` are for mount(8) and systemd only.
pub fn mount_flags(options: &[String]) -> (nix::mount::MsFlags, String) {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "defaults" | "auto" | "noauto" | "nofail" | "user" | "nouser" | "rw" | "_netdev" => {}
            "ro" => flags |= MsFlags::MS_RDONLY,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            "suid" | "dev" | "exec" | "async" | "atime" | "diratime" => {}
            other if other.starts_with("x-") || other.starts_with("comment=") => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Opens a disk for writing with O_EXCL, which the kernel refuses while anything has it
/// mounted or claimed; regular files (tests) are opened normally.
pub fn open_exclusive(path: &str) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if is_block_device_path(path) {
        options.custom_flags(libc::O_EXCL);
    }
    options
        .open(path)
        .with_context(|| format!("opening {path} for writing (exclusive: is it mounted or in use?)"))
}

/// Flushes our writes and asks the kernel to re-read the partition table.
pub fn reread_partitions(file: &File, path: &str) -> Result<()> {
    file.sync_all().with_context(|| format!("flushing {path}"))?;
    if !is_block_device(file) {
        return Ok(());
    }
    // SAFETY: both ioctls take no argument and act on the open block device only.
    unsafe { blkflsbuf(file.as_raw_fd()) }.with_context(|| format!("flushing buffers of {path}"))?;
    // The kernel can be briefly busy right after our writes; retry before giving up.
    let mut last = None;
    for _ in 0..10 {
        // SAFETY: as above.
        match unsafe { blkrrpart(file.as_raw_fd()) } {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(anyhow::anyhow!("{:?}", last))
        .with_context(|| format!("telling the kernel to re-read the partition table of {path}"))
}

fn is_block_device(file: &File) -> bool {
    file.metadata()
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
}

/// Whether `path` is a block device (a real disk) rather than an image file used by tests.
pub fn is_block_device_path(path: impl AsRef<Path>) -> bool {
    std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
}

/// Waits until the kernel knows the partitions and devtmpfs has made their nodes.
pub fn wait_for_nodes(devices: &[String], timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let missing: Vec<&String> = devices.iter().filter(|d| !Path::new(d).exists()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "partition device nodes {:?} did not appear within {}s (is devtmpfs mounted on /dev?)",
                missing,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mounted filesystem, unmounted when dropped (including on errors) so the disk is never left
/// half-used by a failed run.
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    active: bool,
}

impl Mount {
    /// Mounts with fstab-style `options` (see [`mount_flags`]).
    pub fn new(source: &str, target: &Path, fstype: &str, options: &[String]) -> Result<Mount> {
        std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
        let (flags, data) = mount_flags(options);
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .with_context(|| {
            format!(
                "mounting {source} ({fstype}, options {:?}) on {}",
                options.join(","),
                target.display()
            )
        })?;
        Ok(Mount {
            target: target.to_path_buf(),
            active: true,
        })
    }

    /// Mounts read-only, also for the kernel's own writes (pass `noload` for ext4 so a
    /// journal is not replayed): for looking at a disk without changing a byte of it.
    pub fn read_only(source: &str, target: &Path, fstype: &str, options: &str) -> Result<Mount> {
        use nix::mount::MsFlags;
        std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            (!options.is_empty()).then_some(options),
        )
        .with_context(|| format!("mounting {source} ({fstype}) read-only on {}", target.display()))?;
        Ok(Mount {
            target: target.to_path_buf(),
            active: true,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn unmount(mut self) -> Result<()> {
        self.active = false;
        nix::mount::umount(&self.target).with_context(|| format!("unmounting {}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = nix::mount::umount(&self.target) {
                log::warn!("unmounting {}: {e}", self.target.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_options_split_into_flags_and_data() {
        use nix::mount::MsFlags;
        let options: Vec<String> = [
            "defaults",
            "subvol=@nix",
            "compress=zstd",
            "noatime",
            "x-systemd.automount",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (flags, data) = mount_flags(&options);
        assert_eq!(flags, MsFlags::MS_NOATIME);
        assert_eq!(data, "subvol=@nix,compress=zstd");
        let (_, data) = mount_flags(&["size=25%".into(), "mode=755".into()]);
        assert_eq!(data, "size=25%,mode=755");
    }
}
