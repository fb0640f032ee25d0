//! btrfs subvolumes, created with the kernel's ioctl (`BTRFS_IOC_SUBVOL_CREATE`, include/uapi/
//! linux/btrfs.h) so the installer needs no `btrfs` program, only mkfs.btrfs.

use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::Path;

/// `BTRFS_PATH_NAME_MAX`: the name field fills the struct to 4096 bytes.
const PATH_NAME_MAX: usize = 4087;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
pub struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(subvol_create, 0x94, 14, VolArgs);

/// What the kernel takes as the name of a new subvolume: one path component, not `.` or `..`,
/// at most 255 bytes (`BTRFS_NAME_LEN`), no NUL (the ioctl's name ends at one).
pub fn check_subvolume_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) || name == "." || name == ".." {
        bail!("{name:?} cannot be a subvolume name");
    }
    Ok(())
}

/// Creates subvolume `name` in the directory `parent` (a mounted btrfs).
pub fn create_subvolume(parent: &Path, name: &str) -> Result<()> {
    check_subvolume_name(name)?;
    let dir = std::fs::File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `args` is a properly laid out btrfs_ioctl_vol_args with a NUL-terminated name,
    // alive for the call; the kernel only reads it.
    unsafe { subvol_create(dir.as_raw_fd(), &args) }
        .with_context(|| format!("creating btrfs subvolume {name} in {}", parent.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn struct_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::VolArgs>(), 4096);
    }
}
