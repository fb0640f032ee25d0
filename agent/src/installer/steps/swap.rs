//! Swap: the signature written natively (the layout of util-linux's mkswap, version 1), and
//! swapon/swapoff with the system calls, so a small machine has swap while nixos-install runs.
//! The same code serves a swap partition or mapping and the temporary swap file
//! ([`super::swap_file`]).

use crate::installer::layout::SwapArea;
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

/// The kernel reads the header from the first page; x86-64 pages are 4 KiB.
const PAGE: usize = 4096;
const SIGNATURE: &[u8; 10] = b"SWAPSPACE2";

/// The first page of a swap area of `size_bytes`: `struct swap_header` of the kernel's
/// include/linux/swap.h (version 1, no bad pages) and the signature at the page's end.
pub fn header(size_bytes: u64, uuid: &str, label: Option<&str>) -> Result<Vec<u8>> {
    let pages = size_bytes / PAGE as u64;
    if pages < 10 {
        bail!("{size_bytes} bytes is too small for swap");
    }
    let last_page = u32::try_from(pages - 1).unwrap_or(u32::MAX);
    let uuid = uuid::Uuid::parse_str(uuid).with_context(|| format!("swap UUID {uuid:?}"))?;
    let mut page = vec![0u8; PAGE];
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    // nr_badpages stays 0.
    page[1036..1052].copy_from_slice(uuid.as_bytes());
    if let Some(label) = label {
        let bytes = label.as_bytes();
        let len = bytes.len().min(15);
        page[1052..1052 + len].copy_from_slice(&bytes[..len]);
    }
    page[PAGE - SIGNATURE.len()..].copy_from_slice(SIGNATURE);
    Ok(page)
}

/// Writes the header of a swap area of `size_bytes` over the first page of `target` (a device
/// or a preallocated file), to the disk.
pub fn write_header(target: &mut File, size_bytes: u64, uuid: &str, label: Option<&str>) -> Result<()> {
    let page = header(size_bytes, uuid, label)?;
    target.seek(SeekFrom::Start(0))?;
    target.write_all(&page)?;
    target.sync_all()?;
    Ok(())
}

/// Writes the swap signature onto `swap.device`.
pub fn make(swap: &SwapArea) -> Result<()> {
    let size = crate::machine::blockdev::size_bytes(&swap.device)?;
    let mut device = std::fs::OpenOptions::new()
        .write(true)
        .open(&swap.device)
        .with_context(|| format!("opening {} for writing", swap.device))?;
    write_header(&mut device, size, &swap.uuid, swap.label.as_deref())
        .with_context(|| format!("writing the swap signature to {}", swap.device))?;
    log::info!(
        "{} is swap ({} MiB) with UUID {}",
        swap.device,
        size >> 20,
        swap.uuid
    );
    Ok(())
}

/// Swap in use; switched off when dropped (also after a failure), before its device goes.
#[derive(Debug)]
pub struct SwapOn {
    /// A block device, or a swap file's path.
    device: String,
    active: bool,
}

impl SwapOn {
    /// Switches on the swap area on `device`: a block device, or a file whose blocks are all
    /// allocated and which starts with a swap header.
    pub fn on(device: &str) -> Result<SwapOn> {
        let path = CString::new(device).context("swap device path with a NUL byte")?;
        // SAFETY: swapon reads the NUL-terminated path, which lives through the call.
        if unsafe { libc::swapon(path.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("swapon {device}"));
        }
        Ok(SwapOn {
            device: device.to_string(),
            active: true,
        })
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn off(mut self) -> Result<()> {
        self.active = false;
        swapoff(&self.device)
    }
}

fn swapoff(device: &str) -> Result<()> {
    let path = CString::new(device).context("swap device path with a NUL byte")?;
    // SAFETY: as in `on`.
    if unsafe { libc::swapoff(path.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("swapoff {device}"));
    }
    Ok(())
}

impl Drop for SwapOn {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = swapoff(&self.device) {
                log::warn!("{e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_reads_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swap.img");
        std::fs::File::create(&path).unwrap().set_len(64 << 20).unwrap();
        let swap = SwapArea {
            partition: path.to_string_lossy().into_owned(),
            device: path.to_string_lossy().into_owned(),
            uuid: "5f4dcc3b-5aa7-4d61-8d32-2b9e8e1d0a01".into(),
            label: Some("swap".into()),
            random_encryption: false,
            nix_device: String::new(),
            sector_size: 512,
        };
        make(&swap).unwrap();
        let Ok(out) = std::process::Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&path)
            .output()
        else {
            panic!("blkid is needed for this test (Debian: util-linux)");
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("TYPE=swap"), "{text}");
        assert!(
            text.contains("UUID=5f4dcc3b-5aa7-4d61-8d32-2b9e8e1d0a01"),
            "{text}"
        );
        assert!(text.contains("LABEL=swap"), "{text}");
        assert!(text.contains("VERSION=1"), "{text}");
    }
}
