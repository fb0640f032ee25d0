//! Mounts the new filesystems under the plan's root (`/` first, parents before children) and
//! switches the swap on, so nixos-install has it on a machine with little RAM.

use super::{swap::SwapOn, Execution};
use crate::installer::plan::Plan;
use crate::machine::blockdev::Mount;
use anyhow::Result;
use std::path::Path;

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    for m in &plan.mounts {
        let target = Path::new(&plan.mount_root).join(m.mountpoint.trim_start_matches('/'));
        let mount = Mount::new(&m.source, &target, &m.fstype, &m.options)?;
        log::info!(
            "mounted {} on {} ({})",
            m.source,
            target.display(),
            m.options.join(",")
        );
        execution.mounts.push(mount);
    }
    for area in &plan.swaps {
        let on = SwapOn::on(&area.device)?;
        crate::console::line(&format!("swap on: {} for the install", on.device()));
        execution.swaps.push(on);
    }
    Ok(())
}
