//! Executing a plan: one module per step, run in order, each timed and reported.

pub mod crypt;
pub mod extra_files;
pub mod finish;
pub mod flake;
pub mod format;
pub mod install;
pub mod keys;
pub mod mount;
pub mod partition;
pub mod swap;
pub mod swap_file;
pub mod token_file;
pub mod verify;
pub mod wipe;

use crate::console;
use crate::input::config::Step;
use crate::installer::phone_home::PhoneHome;
use crate::installer::plan::Plan;
use crate::installer::report::{Check, Report, StepRecord};
use crate::installer::status::{self, Status};
use crate::installer::way_back::DiskWrites;
use crate::machine::blockdev::Mount;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// State the steps share: what is switched on, mounted and opened (undone when dropped, in
/// reverse), and what the report needs.
#[derive(Default)]
pub struct Execution {
    /// Read (and its file wiped) before the first step when the plan encrypts; the format step
    /// takes it and drops it after use.
    pub passphrase: Option<crypt::Passphrase>,
    /// Read (and its file wiped) before the first step when a flake access token came; the
    /// install step hands it to Nix ([`token_file`]) and drops it.
    pub access_token: Option<crate::input::access_token::AccessToken>,
    /// Swap switched on for the install.
    pub swaps: Vec<swap::SwapOn>,
    pub mounts: Vec<Mount>,
    /// LUKS and plain dm-crypt mappings.
    pub opened: Vec<crypt::Opened>,
    /// The installer's network as the kernel reports it after the network step.
    pub network_facts: Option<crate::network::facts::NetworkFacts>,
    /// The runtime-info network already applied before planning (for SSH and config_url).
    pub network_applied: Option<crate::input::runtime_info::Network>,
    pub records: Vec<StepRecord>,
    /// The step running now, so a report written during it (finish, or after a failure)
    /// includes it.
    pub current: Option<(Step, Instant)>,
    pub host_key_fingerprints: Vec<String>,
    /// The post-install checks, once the verify step ran.
    pub verification: Vec<Check>,
    /// Set by the wipe step right before its first write: whether a failure may reboot.
    pub disk_writes: DiskWrites,
    /// The report as last written to the target, for the final event to report_url.
    pub report: Option<Report>,
}

impl Drop for Execution {
    /// After a failure: swap off, unmount children before parents, then close the mappings
    /// (each guard undoes itself when dropped; a Vec would drop its first element first).
    fn drop(&mut self) {
        while self.swaps.pop().is_some() {}
        while self.mounts.pop().is_some() {}
        while self.opened.pop().is_some() {}
    }
}

impl Execution {
    /// Finished steps plus the one in progress at `now` (not `ok` yet).
    pub fn records_so_far(&self, now: Instant) -> Vec<StepRecord> {
        let mut records = self.records.clone();
        if let Some((step, start)) = self.current {
            records.push(StepRecord {
                step,
                seconds: now.saturating_duration_since(start).as_secs_f64(),
                ok: step == Step::Finish,
            });
        }
        records
    }

    pub fn target_root(&self) -> Option<&Path> {
        self.mounts.first().map(Mount::target)
    }

    pub fn target_path(&self, relative: &str) -> Option<PathBuf> {
        self.target_root()
            .map(|root| root.join(relative.trim_start_matches('/')))
    }
}

/// Runs every planned step, each reported to `phone_home` as it ends; stops at the first
/// failure and returns it.
pub fn execute(plan: &Plan, execution: &mut Execution, phone_home: &mut PhoneHome) -> Result<()> {
    let total = plan.steps.len();
    for (index, step) in plan.steps.iter().enumerate() {
        console::line(&format!("[{}/{total}] {} ...", index + 1, step.name()));
        status::record(Status::Step {
            step: *step,
            number: index + 1,
            total,
        });
        let start = Instant::now();
        execution.current = Some((*step, start));
        let result = run_step(*step, plan, execution).with_context(|| format!("step {}", step.name()));
        let seconds = start.elapsed().as_secs_f64();
        execution.current = None;
        let record = StepRecord {
            step: *step,
            seconds,
            ok: result.is_ok(),
        };
        if record.ok {
            console::line(&format!(
                "[{}/{total}] {} done in {seconds:.1}s",
                index + 1,
                step.name()
            ));
        }
        phone_home.step(index + 1, total, &record);
        execution.records.push(record);
        result?;
    }
    Ok(())
}

fn run_step(step: Step, plan: &Plan, execution: &mut Execution) -> Result<()> {
    match step {
        Step::Network => network(plan, execution),
        Step::Wipe => {
            // The last moment before the disk changes: refuse now what would fail later.
            install::check_network_before_wiping(plan)?;
            install::check_caches_before_wiping(plan)?;
            flake::check_before_wiping(plan)?;
            wipe::run(plan, &mut execution.disk_writes)
        }
        Step::Partition => partition::run(plan),
        Step::Format => format::run(plan, execution),
        Step::Mount => mount::run(plan, execution),
        Step::Keys => keys::run(plan, execution),
        Step::Flake => flake::run(plan, execution),
        Step::ExtraFiles => extra_files::run(plan, execution),
        Step::Install => {
            // No swap file for a bundle that cannot install.
            install::check_program(plan)?;
            swap_file::while_installing(plan, || install::run(plan, execution))
        }
        Step::Verify => verify::run(plan, execution),
        Step::Finish => finish::run(plan, execution),
    }
}

/// Brings the installer's network up as the rescue system had it, interfaces matched by MAC.
fn network(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let Some(network) = &plan.network else {
        return Ok(());
    };
    if execution.network_applied.as_ref() == Some(network) {
        log::info!("network: already up (applied before planning)");
        return Ok(());
    }
    execution.network_facts = Some(crate::network::apply::apply(network)?);
    Ok(())
}
