//! The installer from start to end: input -> config -> facts -> plan -> steps -> report.

use crate::cmdline::Params;
use crate::config::{After, Config};
use crate::error::{as_user_error, one_line, user_error};
use crate::facts::Facts;
use crate::plan::{self, Plan, PlanIds, MIB};
use crate::steps::{self, finish, Execution};
use crate::{console, pid1};
use anyhow::{Context, Result};
use std::path::Path;

/// Where the installer's input comes from.
pub struct Input {
    pub cmdline: String,
    /// `--param KEY=VALUE` given on our own command line; they win over the kernel's.
    pub extra_params: Vec<(String, String)>,
    /// Root of the initrd files (`/` in production).
    pub root: std::path::PathBuf,
}

impl Input {
    pub fn from_system(extra_params: Vec<(String, String)>, cmdline_file: Option<&Path>) -> Result<Input> {
        let path = cmdline_file.unwrap_or(Path::new("/proc/cmdline"));
        let cmdline = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Input {
            cmdline,
            extra_params,
            root: "/".into(),
        })
    }

    pub fn config(&self) -> Result<Config> {
        let mut params = Params::parse(&self.cmdline)?;
        for (key, value) in &self.extra_params {
            params.insert(key, value)?;
        }
        let layers = [
            Config::read_defaults_file(&self.root)?,
            Config::read_info_file(&self.root)?,
        ];
        let mut config = Config::assemble_layers(layers.into_iter().flatten().collect(), &params)?;
        config.find_secrets(&self.root);
        if let Some(url) = &config.config_url {
            return Err(user_error(
                format!("nixos_kexec.config_url={url} is not supported by this installer version yet."),
                "pass the runtime info with nixos_kexec.info= or as /etc/nixos-kexec/runtime-info.json in an appended initrd.",
            ));
        }
        Ok(config)
    }
}

fn print_facts(facts: &Facts) {
    console::line(&format!(
        "firmware {:?}, {} MiB RAM, kernel {}",
        facts.firmware,
        facts.ram_bytes / MIB,
        facts.kernel_release
    ));
    for disk in &facts.disks {
        console::line(&format!(
            "disk {}: {} MiB, {}-byte sectors, serial {}, by-id {}{}",
            disk.dev_path,
            disk.size_bytes / MIB,
            disk.logical_sector,
            disk.serial.as_deref().unwrap_or("-"),
            disk.by_id.first().map(String::as_str).unwrap_or("-"),
            if disk.mounted_at.is_empty() {
                ""
            } else {
                " (mounted)"
            }
        ));
    }
}

fn print_plan(plan: &Plan) -> Result<()> {
    console::line(&format!(
        "plan: install {} on {} ({} MiB, {}-byte sectors), {:?} firmware, layout {}, {} table",
        plan.hostname,
        plan.disk.dev_path,
        plan.disk.size_bytes / MIB,
        plan.disk.logical_sector,
        plan.firmware,
        plan.layout.name(),
        plan.table.name()
    ));
    for p in &plan.partitions {
        console::line(&format!(
            "plan: partition {} {}: {} MiB at {} MiB",
            p.number,
            p.name,
            p.size_bytes / MIB,
            p.start_bytes / MIB
        ));
    }
    for m in &plan.mounts {
        let options = if m.options.is_empty() {
            "defaults".to_string()
        } else {
            m.options.join(",")
        };
        console::line(&format!(
            "plan: mount {} {} on {} ({options})",
            m.fstype, m.source, m.mountpoint
        ));
    }
    for s in &plan.swaps {
        console::line(&format!(
            "plan: swap on {}{}",
            s.partition,
            if s.random_encryption {
                " (random key at every boot)"
            } else {
                ""
            }
        ));
    }
    let steps: Vec<_> = plan.steps.iter().map(|s| s.name()).collect();
    console::line(&format!("plan: steps {}", steps.join(", ")));
    console::line(&format!(
        "plan-json: {}",
        serde_json::to_string(plan).context("serialising the plan")?
    ));
    Ok(())
}

/// Builds the plan from the input without touching any disk.
pub fn make_plan(input: &Input) -> Result<(Config, Plan)> {
    // Secrets never travel on the command line, so it is safe to show; it is the first thing to
    // check when a parameter seems to be ignored.
    console::line(&format!(
        "installer kernel command line: {}",
        input.cmdline.trim()
    ));
    let config = input.config()?;
    let facts = Facts::gather()?;
    print_facts(&facts);
    let plan = plan::make(&config, &facts, &PlanIds::random())?;
    Ok((config, plan))
}

/// Runs the whole installer and prints any error (once). Returns what to do with the machine
/// afterwards.
pub fn install(input: &Input, force_dry_run: bool) -> Result<Option<After>> {
    let mut printed = false;
    let result = install_inner(input, force_dry_run, &mut printed);
    if let (Err(e), false) = (&result, printed) {
        print_error(e);
    }
    result
}

fn install_inner(input: &Input, force_dry_run: bool, printed: &mut bool) -> Result<Option<After>> {
    let passphrase_file = input
        .root
        .join(crate::config::SECRETS_DIR.trim_start_matches('/'))
        .join("disk-passphrase");
    let (config, plan) = match make_plan(input) {
        Ok(planned) => planned,
        Err(e) => {
            // Nothing will use it in this boot: a new attempt comes with a new kexec.
            steps::keys::wipe_file(&passphrase_file);
            return Err(e);
        }
    };
    print_plan(&plan)?;
    if config.dry_run || force_dry_run {
        console::line("dry run: nothing was written");
        return Ok(config.after);
    }
    let mut execution = Execution::default();
    if config.disk_passphrase_given {
        let path = passphrase_file;
        if plan.luks.is_empty() {
            // The passphrase must not outlive its use, and this layout has none.
            console::line(&format!(
                "a disk passphrase was supplied, but layout {} does not encrypt; it was discarded",
                plan.layout.name()
            ));
            steps::keys::wipe_file(&path);
        } else {
            // Read and wiped before anything is written, so a bad one stops the run early.
            execution.passphrase = Some(steps::crypt::take_passphrase(&path)?);
        }
    }
    if let Err(error) = steps::execute(&plan, &mut execution) {
        // Printed before the report is written, so install.log on the target has it too.
        print_error(&error);
        *printed = true;
        let reason = one_line(&error);
        if let Err(e) = finish::write_report(&plan, &mut execution, Some(&reason)) {
            log::warn!("could not write the failure report: {e:#}");
        }
        if let Err(e) = finish::unmount_all(&mut execution) {
            log::warn!("{e:#}");
        }
        return Err(error);
    }
    finish::unmount_all(&mut execution)?;
    if let Some(kib) = finish::peak_rss_kib() {
        console::line(&format!("agent peak RSS: {kib} KiB"));
    }
    Ok(Some(config.after.unwrap_or(After::Reboot)))
}

/// Prints an error the way the operator needs it: user errors as one paragraph, anything else
/// with its chain of context.
pub fn print_error(error: &anyhow::Error) {
    match as_user_error(error) {
        Some(user) => {
            console::line(&format!("error: {}", user.problem));
            console::line(&format!("fix: {}", user.fix));
        }
        None => console::line(&format!("error: {error:#}")),
    }
}

/// The last line of every run.
pub fn print_result(result: &Result<Option<After>>) {
    match result {
        Ok(_) => console::line("result: success"),
        Err(e) => console::line(&format!("result: failure: {}", one_line(e))),
    }
}

/// Powers off, reboots or halts. Only PID 1's installer does this.
pub fn finish_machine(after: After) -> Result<()> {
    use nix::sys::reboot::{reboot, RebootMode};
    nix::unistd::sync();
    let mode = match after {
        After::Reboot => RebootMode::RB_AUTOBOOT,
        After::Poweroff => RebootMode::RB_POWER_OFF,
        After::Halt => RebootMode::RB_HALT_SYSTEM,
    };
    reboot(mode).context("rebooting")?;
    Ok(())
}

/// The agent as `/init`.
pub fn init_main() -> ! {
    if let Err(e) = pid1::move_root_to_tmpfs() {
        // Still usable for everything but building with Nix's sandbox; say so and go on.
        eprintln!("nixos-kexec: could not move the root to a tmpfs ({e:#}); nixos-install may fail");
    }
    if let Err(e) = pid1::mount_basics() {
        eprintln!("nixos-kexec: error: {e:#}");
    }
    console::init_logging();
    // The kernel may have left a partial line (BIOS: "Probing EDD ... ok") on the console.
    eprintln!();
    console::line(&format!(
        "nixos-kexec {} starting as init",
        env!("CARGO_PKG_VERSION")
    ));
    if std::env::var_os("NIXOS_KEXEC_ROOT_MOVED").is_some() {
        console::line("root moved from the initramfs to a tmpfs (Nix's build sandbox needs pivot_root)");
    }
    if let Err(e) = pid1::load_modules() {
        log::warn!("{e:#}");
    }
    pid1::supervise(|| {
        let result = match Input::from_system(Vec::new(), None) {
            Ok(input) => install(&input, false),
            Err(e) => {
                print_error(&e);
                Err(e)
            }
        };
        print_result(&result);
        match result {
            Ok(Some(after)) => match finish_machine(after) {
                Ok(()) => 0,
                Err(e) => {
                    print_error(&e);
                    1
                }
            },
            Ok(None) => 0,
            Err(_) => 1,
        }
    })
}
