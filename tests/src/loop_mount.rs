//! Mounting a filesystem image on the host (the tests run as root), for checks that need the
//! files themselves rather than a tool that reads the image, e.g. `nix-store --verify` on the
//! store an install made.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::tool::run_tool;

/// A filesystem image (e.g. a partition from [`crate::extract_partition`], a copy, so the
/// run's disk stays as it was) mounted read-write through a loop device on a temporary
/// directory. Dropping it unmounts it, and the loop device goes with the mount (`mount -o
/// loop` sets it to clear itself).
pub struct LoopMount {
    image: PathBuf,
    dir: tempfile::TempDir,
}

impl LoopMount {
    pub fn new(image: &Path) -> Result<LoopMount> {
        let dir = tempfile::Builder::new()
            .prefix("loop-mount-")
            .tempdir()
            .context("a directory to mount on")?;
        run_tool(
            Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(image)
                .arg(dir.path()),
        )
        .with_context(|| format!("loop-mounting {}", image.display()))?;
        Ok(LoopMount {
            image: image.to_path_buf(),
            dir,
        })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Err(e) = run_tool(Command::new("umount").arg(self.dir.path())) {
            eprintln!("unmounting {}: {e:#}", self.image.display());
        }
    }
}
