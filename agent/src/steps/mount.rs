//! Mounts the new filesystems under the plan's root (`/` first, then `/boot`).

use super::Execution;
use crate::blockdev::Mount;
use crate::plan::{FsKind, Plan};
use anyhow::Result;
use std::path::Path;

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    for fs in &plan.filesystems {
        let target = Path::new(&plan.mount_root).join(fs.mountpoint.trim_start_matches('/'));
        let fstype = match fs.kind {
            FsKind::Vfat => "vfat",
            FsKind::Ext4 => "ext4",
        };
        let mount = Mount::new(&fs.device, &target, fstype, &fs.mount_options.join(","))?;
        log::info!("mounted {} on {}", fs.device, target.display());
        execution.mounts.push(mount);
    }
    Ok(())
}
