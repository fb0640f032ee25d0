//! The end of a run: report and log on the target, unmount, sync.

use super::Execution;
use crate::console;
use crate::installer::plan::Plan;
use crate::installer::report::{Report, Run, FILE_NAME, REPORT_DIR};
use anyhow::{Context, Result};
use std::time::Instant;

/// Writes report.json and install.log under the target root, if it is mounted.
pub fn write_report(plan: &Plan, execution: &mut Execution, failure: Option<&str>) -> Result<()> {
    let Some(dir) = execution.target_path(&plan.state_path(REPORT_DIR)) else {
        log::info!("the target is not mounted; no report written to it");
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    report(plan, execution, failure, Instant::now(), peak_rss_kib()).write(&dir)?;
    if failure.is_none() {
        console::line(&format!(
            "report written to {}/{FILE_NAME} on the target",
            plan.state_path(REPORT_DIR)
        ));
    }
    super::keys::write_file(&dir.join("install.log"), console::log_text().as_bytes(), 0o600)?;
    Ok(())
}

/// The report of the run as far as it got at `now`.
pub fn report(
    plan: &Plan,
    execution: &Execution,
    failure: Option<&str>,
    now: Instant,
    agent_peak_rss_kib: Option<i64>,
) -> Report {
    let run = Run {
        host_key_fingerprints: execution.host_key_fingerprints.clone(),
        steps: execution.records_so_far(now),
        verification: execution.verification.clone(),
        agent_peak_rss_kib,
    };
    Report::new(plan, run, failure)
}

/// Switches swap off, unmounts in reverse order, closes the encrypted mappings and flushes
/// everything to the disk.
pub fn unmount_all(execution: &mut Execution) -> Result<()> {
    while let Some(swap) = execution.swaps.pop() {
        let device = swap.device().to_string();
        swap.off()?;
        console::line(&format!("swap off: {device}"));
    }
    while let Some(mount) = execution.mounts.pop() {
        mount.unmount()?;
    }
    while let Some(opened) = execution.opened.pop() {
        opened.close()?;
    }
    nix::unistd::sync();
    Ok(())
}

/// The agent's own peak resident memory (children such as mkfs are not counted).
pub fn peak_rss_kib() -> Option<i64> {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .ok()
        .map(|usage| usage.max_rss())
}
