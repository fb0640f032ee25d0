//! The end of a run: report and log on the target, the marker an encrypted root keeps outside
//! the encryption, unmount, sync.

use super::{crypt, Execution};
use crate::console;
use crate::installer::plan::Plan;
use crate::installer::report::{Marker, Report, Run, Summary, FILE_NAME, REPORT_DIR};
use anyhow::{Context, Result};
use std::time::{Instant, SystemTime};

/// The finish step of a run that got this far: the report, then the marker. Each vouches for
/// what was written before it, so that reaches the disk first: after a power cut the reinstall
/// guard must never find a finished install that is not all there. Until a sync, what
/// nixos-install wrote may be in RAM only (Nix does not fsync store paths, nor do the boot
/// loader's installers their menu on the ESP), while cryptsetup writes the marker to the disk
/// at once.
pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    nix::unistd::sync();
    match write_report(plan, execution, None)? {
        Some(summary) => {
            nix::unistd::sync();
            mark_encrypted(plan, &summary)
        }
        None => Ok(()),
    }
}

/// Writes report.json and install.log under the target root, if it is mounted; returns the
/// summary written.
pub fn write_report(
    plan: &Plan,
    execution: &mut Execution,
    failure: Option<&str>,
) -> Result<Option<Summary>> {
    let Some(dir) = execution.target_path(&plan.state_path(REPORT_DIR)) else {
        log::info!("the target is not mounted; no report written to it");
        return Ok(None);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = report(plan, execution, failure, Instant::now(), peak_rss_kib());
    report.write(&dir)?;
    let summary = report.summary.clone();
    execution.report = Some(report);
    if failure.is_none() {
        console::line(&format!(
            "report written to {}/{FILE_NAME} on the target",
            plan.state_path(REPORT_DIR)
        ));
    }
    super::keys::write_file(&dir.join("install.log"), console::log_text().as_bytes(), 0o600)?;
    Ok(Some(summary))
}

/// The report the run ends with, for report_url: the one written to the target, or, when none
/// that tells this ending could be written, the one that would have been.
pub fn final_report(plan: &Plan, execution: &Execution, failure: Option<&str>) -> Report {
    execution
        .report
        .clone()
        .filter(|written| written.summary.failure.as_deref() == failure)
        .unwrap_or_else(|| report(plan, execution, failure, Instant::now(), peak_rss_kib()))
}

/// Leaves the [`Marker`] of a finished run in the LUKS2 header of every container the plan
/// made, for the reinstall guard of a later boot: the report is inside, out of its reach
/// without the passphrase. The header rather than a file on the ESP or /boot: it is there
/// whatever the firmware and partition table (an MBR disk has no ESP, a custom layout may
/// have no separate /boot), it is read from the first 4 KiB of the partition with no
/// filesystem to mount, and it lives exactly as long as the install it describes: a file
/// elsewhere would outlive a root that was reformatted, and stop the next install for
/// nothing. The subsystem field is inert: nothing reads it at boot (the label would be
/// the wrong field, as udev makes /dev/disk/by-label links from it). Written last, so a run
/// that fails before never has a marker: luksFormat made the header empty.
fn mark_encrypted(plan: &Plan, summary: &Summary) -> Result<()> {
    let Some(marker) = Marker::finished(summary, SystemTime::now()) else {
        return Ok(());
    };
    let text = marker.to_text();
    for (index, volume) in plan.luks.iter().enumerate() {
        if let Err(e) = crypt::set_subsystem(&volume.device, &text) {
            // The run fails now, so no header may keep saying it finished.
            for done in &plan.luks[..index] {
                if let Err(e) = crypt::set_subsystem(&done.device, "") {
                    log::warn!("clearing the marker on {}: {e:#}", done.device);
                }
            }
            return Err(e.context(format!("marking {} as a finished install", volume.device)));
        }
        console::line(&format!(
            "LUKS2 header of {} marked as a finished install: {text}",
            volume.device
        ));
    }
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
