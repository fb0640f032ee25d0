//! Faults the installer must survive without harming a disk or leaving the operator with a
//! machine that rebooted before its console could be read (issue #14).

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use std::path::{Path, PathBuf};

const GIB: u64 = 1 << 30;

fn sha256(path: &Path) -> Result<String> {
    Ok(tool("sha256sum", [path.to_str().context("path")?])?
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// A disk with a partition table and a partition, like a machine's old disk.
fn old_disk(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("old.img");
    std::fs::File::create(&path)?.set_len(2 * GIB)?;
    tool(
        "sgdisk",
        [
            "-n",
            "1:2048:+100M",
            "-c",
            "1:old-data",
            path.to_str().context("path")?,
        ],
    )?;
    Ok(path)
}

/// The root moves from the initramfs to a tmpfs before anything else. When that fails the root
/// may be half gone, so the installer must stop there: no disk touched, no reboot.
#[test]
fn a_failed_root_move_stops_before_any_disk() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = old_disk(scratch.path())?;
    let before = sha256(&disk)?;
    // A file where the installer mounts its tmpfs makes the move fail at its first step.
    let blocker = scratch.path().join("blocker.cpio");
    Cpio::new()
        .file(".nixos-kexec-root", 0o644, "in the way")
        .write_to(&blocker)?;
    let out = Vm::new(&bundle)
        .name("root-move-fails")
        .disk_image(&disk, DiskBus::Virtio, 512, "OLDDISK1")
        .extra_initrd(&blocker)
        .param("nixos_kexec.disk=serial:OLDDISK1")
        .param("nixos_kexec.after=poweroff")
        .grace(std::time::Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("could not move the root from the initramfs to a tmpfs"),
        "reason: {reason}"
    );
    ensure!(
        !out.contains("starting as init"),
        "the installer went on after the failed move:\n{}",
        out.tail(30)
    );
    ensure!(!out.exited_by_itself, "a failed run must not reboot or power off");
    ensure!(sha256(&disk)? == before, "the disk changed");
    Ok(())
}
