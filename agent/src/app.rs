//! The installer from start to end: input -> network (DHCP when nothing describes it) ->
//! config_url -> config -> facts -> plan -> steps -> report.

use crate::console;
use crate::error::{as_user_error, one_line, user_error};
use crate::input::access_token::{self, AccessToken};
use crate::input::cmdline::Params;
use crate::input::config::{After, Config, DiskChoice, Layers, Step};
use crate::input::fetch::{self, MachineVars};
use crate::input::runtime_info::Network;
use crate::installer::layout::PlanIds;
use crate::installer::phone_home::PhoneHome;
use crate::installer::plan::{self, Plan};
use crate::installer::ssh_server;
use crate::installer::status::{self, RunResult, Status, StatusFile};
use crate::installer::steps::swap_file::TemporarySwap;
use crate::installer::steps::{self, finish, Execution};
use crate::installer::storage::MIB;
use crate::installer::way_back::{self, AfterFailure, DiskWrites, FailureReboot};
use crate::machine::facts::Facts;
use crate::machine::pid1;
use crate::network::dhcp;
use crate::network::facts::NetworkFacts;
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

    /// The kernel's parameters with our own `--param`s on top.
    pub fn params(&self) -> Result<Params> {
        let mut params = Params::parse(&self.cmdline)?;
        for (key, value) in &self.extra_params {
            params.insert(key, value)?;
        }
        Ok(params)
    }
}

/// Whether preparing the plan may change this machine's network (the installer) or must use
/// it as it is (`nixos-kexec plan` on a running system).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// The installer that is the machine's init: brings the network up and then opens the
    /// installer's SSH server to the operator.
    Installer,
    /// `nixos-kexec install` on a running system: brings the network up, and leaves the
    /// system's SSH port alone.
    BringUp,
    AsIs,
}

/// The network as it is before the config is complete.
#[derive(Default)]
pub struct EarlyNetwork {
    /// A runtime-info network applied early because config_url needed it; the network step
    /// does not apply it again.
    pub applied: Option<Network>,
    /// The kernel's view afterwards.
    pub facts: Option<NetworkFacts>,
    /// What DHCP did when no runtime info described the network.
    pub dhcp: Option<dhcp::Outcome>,
}

pub struct Prepared {
    pub config: Config,
    pub plan: Plan,
    pub network: EarlyNetwork,
}

/// Where partitions are mounted (read-only) to look for an earlier install's report.
const PROBE_DIR: &str = "/run/nixos-kexec/probe";

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
    for previous in &facts.previous_installs {
        console::line(&format!("earlier install found: {}", previous.describe()));
    }
}

fn print_plan(plan: &Plan, label: &str) -> Result<()> {
    console::line(&format!(
        "{label}: install {} on {} ({} MiB, {}-byte sectors), {:?} firmware, layout {}, {} table",
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
            "{label}: partition {} {}: {} MiB at {} MiB",
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
            "{label}: mount {} {} on {} ({options})",
            m.fstype, m.source, m.mountpoint
        ));
    }
    for s in &plan.swaps {
        console::line(&format!(
            "{label}: swap on {}{}",
            s.partition,
            if s.random_encryption {
                " (random key at every boot)"
            } else {
                ""
            }
        ));
    }
    match &plan.temporary_swap {
        TemporarySwap::File { path, size_bytes, .. } => console::line(&format!(
            "{label}: swap file {} MiB at {path} during the install, removed afterwards",
            size_bytes / MIB
        )),
        TemporarySwap::NoRoom { why } => {
            console::line(&format!("{label}: no swap file for the install: {why}"))
        }
        TemporarySwap::NotNeeded { .. } => {}
    }
    if let Some(extra) = &plan.extra_files {
        console::line(&format!(
            "{label}: extra files: {} to {} on the target (listed in the plan JSON)",
            extra.tree.summary(),
            extra.destination
        ));
    }
    if let Some(previous) = &plan.replaces {
        console::line(&format!(
            "{label}: nixos_kexec.reinstall: replacing what is there: {}",
            previous.describe()
        ));
    }
    let steps: Vec<_> = plan.steps.iter().map(|s| s.name()).collect();
    console::line(&format!("{label}: steps {}", steps.join(", ")));
    console::line(&format!(
        "{label}-json: {}",
        serde_json::to_string(plan).context("serialising the plan")?
    ));
    Ok(())
}

fn describe_nics(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Brings the network up before the config is complete, as far as it is needed now:
/// - no runtime-info network: DHCP and router advertisements on every NIC with a link (PXE,
///   GRUB console). Without a lease the installer goes on, unless config_url needs the
///   network; the install step checks again before the disk is wiped.
/// - a runtime-info network: apply it now, before planning (which may refuse): the
///   operator's SSH login, config_url's fetch and report_url's first event need it.
fn bring_up_network(first: &Config) -> Result<EarlyNetwork> {
    match (first.network(), &first.config_url) {
        (Some(network), _) => {
            log::info!("network: applying the runtime info's network before planning");
            let facts = crate::network::apply::apply(network)?;
            Ok(EarlyNetwork {
                applied: Some(network.clone()),
                facts: Some(facts),
                dhcp: None,
            })
        }
        (None, url) => {
            let outcome = match dhcp::bring_up(&dhcp::Options::default()) {
                Ok(outcome) => outcome,
                Err(e) if url.is_none() => {
                    log::warn!("network: DHCP could not run: {e:#}");
                    dhcp::Outcome::default()
                }
                Err(e) => return Err(e.context("bringing the network up for nixos_kexec.config_url")),
            };
            let usable =
                !outcome.leases.is_empty() || outcome.facts.routes.iter().any(|r| r.destination.is_none());
            if !usable {
                let what = if outcome.tried.is_empty() && outcome.no_carrier.is_empty() {
                    "this machine has no network interface (with a driver in the installer)".to_string()
                } else if outcome.tried.is_empty() {
                    format!(
                        "no network interface has a link (without a link: {})",
                        describe_nics(&outcome.no_carrier)
                    )
                } else {
                    format!(
                        "no DHCP lease and no router advertisement on {}",
                        describe_nics(&outcome.tried)
                    )
                };
                if let Some(url) = url {
                    return Err(user_error(
                        format!(
                            "nixos_kexec.config_url={} needs the network, but {what}.",
                            crate::input::http::redact(url)
                        ),
                        "connect the machine to a network with a DHCP server (the one that answered PXE will do), or describe its network in nixos_kexec.info= (network.interfaces).",
                    ));
                }
                console::line(&format!(
                    "network: {what}; going on without a network (only the install step needs one)"
                ));
            }
            Ok(EarlyNetwork {
                applied: None,
                facts: Some(outcome.facts.clone()),
                dhcp: Some(outcome),
            })
        }
    }
}

/// The values `${...}` in a config URL can take on this machine.
fn machine_vars(first: &Config, network: &EarlyNetwork) -> Result<MachineVars> {
    let (serial, uuid) = MachineVars::read_dmi(Path::new("/"));
    let dhcp = network.dhcp.as_ref();
    let mac = match (dhcp, &network.facts) {
        (Some(outcome), _) => outcome.primary_mac(),
        (None, Some(facts)) => dhcp::primary_mac(facts, &[]),
        // `nixos-kexec plan` on a running system: its network as it is.
        (None, None) => dhcp::primary_mac(&crate::network::facts::gather()?, &[]),
    };
    Ok(MachineVars {
        mac: mac.map(|m| m.to_string()),
        serial,
        uuid,
        // Named on purpose (parameter or runtime info) wins over what DHCP says.
        hostname: first
            .runtime_info
            .hostname
            .clone()
            .or_else(|| dhcp.and_then(dhcp::Outcome::hostname)),
    })
}

/// Reads the input's parameters and the runtime-info files in the initrd, as layers.
pub fn read_layers(input: &Input) -> Result<Layers> {
    // Secrets never travel on the command line, so it is safe to show; it is the first thing to
    // check when a parameter seems to be ignored.
    console::line(&format!(
        "installer kernel command line: {}",
        input.cmdline.trim()
    ));
    Layers::read(&input.root, &input.params()?)
}

/// From the input's layers: brings up what the network needs to be for them (see
/// [`bring_up_network`]), fetches config_url, starts `phone_home` when the installer has a
/// report_url, gathers facts and makes the plan.
pub fn prepare(
    input: &Input,
    layers: &Layers,
    mode: NetworkMode,
    phone_home: &mut PhoneHome,
) -> Result<Prepared> {
    // Everything given locally is checked before the network is touched.
    let first = layers.config(None)?;
    let network = match mode {
        NetworkMode::Installer | NetworkMode::BringUp => bring_up_network(&first)?,
        NetworkMode::AsIs => EarlyNetwork::default(),
    };
    // The operator's way in, once the network is up and the authorized keys are known: now,
    // unless config_url is to bring them.
    let ssh_now = first.config_url.is_none() || !first.ssh_authorized_keys().is_empty();
    if mode == NetworkMode::Installer && ssh_now {
        ssh_server::open(&first, &input.root);
    }
    let fetched = match &first.config_url {
        Some(url) => Some(fetch::runtime_info(
            url,
            &machine_vars(&first, &network)?,
            &crate::input::http::Options::default(),
        )?),
        None => None,
    };
    let mut config = layers.config(fetched)?;
    if mode == NetworkMode::Installer && !ssh_now {
        ssh_server::open(&config, &input.root);
    }
    let reporting = mode != NetworkMode::AsIs && !config.dry_run;
    if let Some(url) = config.runtime_info.report_url.as_ref().filter(|_| reporting) {
        // Not fatal: a run that could not name the machine still installs.
        let vars = machine_vars(&config, &network).unwrap_or_else(|e| {
            log::warn!("report_url: {e:#}");
            MachineVars::default()
        });
        *phone_home = PhoneHome::start(url, &vars, config.hostname());
    }
    // After the SSH server: booted without a host key, it made the one the keys step installs.
    config.find_secrets(&input.root);
    config.find_extra_files(&input.root)?;
    // The links udev would have made: the plan and the installed system's config name disks
    // by them, and grub-install in nixos-install's chroot opens them. Not fatal here: a plan
    // that names /dev/vda works without them, and the partition step makes them again.
    if mode != NetworkMode::AsIs {
        if let Err(e) = crate::machine::devlinks::refresh() {
            log::warn!("devices: could not make the /dev/disk links: {e:#}");
        }
    }
    let mut facts = Facts::gather()?;
    // Mounting (read-only) to look is for the installer; `nixos-kexec plan` on a running
    // system leaves its disks alone.
    if mode != NetworkMode::AsIs {
        crate::installer::previous::find_on_disks(&mut facts, Path::new(PROBE_DIR));
    }
    print_facts(&facts);
    if config.disk() == DiskChoice::Unspecified && plan::eligible_disks(&facts).len() == 1 {
        // The operator only has to confirm: show what confirming with `auto` would do.
        let auto = Config {
            disk_auto: true,
            ..config.clone()
        };
        match plan::make(&auto, &facts, &PlanIds::random()) {
            Ok(plan) => print_plan(&plan, "plan with nixos_kexec.disk=auto")?,
            Err(e) => console::line(&format!("with nixos_kexec.disk=auto: {}", one_line(&e))),
        }
    }
    let plan = plan::make(&config, &facts, &PlanIds::random())?;
    Ok(Prepared {
        config,
        plan,
        network,
    })
}

/// Builds the plan from the input without touching any disk or the network configuration.
pub fn make_plan(input: &Input) -> Result<(Config, Plan)> {
    let prepared = prepare(
        input,
        &read_layers(input)?,
        NetworkMode::AsIs,
        &mut PhoneHome::default(),
    )?;
    Ok((prepared.config, prepared.plan))
}

/// The installer's options on our own command line (`nixos-kexec plan` and `install`); the doc
/// comments are their `--help`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InputArgs {
    /// Installer parameter KEY=VALUE (KEY without the nixos_kexec. prefix); repeatable.
    #[arg(long = "param", value_parser = crate::input::cmdline::param_option)]
    pub params: Vec<(String, String)>,
    /// Read kernel parameters from this file instead of /proc/cmdline.
    #[arg(long)]
    pub cmdline_file: Option<std::path::PathBuf>,
}

/// An installer run that failed, with its plan and execution when the steps had begun (the
/// failure report needs them, and the way back needs to know whether a disk was written), and
/// the operator's `failure_reboot_after` once the layers were read (the default before).
struct Failed {
    error: anyhow::Error,
    started: Option<Box<(Plan, Execution)>>,
    failure_reboot: FailureReboot,
}

impl From<anyhow::Error> for Failed {
    fn from(error: anyhow::Error) -> Failed {
        Failed {
            error,
            started: None,
            failure_reboot: FailureReboot::default(),
        }
    }
}

impl Failed {
    /// Prints the error, leaves the failure report on the target when it is mounted, sends the
    /// `failed` event to report_url, and decides what becomes of the machine.
    fn conclude(self, phone_home: &mut PhoneHome) -> (anyhow::Error, AfterFailure) {
        let Failed {
            error,
            started,
            failure_reboot,
        } = self;
        print_error(&error);
        let reason = one_line(&error);
        let mut writes = DiskWrites::default();
        let mut report = None;
        if let Some(started) = started {
            let (plan, mut execution) = *started;
            writes = std::mem::take(&mut execution.disk_writes);
            if let Err(e) = finish::write_report(&plan, &mut execution, Some(&reason)) {
                log::warn!("could not write the failure report: {e:#}");
            }
            report = Some(finish::final_report(&plan, &execution, Some(&reason)));
            if let Err(e) = finish::unmount_all(&mut execution) {
                log::warn!("{e:#}");
            }
        }
        phone_home.failed(&reason, report);
        (error, AfterFailure::decide(failure_reboot, &writes))
    }
}

/// The installer on this system (`/init`, `nixos-kexec install`): reads the input, installs,
/// and ends with the result line. It prints its error itself, once, as it happens: install.log
/// on the target must have it before the failure report is written. Returns what to do with
/// the machine afterwards; after a failure, what the way back would do, which only PID 1's
/// installer carries out ([`leave_after_failure`]). `mode` is [`NetworkMode::Installer`] or
/// [`NetworkMode::BringUp`].
pub fn install(args: InputArgs, mode: NetworkMode) -> Result<Option<After>, AfterFailure> {
    status::record(Status::Preparing);
    let mut phone_home = PhoneHome::default();
    let result = Input::from_system(args.params, args.cmdline_file.as_deref())
        .map_err(Failed::from)
        .and_then(|input| install_inner(&input, mode, &mut phone_home));
    let (outcome, shown) = match result {
        Ok(after) => (Ok(after), Ok(())),
        Err(failed) => {
            let (error, then) = failed.conclude(&mut phone_home);
            (Err(then), Err(error))
        }
    };
    print_result(&shown);
    status::record(Status::Finished {
        result: RunResult::of(&shown).text(),
    });
    outcome
}

/// Says what a failed run does with the machine and, when no disk was written, waits out the
/// grace period and reboots: a kexec'd machine goes back to the system it came from, a
/// network-booted one tries its boot again. Returns when the machine stays.
fn leave_after_failure(then: &AfterFailure) {
    console::line(&then.announcement());
    if let AfterFailure::Reboot(grace) = then {
        let stay_file = Path::new(way_back::STAY_FILE);
        if way_back::count_down(*grace, stay_file) == way_back::CountDown::StayAsked {
            console::line("reboot: cancelled from an SSH session (nixos-kexec stay); the installer stays up");
            return;
        }
        console::line("reboot: now");
        if let Err(e) = finish_machine(After::Reboot) {
            print_error(&e);
        }
    }
}

/// Runs the install; whatever way it fails, the secrets it was given (host keys, passphrase,
/// and the extra files, any of which may be one) are wiped from RAM: nothing in this boot will
/// use them, and a new attempt comes with a new kexec that brings them again.
fn install_inner(
    input: &Input,
    mode: NetworkMode,
    phone_home: &mut PhoneHome,
) -> Result<Option<After>, Failed> {
    let secrets = input
        .root
        .join(crate::input::config::SECRETS_DIR.trim_start_matches('/'));
    let result = install_with_secrets(input, &secrets, mode, phone_home);
    if result.is_err() {
        steps::keys::wipe_dir(&secrets);
        steps::extra_files::wipe_source(
            &input
                .root
                .join(crate::input::config::EXTRA_FILES_DIR.trim_start_matches('/')),
        );
    }
    result
}

fn install_with_secrets(
    input: &Input,
    secrets: &Path,
    mode: NetworkMode,
    phone_home: &mut PhoneHome,
) -> Result<Option<After>, Failed> {
    let layers = read_layers(input)?;
    let failure_reboot = layers.failure_reboot_after();
    // Every failure from here on gets the operator's choice.
    install_from(input, &layers, secrets, mode, phone_home).map_err(|failed| Failed {
        failure_reboot,
        ..failed
    })
}

fn install_from(
    input: &Input,
    layers: &Layers,
    secrets: &Path,
    mode: NetworkMode,
    phone_home: &mut PhoneHome,
) -> Result<Option<After>, Failed> {
    let passphrase_file = secrets.join("disk-passphrase");
    let Prepared {
        config,
        plan,
        network,
    } = prepare(input, layers, mode, phone_home)?;
    print_plan(&plan, "plan")?;
    if config.dry_run {
        console::line("dry run: nothing was written");
        return Ok(config.after);
    }
    let mut execution = Execution::default();
    execution.network_applied = network.applied;
    execution.network_facts = network.facts;
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
    if config.flake_token_given {
        // Read, checked and wiped before anything is written, as the passphrase is.
        let token = AccessToken::take(&secrets.join(access_token::SECRET_NAME))?;
        if plan.steps.contains(&Step::Install) {
            execution.access_token = Some(token);
        } else {
            console::line(
                "a flake access token was supplied, but the install step is not planned; it was discarded",
            );
        }
    }
    if let Err(error) = steps::execute(&plan, &mut execution, phone_home) {
        return Err(Failed {
            error,
            started: Some(Box::new((plan, execution))),
            failure_reboot: FailureReboot::default(),
        });
    }
    finish::unmount_all(&mut execution)?;
    if let Some(kib) = finish::peak_rss_kib() {
        console::line(&format!("agent peak RSS: {kib} KiB"));
    }
    phone_home.finished(finish::final_report(&plan, &execution, None));
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
pub fn print_result<T>(result: &Result<T>) {
    console::line(&RunResult::of(result).line());
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
    console::init_logging();
    if let Err(e) = pid1::move_root_to_tmpfs() {
        // Part of the root may already be gone (files are deleted as they are copied): nothing
        // that runs from here on can be trusted, and no disk has been touched yet.
        let _ = pid1::mount_basics();
        // No parameter has been read: the default grace period.
        pid1::stop(
            &format!(
                "could not move the root from the initramfs to a tmpfs: {e:#}. No disk was touched. Boot the installer again (a machine with more RAM if the tmpfs was full)"
            ),
            || {
                leave_after_failure(&AfterFailure::decide(
                    FailureReboot::default(),
                    &DiskWrites::default(),
                ))
            },
        );
    }
    if let Err(e) = pid1::mount_basics() {
        console::line(&format!("error: {e:#}"));
    }
    // For the operator logged in over SSH (`nixos-kexec status`).
    if let Err(e) = console::keep_in_file(Path::new(console::LOG_FILE)) {
        log::warn!("the console log is not kept in a file: {e:#}");
    }
    status::enable(StatusFile::installer());
    console::end_partial_line();
    console::line(&format!(
        "nixos-kexec {} starting as init",
        env!("CARGO_PKG_VERSION")
    ));
    if std::env::var_os("NIXOS_KEXEC_ROOT_MOVED").is_some() {
        console::line("root moved from the initramfs to a tmpfs (Nix's build sandbox needs pivot_root)");
    }
    if let Err(e) = pid1::enable_module_autoloading() {
        log::warn!("kernel module autoloading is off: {e:#}");
    }
    if let Err(e) = pid1::load_modules() {
        log::warn!("{e:#}");
    }
    if let Err(e) = pid1::mount_booted_system_extras() {
        log::warn!("{e:#}");
    }
    pid1::supervise(|| match install(InputArgs::default(), NetworkMode::Installer) {
        Ok(Some(after)) => {
            if ssh_server::is_running() {
                std::thread::sleep(ssh_server::HOLD_FOR_FOLLOWERS);
            }
            match finish_machine(after) {
                Ok(()) => 0,
                Err(e) => {
                    print_error(&e);
                    1
                }
            }
        }
        Ok(None) => 0,
        Err(then) => {
            leave_after_failure(&then);
            1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--param` on the agent's own command line is the top layer: it wins over the kernel's.
    #[test]
    fn own_params_win_over_the_kernels() {
        let input = Input {
            cmdline: "console=ttyS0 nixos_kexec.hostname=kernel nixos_kexec.after=halt\n".into(),
            extra_params: vec![("hostname".into(), "own".into())],
            root: "/nonexistent".into(),
        };
        let params = input.params().unwrap();
        assert_eq!(params.get("hostname"), Some("own"));
        assert_eq!(params.get("after"), Some("halt"));
        let bad = Input {
            extra_params: vec![("hostnmae".into(), "own".into())],
            ..input
        };
        assert!(bad.params().is_err());
    }
}
