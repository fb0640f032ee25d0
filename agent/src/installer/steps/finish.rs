//! The end of a run: report and log on the target, unmount, sync.

use super::Execution;
use crate::console;
use crate::installer::plan::Plan;
use anyhow::{Context, Result};
use serde_json::json;

pub const REPORT_DIR: &str = "var/log/nixos-kexec";

/// Writes report.json and install.log under the target root, if it is mounted.
pub fn write_report(plan: &Plan, execution: &mut Execution, failure: Option<&str>) -> Result<()> {
    let Some(dir) = execution.target_path(&plan.state_path(REPORT_DIR)) else {
        log::info!("the target is not mounted; no report written to it");
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = json!({
        "result": if failure.is_some() { "failure" } else { "success" },
        "failure": failure,
        "nixos_kexec_version": env!("CARGO_PKG_VERSION"),
        "hostname": plan.hostname,
        "firmware": plan.firmware,
        "layout": plan.layout,
        "disk": plan.disk,
        "table": plan.table,
        "partitions": plan.partitions,
        "luks": plan.luks,
        "filesystems": plan.filesystems,
        "mounts": plan.mounts,
        "swaps": plan.swaps,
        "host_key_fingerprints": execution.host_key_fingerprints,
        "steps": execution.records_so_far(),
        "verification": execution.verification,
        "agent_peak_rss_kib": peak_rss_kib(),
        "stopped_before": plan.stop_before,
    });
    let text = serde_json::to_string_pretty(&report).context("serialising the report")? + "\n";
    std::fs::write(dir.join("report.json"), text)
        .with_context(|| format!("writing {}/report.json", dir.display()))?;
    if failure.is_none() {
        console::line(&format!(
            "report written to {}/report.json on the target",
            plan.state_path(REPORT_DIR)
        ));
    }
    std::fs::write(dir.join("install.log"), console::log_text())
        .with_context(|| format!("writing {}/install.log", dir.display()))?;
    Ok(())
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
