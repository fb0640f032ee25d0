//! The disk images scenarios start from, made as files on the host.

use crate::tool::tool;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// An image of `size` bytes with an old partition table and a partition, like a machine's old
/// disk: what a refusal must leave byte for byte as it was.
pub fn used_disk(dir: &Path, name: &str, size: u64) -> Result<PathBuf> {
    let path = blank_disk(dir, name, size)?;
    tool(
        "sgdisk",
        ["-n", "1:2048:+100M", "-t", "1:8300", "-c", "1:old-data"]
            .iter()
            .map(std::ffi::OsStr::new)
            .chain([path.as_os_str()]),
    )?;
    Ok(path)
}

/// A sparse, all-zero image of `size` bytes.
pub fn blank_disk(dir: &Path, name: &str, size: u64) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::File::create(&path)?.set_len(size)?;
    Ok(path)
}
