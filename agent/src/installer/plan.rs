//! The plan: a pure function of config and facts. Everything the steps do is resolved here
//! (device paths, byte offsets, sizes, labels, UUIDs), so it can be printed, tested and
//! checked before anything touches a disk; the only files it reads are the provided host keys,
//! to refuse a bad one before the wipe.
//!
//! The disk layout comes from the declarative form ([`crate::installer::storage`]): a preset is first
//! written in that form ([`crate::installer::presets`]), then placed on the disk ([`crate::installer::layout`]).

use crate::error::user_error;
use crate::input::access_token::TokenHost;
use crate::input::binary_cache::{PublicKey, StorePath, Substituter};
use crate::input::config::{After, Config, DiskChoice, Layout, Step};
use crate::input::flake::{GeneratedPart, UserFlake};
use crate::input::runtime_info::RuntimeInfo;
use crate::installer::layout::{Filesystem, LuksVolume, PlanIds, PlannedMount, PlannedPartition, SwapArea};
use crate::installer::storage::{Storage, Table, MIB};
use crate::machine::facts::{Disk, Facts, Firmware};
use crate::machine::platform::{CpuVendor, Virtualisation};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The initrd's sshd for unlocking LUKS listens here, so its host key (a different one: NixOS
/// copies it into the initrd on the unencrypted /boot) does not clash with the system's in the
/// client's known_hosts.
pub const INITRD_SSH_PORT: u16 = 2222;
/// Where the initrd SSH host key lives on the installed system (under the persist path when
/// `/` is a tmpfs); NixOS copies it into the initrd (boot.initrd.secrets).
pub const INITRD_HOST_KEY: &str = "etc/secrets/initrd/ssh_host_ed25519_key";

/// The operator's binary caches and the keys that sign them, added to the bundle's Nix
/// settings for the install (`extra-substituters`, `extra-trusted-public-keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryCaches {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substituters: Vec<Substituter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_public_keys: Vec<PublicKey>,
}

impl BinaryCaches {
    pub fn is_empty(&self) -> bool {
        self.substituters.is_empty() && self.trusted_public_keys.is_empty()
    }

    /// nixos-install's `--option NAME VALUE` arguments, which it hands to every Nix command.
    pub fn nix_options(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut option = |name: &str, values: Vec<String>| {
            if !values.is_empty() {
                args.extend(["--option".to_string(), name.to_string(), values.join(" ")]);
            }
        };
        option(
            "extra-substituters",
            self.substituters.iter().map(|s| s.as_str().to_string()).collect(),
        );
        option(
            "extra-trusted-public-keys",
            self.trusted_public_keys.iter().map(|k| k.to_string()).collect(),
        );
        args
    }
}

/// SSH in the installed system's initrd, to type the disk passphrase from afar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitrdSsh {
    pub port: u16,
    /// Absolute path on the installed system; the keys step writes it under the mount root.
    pub host_key: String,
    /// NIC drivers the initrd needs to reach the network.
    pub nic_modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDisk {
    pub dev_path: String,
    pub by_id: Option<String>,
    pub serial: Option<String>,
    pub size_bytes: u64,
    pub logical_sector: u32,
    /// Byte ranges of old partitions whose signatures are wiped too.
    pub old_partitions: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub hostname: String,
    pub firmware: Firmware,
    /// `nixpkgs.hostPlatform` of the installed system: the installer's own architecture, since
    /// it runs on the machine it installs.
    pub system: String,
    /// What systemd-detect-virt would say here; the hardware configuration imports the guest
    /// profile for it, or the firmware of a bare-metal machine.
    #[serde(default)]
    pub virtualisation: Virtualisation,
    /// Whose CPU microcode the installed system loads: on bare metal only, as
    /// nixos-generate-config decides (a guest cannot update its host's microcode).
    #[serde(default)]
    pub microcode: Option<CpuVendor>,
    /// The installer's serial console; the installed system prints and logs in there too.
    #[serde(default)]
    pub serial_console: Option<crate::input::cmdline::SerialConsole>,
    pub layout: Layout,
    pub disk: TargetDisk,
    pub table: Table,
    pub disk_guid: String,
    pub mbr_signature: u32,
    /// The declarative layout everything below was placed from.
    pub storage: Storage,
    pub partitions: Vec<PlannedPartition>,
    pub luks: Vec<LuksVolume>,
    /// To create, in order.
    pub filesystems: Vec<Filesystem>,
    /// In mount order: `/` first, parents before children.
    pub mounts: Vec<PlannedMount>,
    pub swaps: Vec<SwapArea>,
    /// A swap file for the install step alone, when RAM is small and `swaps` is empty.
    pub temporary_swap: crate::installer::steps::swap_file::TemporarySwap,
    /// Where state that must survive a reboot lives on the target: `/`, or the persist path
    /// when `/` is a tmpfs.
    pub state_dir: String,
    /// Written to `<state_dir>/etc/machine-id` when `/` is a tmpfs.
    pub machine_id: Option<String>,
    pub initrd_ssh: Option<InitrdSsh>,
    pub initrd_modules: Vec<String>,
    pub ssh_authorized_keys: Vec<String>,
    pub nixpkgs: String,
    pub state_version: String,
    pub mount_root: String,
    pub steps: Vec<Step>,
    pub stop_before: Option<Step>,
    pub after: Option<After>,
    pub dry_run: bool,
    /// A system built elsewhere that the install downloads instead of building the host flake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prebuilt_system: Option<StorePath>,
    /// Binary caches the install may download from, besides the bundle's own.
    #[serde(default, skip_serializing_if = "BinaryCaches::is_empty")]
    pub caches: BinaryCaches,
    pub install_command: Vec<String>,
    /// TMPDIR of the install: on a disk, not in RAM (a tmpfs `/` is RAM too).
    pub install_tmpdir: String,
    /// What the rescue side sent, written to the target as /etc/nixos/runtime-info.json.
    pub runtime_info: RuntimeInfo,
    /// Host private keys the operator supplied in the secrets archive; empty: generate.
    pub provided_host_keys: Vec<String>,
    /// The operator's extra files and where they land.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_files: Option<crate::installer::steps::extra_files::ExtraFiles>,
    /// The network to bring up in the installer and to write for the installed system.
    pub network: Option<crate::input::runtime_info::Network>,
    /// The earlier install on the disk that `nixos_kexec.reinstall` allowed to be replaced.
    #[serde(default)]
    pub replaces: Option<crate::machine::facts::PreviousInstall>,
    /// The user's own configuration, which the host flake builds with the generated modules;
    /// without it the host flake is the generic one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_configuration: Option<UserConfiguration>,
}

/// How the host flake composes the user's flake with what the installer generated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserConfiguration {
    pub flake: UserFlake,
    /// The nixpkgs the user's flake is made to follow, when the input names one; otherwise
    /// the host flake's nixpkgs follows the user's.
    pub nixpkgs: Option<String>,
    /// The generated modules added to the user's configuration: those asked for (all by
    /// default) that apply to this machine.
    pub generated: Vec<GeneratedPart>,
    /// The host whose access token Nix gets for the install (`run --flake-token-file`); the
    /// token itself is never in the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<TokenHost>,
}

impl Plan {
    /// `relative` under the state directory, as an absolute path on the installed system.
    pub fn state_path(&self, relative: &str) -> String {
        format!(
            "{}/{}",
            self.state_dir.trim_end_matches('/'),
            relative.trim_start_matches('/')
        )
    }

    pub fn root_is_tmpfs(&self) -> bool {
        self.mounts
            .first()
            .is_some_and(|m| m.mountpoint == "/" && m.fstype == "tmpfs")
    }
}

/// The declarative layout the config asks for: its own `storage`, or a preset's for the Nix
/// `system` it installs.
pub fn storage_of(config: &Config, system: &str) -> Result<Storage> {
    match (config.storage(), config.layout) {
        (Some(storage), _) => Ok(storage.clone()),
        (None, Layout::Custom) => Err(user_error(
            "Layout custom needs the partitions described as \"storage\" in the runtime info.",
            "add a \"storage\" object to the runtime info (see the README), or choose a preset layout.",
        )),
        (None, layout) => crate::installer::presets::storage_for(
            layout,
            config.table,
            config.swap_bytes,
            system == "aarch64-linux",
        ),
    }
}

/// arm64 servers and clouds boot through UEFI only: an aarch64 machine without
/// /sys/firmware/efi was started some other way (a bootloader handing over a device tree, or
/// an installer kexec'd from such a system), and nothing here can make a disk it boots from.
/// Refused before the disk is chosen, so no preset plans a BIOS boot partition or GRUB for
/// i386-pc on ARM.
fn refuse_bios_on_arm(system: &str, firmware: Firmware) -> Result<()> {
    if system == "aarch64-linux" && firmware == Firmware::Bios {
        return Err(user_error(
            "This aarch64 machine did not boot through UEFI (no /sys/firmware/efi), and nixos-kexec installs aarch64 machines with systemd-boot on UEFI only.",
            "boot the rescue system (or the installer, from GRUB or iPXE) through the machine's UEFI firmware, e.g. QEMU's virt machine with AAVMF (-bios /usr/share/AAVMF/AAVMF_CODE.fd); a device-tree boot (U-Boot without EFI, QEMU -kernel without firmware) cannot be installed to.",
        ));
    }
    Ok(())
}

pub fn make(config: &Config, facts: &Facts, ids: &PlanIds) -> Result<Plan> {
    let system = facts.machine.nix_system()?;
    refuse_bios_on_arm(&system, facts.firmware)?;
    let disk = select_disk(config, facts)?;
    // A machine that PXE-boots the installer again after a finished install must not lose it.
    let replaces = facts.previous_install(&disk.dev_path).cloned();
    if let (Some(previous), false) = (&replaces, config.reinstall) {
        return Err(user_error(
            format!("Refusing to install over {}: {}.", describe(disk), previous.describe()),
            "boot the installed system from its disk (fix the boot order, or the PXE entry of this machine), or add nixos_kexec.reinstall to wipe it and install again.",
        ));
    }
    let storage = storage_of(config, &system)?;
    let placed = crate::installer::layout::place(&storage, disk, facts.firmware, facts.ram_bytes, ids)?;
    if !placed.luks.is_empty() && !config.disk_passphrase_given {
        return Err(user_error(
            format!(
                "Layout {} encrypts the disk, but no disk passphrase came with the installer (it must be the file /etc/nixos-kexec/secrets/disk-passphrase in an appended initrd archive, never a kernel parameter).",
                config.layout.name()
            ),
            "pass --disk-key-file FILE to nixos-kexec run (or append a cpio archive holding etc/nixos-kexec/secrets/disk-passphrase, mode 0600), or choose a layout without luks.",
        ));
    }
    // Finish still runs after an early stop, so the report and log land on the target.
    let mut steps: Vec<Step> = Step::ALL
        .into_iter()
        .take_while(|step| Some(*step) != config.stop_before)
        .filter(|step| *step != Step::Network || config.network().is_some())
        .filter(|step| *step != Step::ExtraFiles || config.extra_files.is_some())
        .collect();
    if config.stop_before.is_some_and(|step| step != Step::Finish) {
        steps.push(Step::Finish);
    }
    let caches = binary_caches(config)?;
    let mount_root = "/mnt".to_string();
    let state_dir = placed.persist.clone().unwrap_or_else(|| "/".into());
    let root_tmpfs = placed.persist.is_some();
    let flake_dir = format!(
        "{mount_root}{}",
        format!("{state_dir}/etc/nixos").replace("//", "/")
    );
    let nic_modules: Vec<String> = {
        let mut modules: Vec<String> = facts
            .nics
            .iter()
            .flat_map(|n| n.modules.iter().cloned())
            .collect();
        modules.sort();
        modules.dedup();
        modules
    };
    // Unlocking from afar needs someone who can log in: without keys, the console it is.
    let initrd_ssh =
        (!placed.luks.is_empty() && !config.ssh_authorized_keys().is_empty()).then(|| InitrdSsh {
            port: INITRD_SSH_PORT,
            host_key: format!("{}/{INITRD_HOST_KEY}", state_dir.trim_end_matches('/')),
            nic_modules,
        });
    let temporary_swap =
        crate::installer::steps::swap_file::decide(facts.ram_bytes, &steps, &placed, &mount_root);
    let virtualisation = facts.machine.virtualisation;
    let user_configuration = user_configuration(config, initrd_ssh.is_some(), root_tmpfs)?;
    // Under the state directory, where they outlive a reboot when `/` is a tmpfs.
    let extra_files =
        config
            .extra_files
            .clone()
            .map(|tree| crate::installer::steps::extra_files::ExtraFiles {
                destination: state_dir.clone(),
                tree,
            });
    let plan = Plan {
        hostname: config.hostname().to_string(),
        firmware: facts.firmware,
        system,
        virtualisation,
        microcode: facts.machine.cpu_vendor.filter(|_| !virtualisation.is_vm()),
        serial_console: config.serial_console.clone(),
        layout: config.layout,
        disk: TargetDisk {
            dev_path: disk.dev_path.clone(),
            by_id: disk.stable_link(),
            serial: disk.serial.clone(),
            size_bytes: disk.size_bytes,
            logical_sector: disk.logical_sector,
            old_partitions: disk
                .partitions
                .iter()
                .map(|p| (p.start_bytes, p.size_bytes))
                .collect(),
        },
        table: placed.table,
        disk_guid: ids.disk_guid.clone(),
        mbr_signature: ids.mbr_signature,
        storage,
        partitions: placed.partitions,
        luks: placed.luks,
        filesystems: placed.filesystems,
        mounts: placed.mounts,
        swaps: placed.swaps,
        temporary_swap,
        machine_id: root_tmpfs.then(|| ids.machine_id.clone()),
        state_dir,
        initrd_ssh,
        initrd_modules: facts.initrd_modules(disk),
        ssh_authorized_keys: config.ssh_authorized_keys().to_vec(),
        nixpkgs: config.nixpkgs().to_string(),
        state_version: config.state_version().to_string(),
        prebuilt_system: config.runtime_info.system.clone(),
        caches: caches.clone(),
        install_command: install_command(
            &mount_root,
            match &config.runtime_info.system {
                Some(system) => InstallFrom::Prebuilt(system),
                None => InstallFrom::Flake(format!(
                    "{flake_dir}#{}",
                    user_configuration
                        .as_ref()
                        .map_or(config.hostname(), |user| user.flake.name.as_str())
                )),
            },
            &caches,
        ),
        install_tmpdir: if root_tmpfs {
            format!("{mount_root}/nix/.nixos-kexec-tmp")
        } else {
            format!("{mount_root}/tmp")
        },
        mount_root,
        // Without report_url: the installed system has no use for it, and a token in its query
        // string would reach the console's plan and the world-readable store with the flake.
        runtime_info: RuntimeInfo {
            report_url: None,
            ..config.runtime_info.clone()
        },
        provided_host_keys: config.provided_host_keys.clone(),
        extra_files,
        network: config.network().cloned(),
        replaces,
        user_configuration,
        steps,
        stop_before: config.stop_before,
        after: config.after,
        dry_run: config.dry_run,
    };
    refuse_what_the_steps_would(&plan)?;
    Ok(plan)
}

/// The user's flake with the generated parts asked for that this machine has.
fn user_configuration(
    config: &Config,
    initrd_ssh: bool,
    root_tmpfs: bool,
) -> Result<Option<UserConfiguration>> {
    let info = &config.runtime_info;
    let access_token = config
        .flake_token_given
        .then(|| TokenHost::of(info.flake.as_ref()))
        .transpose()?;
    let Some(flake) = &info.flake else {
        if info.generated.is_some() {
            return Err(user_error(
                "generated names the parts to add to your own flake, but no flake is given.",
                "give your configuration with flake=FLAKEREF#NAME (nixos-kexec run --flake), or drop generated: the generic host flake always has every part.",
            ));
        }
        return Ok(None);
    };
    let asked = info
        .generated
        .clone()
        .unwrap_or_else(|| GeneratedPart::ALL.to_vec());
    let applies = |part: &GeneratedPart| match part {
        GeneratedPart::Hardware => true,
        GeneratedPart::Network => config.network().is_some(),
        GeneratedPart::Persist => root_tmpfs,
        GeneratedPart::InitrdSsh => initrd_ssh,
    };
    let mut generated: Vec<GeneratedPart> = asked.into_iter().filter(applies).collect();
    generated.sort();
    generated.dedup();
    Ok(Some(UserConfiguration {
        flake: flake.clone(),
        nixpkgs: config.nixpkgs_chosen().map(str::to_string),
        generated,
        access_token,
    }))
}

fn binary_caches(config: &Config) -> Result<BinaryCaches> {
    let info = &config.runtime_info;
    if let (Some(system), true) = (&info.system, info.substituters.is_empty()) {
        return Err(user_error(
            format!("system {system} is given, but no substituters to download it from."),
            "push the system to a binary cache (nix copy --to CACHE-URL PATH) and name it in substituters (nixos_kexec.substituters=URL, or nixos-kexec run --substituter URL), with the key that signs it in trusted_public_keys.",
        ));
    }
    Ok(BinaryCaches {
        substituters: info.substituters.clone(),
        trusted_public_keys: info.trusted_public_keys.clone(),
    })
}

enum InstallFrom<'a> {
    /// The host flake, `DIR#HOST`, built on the target.
    Flake(String),
    Prebuilt(&'a StorePath),
}

/// nixos-install as the install step runs it. With a prebuilt system it only sets the system
/// profile (`nix-env --set`, which downloads the closure) and installs the boot loader.
fn install_command(mount_root: &str, from: InstallFrom, caches: &BinaryCaches) -> Vec<String> {
    let mut command: Vec<String> = vec!["nixos-install".into(), "--root".into(), mount_root.into()];
    match from {
        InstallFrom::Flake(flake) => command.extend(["--flake".into(), flake]),
        InstallFrom::Prebuilt(system) => command.extend(["--system".into(), system.to_string()]),
    }
    command.extend(["--no-root-passwd".into(), "--no-channel-copy".into()]);
    command.extend(caches.nix_options());
    command
}

/// What the steps up to `install` would refuse in the input, refused now, before the wipe:
/// the host flake is rendered (and dropped; the flake step renders it again, with the
/// installer's network facts, which only add matches) and the provided host keys are parsed
/// (the files stay for the keys step, which wipes them), and the extra files are checked
/// against the directories the install needs. Names, sizes and the rest of the layout were
/// checked as it was placed.
fn refuse_what_the_steps_would(plan: &Plan) -> Result<()> {
    crate::installer::steps::flake::render(plan, None)?;
    crate::installer::steps::keys::check_provided(&plan.provided_host_keys)?;
    match &plan.extra_files {
        Some(extra) => extra.check(plan),
        None => Ok(()),
    }
}

fn describe(disk: &Disk) -> String {
    let mut text = format!("{} ({} MiB", disk.dev_path, disk.size_bytes / MIB);
    if let Some(model) = &disk.model {
        text += &format!(", model {model}");
    }
    if let Some(serial) = &disk.serial {
        text += &format!(", serial {serial}");
    }
    if let Some(id) = disk.by_id.first() {
        text += &format!(", /dev/disk/by-id/{id}");
    }
    text + ")"
}

fn list(disks: &[&Disk]) -> String {
    if disks.is_empty() {
        return "none".into();
    }
    disks.iter().map(|d| describe(d)).collect::<Vec<_>>().join("; ")
}

/// Why a disk must not be written, if it must not.
fn in_use(disk: &Disk) -> Option<String> {
    if disk.read_only {
        return Some("it is read-only".into());
    }
    if !disk.mounted_at.is_empty() {
        return Some(format!("it is mounted at {}", disk.mounted_at.join(", ")));
    }
    if !disk.holders.is_empty() {
        return Some(format!("it is in use by {}", disk.holders.join(", ")));
    }
    None
}

fn matches_path(disk: &Disk, path: &str) -> bool {
    if let Some(id) = path.strip_prefix("/dev/disk/by-id/") {
        return disk.by_id.iter().any(|own| own == id);
    }
    disk.dev_path == path
}

/// Disks `nixos_kexec.disk=auto` may take: not in use, not removable.
pub fn eligible_disks(facts: &Facts) -> Vec<&Disk> {
    facts
        .disks
        .iter()
        .filter(|d| in_use(d).is_none() && !d.removable)
        .collect()
}

/// The parameter that names `disk` for good: by-id where there is one (stable across kernels).
fn disk_param(disk: &Disk) -> String {
    match disk.by_id.first() {
        Some(id) => format!("nixos_kexec.disk=/dev/disk/by-id/{id}"),
        None => format!("nixos_kexec.disk={}", disk.dev_path),
    }
}

pub fn select_disk<'a>(config: &Config, facts: &'a Facts) -> Result<&'a Disk> {
    let all: Vec<&Disk> = facts.disks.iter().collect();
    let eligible = eligible_disks(facts);
    let disk = match &config.disk() {
        DiskChoice::Unspecified => {
            let fix = match eligible.as_slice() {
                [] => "attach a disk to install to, then name it with nixos_kexec.disk=/dev/... (or /dev/disk/by-id/..., or serial:SERIAL).".to_string(),
                [only] => format!(
                    "to confirm, boot again with {} or nixos_kexec.disk=auto (the only eligible disk; the plan printed above is what would run). Nothing was written.",
                    disk_param(only)
                ),
                several => format!(
                    "to confirm, boot again naming one of them, e.g. {} (or serial:SERIAL); nixos_kexec.disk=auto needs exactly one eligible disk. Nothing was written.",
                    several.iter().map(|d| disk_param(d)).collect::<Vec<_>>().join(" or ")
                ),
            };
            return Err(user_error(
                format!(
                    "No target disk was chosen, and this installer never guesses. Candidates: {}.",
                    list(&eligible)
                ),
                fix,
            ));
        }
        DiskChoice::Auto => match eligible.as_slice() {
            [only] => *only,
            _ => {
                return Err(user_error(
                    format!(
                        "nixos_kexec.disk=auto needs exactly one eligible disk, found {}: {}.",
                        eligible.len(),
                        list(&eligible)
                    ),
                    "name the disk with nixos_kexec.disk=/dev/disk/by-id/... or serial:SERIAL.",
                ))
            }
        },
        DiskChoice::Selected(selector) => {
            let found: Vec<&Disk> = all
                .iter()
                .copied()
                .filter(|d| selector.path.as_deref().is_none_or(|p| matches_path(d, p)))
                .filter(|d| {
                    selector
                        .serial
                        .as_deref()
                        .is_none_or(|s| d.serial.as_deref() == Some(s.trim()))
                })
                .filter(|d| {
                    selector
                        .wwn
                        .as_deref()
                        .is_none_or(|w| d.wwn.as_deref() == Some(w))
                })
                .collect();
            let named: Vec<String> = [
                selector.path.clone(),
                selector.serial.as_ref().map(|s| format!("serial {s}")),
                selector.wwn.as_ref().map(|w| format!("WWN {w}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            let wanted = if named.is_empty() {
                "nothing".to_string()
            } else {
                named.join(" with ")
            };
            let disk = match found.as_slice() {
                [one] => *one,
                [] => {
                    return Err(user_error(
                        format!("The target disk {wanted} is not on this machine. Disks found: {}.", list(&all)),
                        "check the disk path or serial; device names can change between kernels, so prefer /dev/disk/by-id/... or serial:SERIAL.",
                    ))
                }
                _ => {
                    return Err(user_error(
                        format!("The target disk {wanted} is ambiguous: {}.", list(&found)),
                        "name the disk by a unique /dev/disk/by-id/... path.",
                    ))
                }
            };
            if let Some(size) = selector.size_bytes {
                if size != disk.size_bytes {
                    return Err(user_error(
                        format!(
                            "The target disk {} has {} bytes, but the runtime info expects {size}.",
                            describe(disk),
                            disk.size_bytes
                        ),
                        "this is probably not the disk that was chosen; check the disk before installing, or drop size_bytes.",
                    ));
                }
            }
            disk
        }
    };
    if let Some(reason) = in_use(disk) {
        return Err(user_error(
            format!("Refusing to write to {}: {reason}.", describe(disk)),
            "unmount it and stop whatever holds it, or choose another disk.",
        ));
    }
    Ok(disk)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::input::config::Config;
    use crate::input::runtime_info::DiskSelector;
    use crate::installer::layout::PlanIds;
    use crate::installer::storage::GIB;
    use crate::machine::facts::Transport;

    pub fn disk(name: &str, size: u64, sector: u32, serial: &str) -> Disk {
        Disk {
            name: name.into(),
            dev_path: format!("/dev/{name}"),
            size_bytes: size,
            logical_sector: sector,
            physical_sector: sector,
            transport: Transport::Virtio,
            model: None,
            serial: Some(serial.into()),
            wwn: None,
            by_id: vec![format!("virtio-{serial}")],
            by_path: vec![],
            removable: false,
            read_only: false,
            partitions: vec![],
            holders: vec![],
            mounted_at: vec![],
            modules: vec!["virtio_blk".into(), "virtio_pci".into()],
        }
    }

    pub fn facts(disks: Vec<Disk>) -> Facts {
        Facts {
            firmware: Firmware::Bios,
            ram_bytes: GIB,
            kernel_release: "6.1.0".into(),
            disks,
            nics: vec![],
            previous_installs: vec![],
            machine: crate::machine::platform::tests::qemu_vm(),
        }
    }

    pub fn ids() -> PlanIds {
        PlanIds {
            disk_guid: "11111111-2222-3333-4444-555555555555".into(),
            partition_guids: (1..=16)
                .map(|i| format!("aaaaaaaa-0000-0000-0000-{i:012}"))
                .collect(),
            uuids: (1..=32)
                .map(|i| format!("bbbbbbbb-0000-0000-0000-{i:012}"))
                .collect(),
            esp_volume_id: 0x1a2b3c4d,
            mbr_signature: 0x11223344,
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    fn choose(path: Option<&str>, serial: Option<&str>) -> Config {
        let mut config = Config::default();
        config.runtime_info.disk = Some(DiskSelector {
            path: path.map(Into::into),
            serial: serial.map(Into::into),
            ..DiskSelector::default()
        });
        config
    }

    #[test]
    fn ext4_layout_on_512_and_4096() {
        for sector in [512, 4096] {
            let mut config = choose(Some("/dev/nvme0n1"), None);
            config.stop_before = Some(Step::Install);
            let plan = make(
                &config,
                &facts(vec![disk("nvme0n1", 10 * GIB, sector, "S")]),
                &ids(),
            )
            .unwrap();
            let parts = &plan.partitions;
            assert_eq!(parts[0].start_bytes, MIB);
            assert_eq!(parts[1].start_bytes, 2 * MIB);
            assert_eq!(parts[2].start_bytes, 514 * MIB);
            assert_eq!(parts[2].device, "/dev/nvme0n1p3");
            assert_eq!(parts[2].start_bytes + parts[2].size_bytes, 10 * GIB - MIB);
            assert_eq!(plan.mounts[0].mountpoint, "/");
            assert_eq!(
                plan.mounts[0].nix_device,
                "/dev/disk/by-uuid/bbbbbbbb-0000-0000-0000-000000000001"
            );
            assert_eq!(plan.mounts[1].nix_device, "/dev/disk/by-uuid/1A2B-3C4D");
            assert_eq!(plan.state_dir, "/");
            assert!(plan.install_command.contains(&"/mnt/etc/nixos#nixos".to_string()));
        }
    }

    #[test]
    fn too_small_disk_is_refused() {
        let config = choose(Some("/dev/vda"), None);
        let err = make(&config, &facts(vec![disk("vda", GIB, 512, "S")]), &ids()).unwrap_err();
        assert!(crate::error::one_line(&err).contains("too small"), "{err}");
    }

    #[test]
    fn selection_by_serial_path_and_by_id() {
        let f = facts(vec![
            disk("vda", 4 * GIB, 512, "A"),
            disk("vdb", 4 * GIB, 512, "B"),
        ]);
        assert_eq!(select_disk(&choose(None, Some("B")), &f).unwrap().name, "vdb");
        assert_eq!(
            select_disk(&choose(Some("/dev/vda"), None), &f).unwrap().name,
            "vda"
        );
        assert_eq!(
            select_disk(&choose(Some("/dev/disk/by-id/virtio-B"), None), &f)
                .unwrap()
                .name,
            "vdb"
        );
        assert!(select_disk(&choose(Some("/dev/vda"), Some("B")), &f).is_err());
        assert!(select_disk(&choose(None, Some("C")), &f).is_err());
    }

    /// The identities `nixos-kexec run` sends (see `rescue::run::identify_disk`) find the
    /// disk it meant, where a shared serial alone is ambiguous.
    #[test]
    fn selection_by_wwn_or_path_and_size_where_serials_are_shared() {
        let mut namespaces = vec![
            disk("nvme0n1", 4 * GIB, 512, "NV-SHARED"),
            disk("nvme0n2", 4 * GIB, 512, "NV-SHARED"),
        ];
        namespaces[0].wwn = Some("eui.0011223344556600".into());
        namespaces[1].wwn = Some("eui.0011223344556601".into());
        let f = facts(namespaces);
        let err = select_disk(&choose(None, Some("NV-SHARED")), &f).unwrap_err();
        assert!(crate::error::one_line(&err).contains("ambiguous"), "{err}");
        let mut by_wwn = Config::default();
        by_wwn.runtime_info.disk = Some(DiskSelector {
            wwn: Some("eui.0011223344556601".into()),
            size_bytes: Some(4 * GIB),
            ..DiskSelector::default()
        });
        assert_eq!(select_disk(&by_wwn, &f).unwrap().name, "nvme0n2");
        if let Some(selector) = &mut by_wwn.runtime_info.disk {
            selector.wwn = Some("eui.ffffffffffffffff".into());
        }
        let err = select_disk(&by_wwn, &f).unwrap_err();
        assert!(
            crate::error::one_line(&err)
                .contains("The target disk WWN eui.ffffffffffffffff is not on this machine"),
            "{err}"
        );

        // Serial and WWN shared (two paths to one LUN would look so), sizes not.
        let mut a = disk("sda", 4 * GIB, 512, "LUN-1");
        let mut b = disk("sdb", 5 * GIB, 512, "LUN-1");
        a.wwn = Some("0x5000c50015ea71ac".into());
        b.wwn = a.wwn.clone();
        let f = facts(vec![a, b]);
        let mut by_path = choose(Some("/dev/sdb"), None);
        if let Some(selector) = &mut by_path.runtime_info.disk {
            selector.size_bytes = Some(5 * GIB);
        }
        assert_eq!(select_disk(&by_path, &f).unwrap().name, "sdb");
        if let Some(selector) = &mut by_path.runtime_info.disk {
            selector.size_bytes = Some(4 * GIB);
        }
        assert!(
            select_disk(&by_path, &f).is_err(),
            "a renamed disk is caught by its size"
        );
    }

    #[test]
    fn no_choice_or_ambiguous_auto_refuses_and_lists_candidates() {
        let f = facts(vec![
            disk("vda", 4 * GIB, 512, "A"),
            disk("vdb", 4 * GIB, 512, "B"),
        ]);
        let err = select_disk(&Config::default(), &f).unwrap_err();
        let text = crate::error::one_line(&err);
        assert!(text.contains("/dev/vda") && text.contains("/dev/vdb"), "{text}");
        let auto = Config {
            disk_auto: true,
            ..Config::default()
        };
        assert!(select_disk(&auto, &f).is_err());
        let single = facts(vec![disk("vda", 4 * GIB, 512, "A")]);
        assert_eq!(select_disk(&auto, &single).unwrap().name, "vda");
    }

    /// report_url may carry a token in its query: it stays out of the plan, which the console
    /// shows and whose runtime info the target keeps in its world-readable flake.
    #[test]
    fn the_report_url_stays_out_of_the_plan() {
        let mut config = Config {
            disk_auto: true,
            ..Config::default()
        };
        config.runtime_info.report_url =
            Some(crate::input::report_url::ReportUrl::parse("https://fleet.example/r?token=s3cret").unwrap());
        let plan = make(&config, &facts(vec![disk("vda", 20 * GIB, 512, "A")]), &ids()).unwrap();
        assert_eq!(plan.runtime_info.report_url, None);
        assert!(!serde_json::to_string(&plan).unwrap().contains("s3cret"));
    }

    #[test]
    fn unchosen_disk_says_how_to_confirm() {
        let two = facts(vec![
            disk("vda", 4 * GIB, 512, "A"),
            disk("vdb", 4 * GIB, 512, "B"),
        ]);
        let err = select_disk(&Config::default(), &two).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.fix.contains(
                "nixos_kexec.disk=/dev/disk/by-id/virtio-A or nixos_kexec.disk=/dev/disk/by-id/virtio-B"
            ),
            "{user}"
        );
        let one = facts(vec![disk("vda", 4 * GIB, 512, "A")]);
        let err = select_disk(&Config::default(), &one).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.fix
                .contains("nixos_kexec.disk=/dev/disk/by-id/virtio-A or nixos_kexec.disk=auto"),
            "{user}"
        );
        assert_eq!(eligible_disks(&one).len(), 1);
    }

    #[test]
    fn a_finished_install_is_kept_unless_reinstall() {
        let mut f = facts(vec![disk("vda", 4 * GIB, 512, "A")]);
        f.previous_installs = vec![crate::machine::facts::PreviousInstall {
            disk: "/dev/vda".into(),
            partition: "/dev/vda3".into(),
            hostname: Some("web1".into()),
            nixos_kexec_version: Some("0.1.0".into()),
            stopped_before: None,
            evidence: None,
        }];
        let mut config = choose(Some("/dev/vda"), None);
        let err = make(&config, &f, &ids()).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.problem.contains("Refusing to install over /dev/vda"),
            "{user}"
        );
        assert!(user.problem.contains("for host web1"), "{user}");
        assert!(user.fix.contains("nixos_kexec.reinstall"), "{user}");
        config.disk_auto = true;
        assert!(make(&config, &f, &ids()).is_err(), "auto must not take it either");
        config.reinstall = true;
        let plan = make(&config, &f, &ids()).unwrap();
        assert_eq!(
            plan.replaces.as_ref().map(|p| p.partition.as_str()),
            Some("/dev/vda3")
        );
        // Another disk's install does not matter.
        f.previous_installs[0].disk = "/dev/vdb".into();
        config.reinstall = false;
        assert!(make(&config, &f, &ids()).unwrap().replaces.is_none());
    }

    #[test]
    fn in_use_removable_and_wrong_size_are_refused() {
        let mut mounted = disk("vda", 4 * GIB, 512, "A");
        mounted.mounted_at = vec!["/".into()];
        let mut removable = disk("sdb", 4 * GIB, 512, "U");
        removable.removable = true;
        let mut ro = disk("vdc", 4 * GIB, 512, "R");
        ro.read_only = true;
        let f = facts(vec![mounted, removable, ro]);
        assert!(select_disk(&choose(Some("/dev/vda"), None), &f).is_err());
        assert!(select_disk(&choose(Some("/dev/vdc"), None), &f).is_err());
        let auto = Config {
            disk_auto: true,
            ..Config::default()
        };
        assert!(
            select_disk(&auto, &f).is_err(),
            "auto must not pick a removable disk"
        );
        // Named explicitly, a removable disk is a clear choice.
        assert_eq!(
            select_disk(&choose(Some("/dev/sdb"), None), &f).unwrap().name,
            "sdb"
        );
        let mut sized = choose(None, Some("U"));
        if let Some(s) = &mut sized.runtime_info.disk {
            s.size_bytes = Some(5 * GIB);
        }
        assert!(select_disk(&sized, &f).is_err());
    }

    #[test]
    fn plan_is_serialisable_and_stops_before() {
        let mut config = choose(Some("/dev/vda"), None);
        config.stop_before = Some(Step::Install);
        let plan = make(&config, &facts(vec![disk("vda", 4 * GIB, 512, "A")]), &ids()).unwrap();
        assert!(!plan.steps.contains(&Step::Install));
        assert_eq!(plan.steps.last(), Some(&Step::Finish));
        assert_eq!(plan.filesystems[0].uuid, "1A2B-3C4D");
        let json = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn luks_without_passphrase_is_refused_before_anything_is_written() {
        let mut config = choose(Some("/dev/vda"), None);
        config.layout = Layout::LuksExt4;
        let f = facts(vec![disk("vda", 8 * GIB, 512, "A")]);
        let err = make(&config, &f, &ids()).unwrap_err();
        let text = crate::error::one_line(&err);
        assert!(
            text.contains("passphrase") && text.contains("--disk-key-file"),
            "{text}"
        );
        config.disk_passphrase_given = true;
        let plan = make(&config, &f, &ids()).unwrap();
        assert_eq!(plan.luks.len(), 1);
        // No SSH key, nobody to unlock from afar: no initrd sshd.
        assert!(plan.initrd_ssh.is_none());
        config.runtime_info.ssh_authorized_keys = vec!["ssh-ed25519 AAAA me".into()];
        let mut f = f;
        f.nics = vec![crate::machine::facts::Nic {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            modules: vec!["virtio_net".into(), "virtio_pci".into()],
        }];
        let plan = make(&config, &f, &ids()).unwrap();
        let initrd = plan.initrd_ssh.unwrap();
        assert_eq!(initrd.port, 2222);
        assert_eq!(initrd.host_key, "/etc/secrets/initrd/ssh_host_ed25519_key");
        assert_eq!(initrd.nic_modules, ["virtio_net", "virtio_pci"]);
    }

    #[test]
    fn machine_facts_shape_the_hardware_plan() {
        let config = choose(Some("/dev/vda"), None);
        let mut f = facts(vec![disk("vda", 4 * GIB, 512, "A")]);
        let plan = make(&config, &f, &ids()).unwrap();
        assert_eq!(plan.system, "x86_64-linux");
        assert_eq!(plan.virtualisation, Virtualisation::Kvm);
        assert_eq!(plan.microcode, None, "a guest does not update microcode");
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["system"], "x86_64-linux");
        assert_eq!(json["virtualisation"], "kvm");

        f.machine = crate::machine::platform::Machine {
            arch: "aarch64".into(),
            virtualisation: Virtualisation::None,
            cpu_vendor: Some(CpuVendor::Amd),
        };
        f.firmware = Firmware::Uefi;
        let plan = make(&config, &f, &ids()).unwrap();
        assert_eq!(plan.system, "aarch64-linux");
        assert_eq!(plan.microcode, Some(CpuVendor::Amd));

        f.machine.arch = "riscv64".into();
        let err = make(&config, &f, &ids()).unwrap_err();
        assert!(crate::error::one_line(&err).contains("riscv64"), "{err}");
    }

    #[test]
    fn aarch64_without_uefi_is_refused_before_any_disk_is_chosen() {
        // No disk named and none present: the firmware refusal must come first.
        let config = choose(None, None);
        let mut f = facts(vec![]);
        f.machine.arch = "aarch64".into();
        f.firmware = Firmware::Bios;
        let err = make(&config, &f, &ids()).unwrap_err();
        let user = crate::error::as_user_error(&err).expect("a user error");
        assert!(user.problem.contains("UEFI"), "{user}");
        assert!(user.fix.contains("AAVMF"), "{user}");

        f.disks = vec![disk("vda", 4 * GIB, 512, "A")];
        f.firmware = Firmware::Uefi;
        let plan = make(&choose(Some("/dev/vda"), None), &f, &ids()).unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        assert!(
            !json.contains("bios"),
            "an aarch64 UEFI plan has no BIOS boot partition: {json}"
        );
        assert_eq!(plan.partitions[0].name, "ESP", "the ESP comes first");
    }

    /// An ECDSA host key made for this test (`ssh-keygen -t ecdsa -b 256`), fixed rather than
    /// made afresh: ssh-key 0.6 cannot read a key whose private scalar OpenSSH wrote shorter
    /// than the curve's size (1 in 512 at P-256, 1 in 4 at P-521; RustCrypto/SSH#356).
    const ECDSA_TEST_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAaAAAABNlY2RzYS
1zaGEyLW5pc3RwMjU2AAAACG5pc3RwMjU2AAAAQQSjUBYL77o5j3wQj9p515yWnyuJhuNp
ajMLZYSao2FtVBuE4AScreUVkq8oPGg0BSbduD1bVTfjyeqwUB4Gw7VIAAAAqEVL4T9FS+
E/AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBKNQFgvvujmPfBCP
2nnXnJafK4mG42lqMwtlhJqjYW1UG4TgBJyt5RWSryg8aDQFJt24PVtVN+PJ6rBQHgbDtU
gAAAAhAKVpBSmH5lBFNk797dq83gFNyLA6MXzuOQKslYGr7XjdAAAADXBsYW4gdGVzdCBr
ZXkBAg==
-----END OPENSSH PRIVATE KEY-----
";

    /// What used to fail after the wipe is settled while planning: a key comment that looks
    /// like a template placeholder is written as it is, a host key that is no key is refused
    /// (its file kept for a new try, its contents never quoted).
    #[test]
    fn input_the_steps_would_refuse_is_refused_while_planning() {
        let mut config = choose(Some("/dev/vda"), None);
        config.layout = Layout::BtrfsImpermanence;
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD deploy@word@ /*@imports@*/";
        config.runtime_info.ssh_authorized_keys = vec![key.into()];
        let f = facts(vec![disk("vda", 8 * GIB, 512, "A")]);
        let plan = make(&config, &f, &ids()).unwrap();
        let flake = crate::installer::steps::flake::render(&plan, None).unwrap();
        let configuration = flake.configuration.unwrap();
        assert!(configuration.contains(key), "{configuration}");

        let dir = tempfile::tempdir().unwrap();
        let ecdsa = dir.path().join("ssh_host_ecdsa_key");
        std::fs::write(&ecdsa, ECDSA_TEST_KEY).unwrap();
        config.provided_host_keys = vec![ecdsa.to_string_lossy().into_owned()];
        let plan = make(&config, &f, &ids()).unwrap();
        let persist = crate::installer::steps::flake::render(&plan, None)
            .unwrap()
            .persist
            .unwrap();
        assert!(persist.contains("type = \"ecdsa\";"), "{persist}");

        let garbage = dir.path().join("ssh_host_ed25519_key");
        std::fs::write(&garbage, "SECRET-BYTES not a key\n").unwrap();
        config
            .provided_host_keys
            .push(garbage.to_string_lossy().into_owned());
        let err = make(&config, &f, &ids()).unwrap_err();
        let user = crate::error::as_user_error(&err).expect("a user error");
        assert!(user.problem.contains(&*garbage.to_string_lossy()), "{user}");
        assert!(user.fix.contains("--host-keys"), "{user}");
        assert!(!user.to_string().contains("SECRET-BYTES"), "{user}");
        assert!(
            garbage.exists() && ecdsa.exists(),
            "the keys step still needs the files"
        );
    }

    #[test]
    fn impermanence_keeps_state_under_persist() {
        let mut config = choose(Some("/dev/vda"), None);
        config.layout = Layout::BtrfsImpermanence;
        let plan = make(&config, &facts(vec![disk("vda", 8 * GIB, 512, "A")]), &ids()).unwrap();
        assert!(plan.root_is_tmpfs());
        assert_eq!(plan.state_dir, "/persist");
        assert_eq!(plan.state_path("etc/ssh"), "/persist/etc/ssh");
        assert_eq!(
            plan.machine_id.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert!(plan
            .install_command
            .contains(&"/mnt/persist/etc/nixos#nixos".to_string()));
        assert_eq!(plan.install_tmpdir, "/mnt/nix/.nixos-kexec-tmp");
    }

    /// A flake access token names its host in the plan, never its value; a token no fetch
    /// would use is refused while planning, as `run` refuses it.
    #[test]
    fn a_flake_token_is_planned_by_host_only() {
        let f = facts(vec![disk("vda", 8 * GIB, 512, "A")]);
        let mut config = choose(Some("/dev/vda"), None);
        config.flake_token_given = true;
        let refused = |config: &Config, says: &str| {
            let err = make(config, &f, &ids()).unwrap_err();
            let text = crate::error::one_line(&err);
            assert!(text.contains(says), "{text}");
        };
        refused(&config, "no flake to fetch with it");
        for (reference, says) in [
            ("./cfg#web1", "a local directory"),
            ("git+https://github.com/me/private#web1", "github:me/private"),
        ] {
            config.runtime_info.flake = Some(UserFlake::parse(reference).unwrap());
            refused(&config, says);
        }
        config.runtime_info.flake =
            Some(UserFlake::parse("gitlab:me/private?host=git.corp.example#web1").unwrap());
        let plan = make(&config, &f, &ids()).unwrap();
        let user = plan.user_configuration.clone().unwrap();
        assert_eq!(
            user.access_token,
            Some(TokenHost {
                forge: crate::input::access_token::Forge::GitLab,
                host: "git.corp.example".into()
            })
        );
        let json = serde_json::to_string(&plan).unwrap();
        assert!(
            json.contains(r#""access_token":{"forge":"gitlab","host":"git.corp.example"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
        config.flake_token_given = false;
        let plan = make(&config, &f, &ids()).unwrap();
        assert_eq!(plan.user_configuration.unwrap().access_token, None);
    }
}
