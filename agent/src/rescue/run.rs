//! `nixos-kexec run`: gather, merge the operator's options, and kexec into the installer.
//! Everything that can refuse does so before the kexec, while the operator can still act.

use super::cpio::Archive;
use super::gather::{self, Gathered};
use super::kexec;
use crate::console;
use crate::error::{typed, user_error};
use crate::input::access_token::{self, AccessToken, TokenHost};
use crate::input::binary_cache::{PublicKey, StorePath, Substituter};
use crate::input::cmdline::{Params, COMMAND_LINE_SIZE};
use crate::input::config::{Config, Effect};
use crate::input::flake::{FlakeSource, UserFlake, PACKED_FLAKE_DIR};
use crate::input::runtime_info::{self, DiskSelector, RuntimeInfo};
use crate::installer::layout::PlanIds;
use crate::installer::plan;
use crate::installer::storage::MIB;
use crate::machine::facts::{Disk, Facts};
use crate::secret::Secret;
use anyhow::{Context, Result};
use base64::Engine;
use std::path::{Path, PathBuf};

use crate::input::config::{EXTRA_FILES_DIR, HOST_KEY_TYPES, SECRETS_DIR};
use crate::input::tree::{Tree, Walk};

/// The most file bytes `--extra-files` takes. The archive rides in RAM all the way: held whole
/// here, unpacked by the new kernel into the installer's initramfs, copied onto its tmpfs root,
/// and on a 1 GiB machine the installer and Nix need the rest.
pub const EXTRA_FILES_MAX_BYTES: u64 = 64 * MIB;

/// `nixos-kexec run`'s options; the doc comments are its `--help`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunOptions {
    /// Directory holding the installer's kernel (bzImage; Image on aarch64) and initrd.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Target disk: /dev/disk/by-id/..., /dev/sdX, or serial:SERIAL.
    #[arg(long)]
    pub disk: Option<String>,
    /// Hostname of the installed system (default: this system's).
    #[arg(long)]
    pub hostname: Option<String>,
    /// nixpkgs flake reference for the host flake.
    #[arg(long)]
    pub nixpkgs: Option<String>,
    /// A system built elsewhere (nix build ….config.system.build.toplevel) to install from
    /// --substituter, with nothing evaluated on the machine.
    #[arg(long, value_parser = typed(StorePath::parse))]
    pub system: Option<StorePath>,
    /// A binary cache (http://, https://, file://) to download from, besides cache.nixos.org;
    /// repeatable.
    #[arg(long = "substituter", value_parser = typed(Substituter::parse))]
    pub substituters: Vec<Substituter>,
    /// A key that signs those caches, NAME:BASE64 (nix key convert-secret-to-public);
    /// repeatable.
    #[arg(long = "trusted-public-key", value_parser = typed(PublicKey::parse))]
    pub trusted_public_keys: Vec<PublicKey>,
    /// Your own configuration, FLAKEREF#NAME (github:me/dotfiles#web1, or a local directory
    /// ./cfg#web1, which is packed and sent along), built with the generated modules.
    #[arg(long, value_parser = typed(UserFlake::parse))]
    pub flake: Option<UserFlake>,
    /// File with an access token for a private --flake on GitHub, GitLab or sourcehut (Nix's
    /// access-tokens); travels only in the appended initrd archive, for the fetch only.
    #[arg(long)]
    pub flake_token_file: Option<PathBuf>,
    /// SSH public keys for root (default: root's authorized_keys here); repeatable.
    #[arg(long = "ssh-key-file")]
    pub ssh_key_files: Vec<PathBuf>,
    /// File with the disk encryption passphrase; travels only in the appended initrd archive.
    #[arg(long)]
    pub disk_key_file: Option<PathBuf>,
    /// Directory with pre-made ssh_host_<type>_key files to install instead of new ones.
    #[arg(long)]
    pub host_keys: Option<PathBuf>,
    /// Directory copied onto the target's / (under /persist when / is a tmpfs), keeping modes,
    /// owners and links; travels only in the appended initrd archive.
    #[arg(long)]
    pub extra_files: Option<PathBuf>,
    /// Installer parameter KEY=VALUE (KEY without the nixos_kexec. prefix); repeatable.
    #[arg(long = "param", value_parser = crate::input::cmdline::param_option)]
    pub params: Vec<(String, String)>,
    /// Print the command line, the appended archive (secrets masked) and the plan; load nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// How the runtime info travels to the installer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Cmdline,
    CmdlineDeflated,
    Cpio,
}

/// Everything `run` hands to the kernel, decided before anything irreversible happens.
pub struct Handover {
    pub cmdline: String,
    pub carrier: Carrier,
    pub archive: Archive,
}

/// The last line `run` prints before the machine goes away (`deploy` waits for it).
pub const LOADED: &str = "installer loaded; rebooting into it now";

/// Every boot recipe of the installer carries it: see where it is pushed.
pub const ROOTFS_PARAM: &str = "rootfstype=ramfs";

/// Console parameters carried over from the running kernel, so the installer talks where the
/// operator is looking (and as verbosely); a serial and a screen console when there were none.
fn console_params(running_cmdline: &str) -> Vec<String> {
    let words = crate::input::cmdline::split(running_cmdline);
    let mut params: Vec<String> = words
        .iter()
        .filter(|w| w.starts_with("console="))
        .cloned()
        .collect();
    if params.is_empty() {
        params = vec![
            "console=tty0".into(),
            format!("console={},115200", kexec::DEFAULT_SERIAL),
        ];
    }
    params.extend(
        words
            .into_iter()
            .filter(|w| w.starts_with("loglevel=") || *w == "quiet"),
    );
    params
}

fn describe(disk: &Disk) -> String {
    format!(
        "{} ({} MiB, serial {}{})",
        disk.dev_path,
        disk.size_bytes / MIB,
        disk.serial.as_deref().unwrap_or("none"),
        disk.wwn
            .as_deref()
            .map(|w| format!(", WWN {w}"))
            .unwrap_or_default()
    )
}

/// Resolves `--disk` on this machine and returns how the installer will recognise it after the
/// kexec, where kernel names may differ: by the most specific identity no other disk here
/// shares (its WWN or NVMe namespace id, else its serial, else its path cross-checked with a
/// size no other disk has). When none is unique the installer could not be sure to find the
/// same disk, so `run` refuses here, before anything is loaded.
pub fn identify_disk(choice: Option<&str>, facts: &Facts) -> Result<DiskSelector> {
    let Some(choice) = choice else {
        let list: Vec<String> = facts.disks.iter().map(describe).collect();
        return Err(user_error(
            format!("No target disk given. Disks here: {}.", list.join("; ")),
            "pass --disk /dev/disk/by-id/... (or /dev/sdX, or serial:SERIAL).",
        ));
    };
    let found: Vec<&Disk> = facts
        .disks
        .iter()
        .filter(|d| match choice.strip_prefix("serial:") {
            Some(serial) => d.serial.as_deref() == Some(serial),
            None => match choice.strip_prefix("/dev/disk/by-id/") {
                Some(id) => d.by_id.iter().any(|own| own == id),
                None => d.dev_path == choice,
            },
        })
        .collect();
    let disk = match found.as_slice() {
        [one] => *one,
        [] => {
            // by-id links on the rescue system may use names we do not derive; follow the link.
            let resolved = std::fs::canonicalize(choice).ok();
            match resolved.and_then(|p| facts.disks.iter().find(|d| Path::new(&d.dev_path) == p)) {
                Some(disk) => disk,
                None => {
                    let list: Vec<String> = facts.disks.iter().map(describe).collect();
                    return Err(user_error(
                        format!(
                            "Disk {choice} is not on this machine. Disks here: {}.",
                            list.join("; ")
                        ),
                        "check the name with `nixos-kexec gather` and pass it with --disk.",
                    ));
                }
            }
        }
        _ => {
            return Err(user_error(
                format!("Disk {choice} matches several disks."),
                "pass a unique /dev/disk/by-id/... path.",
            ))
        }
    };
    if disk.read_only {
        return Err(user_error(
            format!("Disk {} is read-only.", describe(disk)),
            "choose a writable disk.",
        ));
    }
    // `disk`'s identity `of` gives, when it has one and no other disk here has it too.
    let own = |of: fn(&Disk) -> Option<&String>| {
        of(disk)
            .filter(|id| facts.disks.iter().filter(|d| of(d) == Some(id)).count() == 1)
            .cloned()
    };
    let size_bytes = Some(disk.size_bytes);
    if let Some(wwn) = own(|d| d.wwn.as_ref()) {
        return Ok(DiskSelector {
            wwn: Some(wwn),
            size_bytes,
            ..DiskSelector::default()
        });
    }
    if let Some(serial) = own(|d| d.serial.as_ref()) {
        return Ok(DiskSelector {
            serial: Some(serial),
            size_bytes,
            ..DiskSelector::default()
        });
    }
    if facts
        .disks
        .iter()
        .filter(|d| d.size_bytes == disk.size_bytes)
        .count()
        == 1
    {
        return Ok(DiskSelector {
            path: Some(disk.dev_path.clone()),
            size_bytes,
            ..DiskSelector::default()
        });
    }
    let alike: Vec<String> = facts
        .disks
        .iter()
        .filter(|d| d.size_bytes == disk.size_bytes && d.dev_path != disk.dev_path)
        .map(describe)
        .collect();
    Err(user_error(
        format!(
            "Disk {} cannot be told apart from {} after the kexec: device names can change, so the installer finds the disk again by its WWN, serial or size, and another disk here shares each one it has.",
            describe(disk),
            alike.join("; ")
        ),
        "give the disks distinct serial numbers (a setting of the provider's volume or of the VM), or detach the other disk for the install.",
    ))
}

fn read_secret(path: &Path, what: &str) -> Result<Secret> {
    let data = Secret::read(path).with_context(|| format!("reading the {what} from {}", path.display()))?;
    if data.is_empty() {
        return Err(user_error(
            format!("The {what} file {} is empty.", path.display()),
            "put the secret in the file.",
        ));
    }
    Ok(data)
}

/// Puts runtime info on the command line when it fits (deflated if that makes it fit),
/// otherwise into the appended archive.
pub fn hand_over(info: &RuntimeInfo, base_params: &[String], mut archive: Archive) -> Result<Handover> {
    let json = serde_json::to_vec(info).context("serialising runtime info")?;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // One byte under what the kernel keeps: the installer refuses a line of full length, whose
    // last parameter may have been cut.
    let fits = |line: &str| line.len() < COMMAND_LINE_SIZE - 1;
    let join = |extra: Option<String>| {
        let mut words = base_params.to_vec();
        words.extend(extra);
        words.join(" ")
    };
    let plain = join(Some(format!("nixos_kexec.info={}", encode(&json))));
    if fits(&plain) {
        return Ok(Handover {
            cmdline: plain,
            carrier: Carrier::Cmdline,
            archive,
        });
    }
    let deflated = join(Some(format!(
        "nixos_kexec.info_deflate={}",
        encode(&miniz_oxide::deflate::compress_to_vec(&json, 9))
    )));
    if fits(&deflated) {
        return Ok(Handover {
            cmdline: deflated,
            carrier: Carrier::CmdlineDeflated,
            archive,
        });
    }
    archive.file(crate::input::config::RUNTIME_INFO_FILE, 0o644, json, false);
    let cmdline = join(None);
    if !fits(&cmdline) {
        return Err(user_error(
            format!(
                "The installer's parameters alone are {} bytes, over the kernel's limit.",
                cmdline.len()
            ),
            "pass fewer --param options.",
        ));
    }
    Ok(Handover {
        cmdline,
        carrier: Carrier::Cpio,
        archive,
    })
}

/// RAM the installer needs: the compressed initrd and its unpacked copy (about 3x), the
/// appended archive and its unpacked copy, the kernel, and room for mkfs and the agent.
pub fn ram_needed(kernel_bytes: u64, initrd_bytes: u64, archive_bytes: u64) -> u64 {
    kernel_bytes + initrd_bytes * 4 + archive_bytes * 2 + 160 * MIB
}

pub fn prepare(
    options: &RunOptions,
    facts: &Facts,
    gathered: Gathered,
    running_cmdline: &str,
) -> Result<Handover> {
    if let Some(hostname) = &options.hostname {
        runtime_info::validate_hostname(hostname)?;
    }
    if let Some(nixpkgs) = &options.nixpkgs {
        runtime_info::validate_flake_ref(nixpkgs)?;
    }
    let mut ssh_authorized_keys = Vec::new();
    for file in &options.ssh_key_files {
        let keys = gather::root_authorized_keys(file);
        if keys.is_empty() {
            return Err(user_error(
                format!("{} holds no SSH public key.", file.display()),
                "pass an id_*.pub or authorized_keys file with --ssh-key-file.",
            ));
        }
        ssh_authorized_keys.extend(keys);
    }
    // The operator's options are a layer over what was gathered, as the installer's are.
    let mut info = gathered.info;
    info.overlay(RuntimeInfo {
        hostname: options.hostname.clone(),
        nixpkgs: options.nixpkgs.clone(),
        system: options.system.clone(),
        substituters: options.substituters.clone(),
        trusted_public_keys: options.trusted_public_keys.clone(),
        ssh_authorized_keys,
        ..RuntimeInfo::default()
    });
    if info.ssh_authorized_keys.is_empty() {
        let sudo_user = std::env::var("SUDO_USER").unwrap_or_default();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        if let Some((path, keys)) = gather::sudo_user_keys(&sudo_user, &passwd) {
            console::line(&format!(
                "root has no authorized_keys here; the installed system's root gets the {} key(s) of {sudo_user}, who ran sudo ({})",
                keys.len(),
                path.display()
            ));
            info.ssh_authorized_keys = keys;
        }
    }
    if info.ssh_authorized_keys.is_empty() {
        return Err(user_error(
            "No SSH key to put on the installed system: root has no authorized_keys here and none was given, so nobody could log in after the install.",
            "pass --ssh-key-file ~/.ssh/id_ed25519.pub.",
        ));
    }
    info.disk = Some(identify_disk(options.disk.as_deref(), facts)?);
    info.validate(runtime_info::Source::Info)?;

    let mut params = Params::default();
    let mut base = console_params(running_cmdline);
    // The kernel's own rootfs is a tmpfs capped at half the RAM, too small for a bundle with
    // Nix on a small machine; ramfs has no cap (the agent moves the root onto a tmpfs anyway).
    base.push(ROOTFS_PARAM.to_string());
    // The bundle's own parameters (the Nix bundle ships `kernel-params`), except consoles: the
    // operator is watching the rescue system's.
    let bundle_params = std::fs::read_to_string(options.bundle.join("kernel-params")).unwrap_or_default();
    base.extend(
        crate::input::cmdline::split(&bundle_params)
            .into_iter()
            .filter(|w| !w.starts_with("console=")),
    );
    for (key, value) in &options.params {
        let parameter = params.insert(key, value)?;
        if matches!(parameter.effect, Effect::RuntimeInfo(_)) {
            return Err(user_error(
                format!("--param {key} would replace the gathered runtime info."),
                "drop it; run builds the runtime info itself.",
            ));
        }
        if parameter.key == "flake" {
            return Err(user_error(
                "--param flake= would skip what run does for a flake (packing a local directory).",
                "pass it as --flake FLAKEREF#NAME.",
            ));
        }
        base.push(if value.is_empty() {
            format!("nixos_kexec.{key}")
        } else {
            format!("nixos_kexec.{key}={value}")
        });
    }

    let mut archive = Archive::default();
    if let Some(path) = &options.disk_key_file {
        archive.file(
            &format!("{SECRETS_DIR}/disk-passphrase"),
            0o600,
            read_secret(path, "disk passphrase")?,
            true,
        );
    }
    if let Some(dir) = &options.host_keys {
        for given in host_keys_in(dir)? {
            console::line(&format!(
                "host key: {}",
                crate::installer::steps::keys::fingerprint_line(&given.key)
            ));
            archive.file(&format!("{SECRETS_DIR}/{}", given.name), 0o600, given.data, true);
        }
    }
    if let Some(flake) = &options.flake {
        info.flake = Some(match &flake.source {
            FlakeSource::Remote(_) => flake.clone(),
            FlakeSource::Directory(dir) => {
                let packed = super::local_flake::pack(flake, dir, &mut archive)?;
                console::line(&format!(
                    "flake: {} packed, {} files, {} KiB (.gitignore respected); the installer builds {flake}",
                    dir.display(),
                    packed.summary.files,
                    packed.summary.bytes.div_ceil(1024)
                ));
                if !packed.private_files.is_empty() {
                    console::line(&format!(
                        "flake: warning: {} only their owner may read, but Nix copies the whole flake into the world-readable /nix/store; keep keys out of the flake (.gitignore them) and carry them with --extra-files",
                        packed.private_files.join(", ")
                    ));
                }
                flake.moved_to(Path::new(PACKED_FLAKE_DIR))
            }
        });
    }
    if let Some(dir) = &options.extra_files {
        let tree = walk_extra_files(dir)?;
        let summary = archive.tree(&tree, EXTRA_FILES_DIR)?;
        console::line(&format!("extra files from {}: {summary}", dir.display()));
    }
    if let Some(path) = &options.flake_token_file {
        let host = TokenHost::of(options.flake.as_ref())?;
        let token = AccessToken::parse(
            read_secret(path, "flake access token")?,
            &path.display().to_string(),
        )?;
        archive.file(
            &format!("{SECRETS_DIR}/{}", access_token::SECRET_NAME),
            0o600,
            token.into_secret(),
            true,
        );
        console::line(&format!(
            "flake: the access token for {host} travels in the appended archive; the installer's Nix uses it for the install only"
        ));
    }
    if options.host_keys.is_none() {
        // Made here rather than in the installer, so the operator sees the fingerprint before
        // the machine goes away and can pin it in known_hosts.
        let hostname = info
            .hostname
            .as_deref()
            .unwrap_or(crate::input::config::DEFAULT_HOSTNAME);
        let (private, fingerprint) = crate::installer::steps::keys::new_ed25519(&format!("root@{hostname}"))?;
        archive.file(
            &format!("{SECRETS_DIR}/ssh_host_ed25519_key"),
            0o600,
            Secret::new(private.as_bytes().to_vec()),
            true,
        );
        console::line(&format!("host key: {fingerprint}"));
    }
    hand_over(&info, &base, archive)
}

/// One `ssh_host_<type>_key` of `--host-keys DIR`.
pub struct GivenHostKey {
    /// The file's name, `ssh_host_ed25519_key`.
    pub name: String,
    pub data: Secret,
    pub key: ssh_key::PrivateKey,
}

/// The `ssh_host_<type>_key` files in `dir`, each an unencrypted OpenSSH private key; refused
/// when there is none.
pub fn host_keys_in(dir: &Path) -> Result<Vec<GivenHostKey>> {
    let mut found = Vec::new();
    for kind in HOST_KEY_TYPES {
        let name = format!("ssh_host_{kind}_key");
        let path = dir.join(&name);
        if !path.exists() {
            continue;
        }
        let data = read_secret(&path, "host key")?;
        let key = crate::installer::steps::keys::parse_host_key(
            &path,
            data.as_bytes(),
            "pass a directory with ssh_host_<type>_key files as ssh-keygen writes them, unencrypted.",
        )?;
        found.push(GivenHostKey { name, data, key });
    }
    if found.is_empty() {
        return Err(user_error(
            format!("{} holds no ssh_host_<type>_key file.", dir.display()),
            "pass the directory that holds ssh_host_ed25519_key (and .pub).",
        ));
    }
    Ok(found)
}

/// The tree of `--extra-files DIR`, refused when it cannot travel or is empty.
pub fn walk_extra_files(dir: &Path) -> Result<Tree> {
    let name = format!("--extra-files {}", dir.display());
    let tree = Tree::walk(
        dir,
        &Walk {
            name: &name,
            max_bytes: EXTRA_FILES_MAX_BYTES,
            why_limited: "the files travel in the installer's RAM, beside the installer itself.",
            too_large_fix: None,
            skip: None,
        },
    )?;
    if tree.entries.is_empty() {
        return Err(user_error(
            format!("{name}: the directory is empty."),
            "put the files in it as they should be under / on the target (e.g. DIR/etc/machine-id), or drop --extra-files.",
        ));
    }
    Ok(tree)
}

/// Plans here as the installer will (it sees the disk unmounted), so a layout that does not
/// fit, or an encrypted one without a passphrase, is refused while the operator can still act.
pub fn plan_as_installer(options: &RunOptions, facts: &Facts, handover: &Handover) -> Result<plan::Plan> {
    let mut after_kexec = facts.clone();
    for disk in &mut after_kexec.disks {
        disk.mounted_at.clear();
        disk.holders.clear();
    }
    let params = Params::parse(&handover.cmdline)?;
    let info_file = handover
        .archive
        .entries()
        .iter()
        .find(|e| e.path == crate::input::config::RUNTIME_INFO_FILE.trim_start_matches('/'))
        .map(|e| runtime_info::parse_json(e.data.as_bytes(), runtime_info::Source::File, false))
        .transpose()?;
    let mut config = Config::assemble(info_file, &params)?;
    config.disk_passphrase_given = options.disk_key_file.is_some();
    config.extra_files = handover.archive.tree_at(EXTRA_FILES_DIR);
    config.flake_token_given = options.flake_token_file.is_some();
    plan::make(&config, &after_kexec, &PlanIds::random())
}

pub fn run(options: &RunOptions, facts: &Facts, gathered: Gathered) -> Result<()> {
    let running_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let kernel = options.bundle.join(kexec::KERNEL_FILE);
    let initrd_path = options.bundle.join("initrd");
    let kernel_bytes = std::fs::metadata(&kernel)
        .with_context(|| format!("reading the bundle's kernel {}", kernel.display()))?
        .len();
    let initrd = std::fs::read(&initrd_path)
        .with_context(|| format!("reading the bundle's initrd {}", initrd_path.display()))?;
    let handover = prepare(options, facts, gathered, &running_cmdline)?;
    let needed = ram_needed(kernel_bytes, initrd.len() as u64, handover.archive.size() as u64);
    if facts.ram_bytes > 0 && facts.ram_bytes < needed {
        return Err(user_error(
            format!(
                "This machine has {} MiB of RAM; the installer bundle needs about {} MiB.",
                facts.ram_bytes / MIB,
                needed / MIB
            ),
            "use a smaller bundle (the minimal Nix-built one), fewer --extra-files, or add RAM.",
        ));
    }
    match handover.carrier {
        Carrier::Cmdline => console::line("runtime info travels on the kernel command line"),
        Carrier::CmdlineDeflated => console::line("runtime info travels on the kernel command line, deflated"),
        Carrier::Cpio => console::line(
            "runtime info is too large for the kernel command line; it travels in the appended initrd archive",
        ),
    }
    console::line(&format!(
        "kernel command line ({} bytes): {}",
        handover.cmdline.len(),
        handover.cmdline
    ));
    for line in handover.archive.listing() {
        console::line(&format!("appended archive: {line}"));
    }
    let plan = plan_as_installer(options, facts, &handover)?;
    console::line(&format!(
        "the installer will write layout {} ({} table) to {}",
        plan.layout.name(),
        plan.table.name(),
        plan.disk.dev_path
    ));
    if let (Some(extra), Some(dir)) = (&plan.extra_files, &options.extra_files) {
        console::line(&format!(
            "the installer will copy the extra files to {} on the target ({}/etc/x becomes {}/etc/x)",
            extra.destination,
            dir.display().to_string().trim_end_matches('/'),
            extra.destination.trim_end_matches('/')
        ));
    }
    if options.dry_run {
        console::line(&format!("plan-json: {}", serde_json::to_string(&plan)?));
        console::line("dry run: nothing was loaded");
        return Ok(());
    }
    let initrd = kexec::pad4(initrd);
    // Appended as its own part: the bundle's initrd is large, the archive (secrets) small and
    // locked in RAM.
    let archive = handover.archive.to_bytes();
    let initrd_file = kexec::memfd_with(&[&initrd, archive.as_bytes()])?;
    if let Err(native) = kexec::load(&kernel, &initrd_file, &handover.cmdline) {
        load_without_kexec_file_load(
            &kernel,
            &initrd,
            &archive,
            &initrd_file,
            &handover.cmdline,
            native,
        )?;
    }
    drop(archive);
    drop(initrd);
    console::line(LOADED);
    // An operator following over SSH (`deploy`) gets the line before the machine goes away.
    std::thread::sleep(std::time::Duration::from_secs(1));
    kexec::reboot_into_loaded()
}

/// When kexec_file_load refused: on arm64, kexec_load natively (Debian's arm64 kernels have
/// no kexec_file_load); then, or elsewhere, a `kexec` binary.
fn load_without_kexec_file_load(
    kernel: &Path,
    initrd: &[u8],
    archive: &Secret,
    initrd_file: &std::fs::File,
    cmdline: &str,
    native: anyhow::Error,
) -> Result<()> {
    #[cfg(target_arch = "aarch64")]
    let native = {
        // The refusal's problem only: its fix (kexec-tools) is what comes next if this fails.
        let problem = crate::error::as_user_error(&native)
            .map(|u| u.problem.clone())
            .unwrap_or_else(|| format!("{native:#}"));
        console::line(&format!("{problem} Loading it with kexec_load instead."));
        let image = std::fs::read(kernel).with_context(|| format!("reading {}", kernel.display()))?;
        // One contiguous initrd, the secrets in it locked and wiped like the archive.
        let whole = Secret::new([initrd, archive.as_bytes()].concat());
        match super::kexec_arm64::load(&image, whole.as_bytes(), cmdline) {
            Ok(()) => return Ok(()),
            Err(e) => e.context(format!("{native:#}")),
        }
    };
    #[cfg(not(target_arch = "aarch64"))]
    let _ = (initrd, archive);
    console::line(&format!("{native:#}; trying a kexec binary"));
    let initrd_path = kexec::path_for_children(initrd_file);
    kexec::load_with_binary(kernel, &initrd_path, cmdline).context(native)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::plan::tests::{disk, facts};

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD me@host";

    /// What `gather` reports for a BIOS machine with 1 GiB and one key in the runtime info.
    fn bios_machine_gathered() -> Gathered {
        Gathered {
            info: info(1),
            machine: gather::Machine {
                firmware: crate::machine::facts::Firmware::Bios,
                ram_bytes: 1 << 30,
                arch: "x86_64".into(),
                dmi_vendor: None,
                dmi_product: None,
                disks: vec![],
                root_disk: None,
            },
        }
    }

    fn info(keys: usize) -> RuntimeInfo {
        RuntimeInfo {
            version: 1,
            hostname: Some("web1".into()),
            ssh_authorized_keys: vec![KEY.to_string(); keys],
            ..RuntimeInfo::default()
        }
    }

    #[test]
    fn small_info_goes_on_the_cmdline_and_decodes() {
        let h = hand_over(&info(1), &["console=ttyS0".into()], Archive::default()).unwrap();
        assert_eq!(h.carrier, Carrier::Cmdline);
        let config = Config::assemble(None, &Params::parse(&h.cmdline).unwrap()).unwrap();
        assert_eq!(config.hostname(), "web1");
    }

    #[test]
    fn repetitive_info_is_deflated_and_huge_info_goes_to_cpio() {
        let h = hand_over(&info(20), &[], Archive::default()).unwrap();
        assert_eq!(h.carrier, Carrier::CmdlineDeflated);
        assert!(h.cmdline.len() < COMMAND_LINE_SIZE - 1);
        let config = Config::assemble(None, &Params::parse(&h.cmdline).unwrap()).unwrap();
        assert_eq!(config.ssh_authorized_keys().len(), 20);

        let mut big = info(0);
        // Random keys do not compress: 60 distinct ones cannot fit in 2 KiB.
        for _ in 0..60 {
            let k = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
            big.ssh_authorized_keys.push(k.public_key().to_openssh().unwrap());
        }
        let h = hand_over(&big, &["console=ttyS0".into()], Archive::default()).unwrap();
        assert_eq!(h.carrier, Carrier::Cpio);
        assert_eq!(h.cmdline, "console=ttyS0");
        let entry = &h
            .archive
            .entries()
            .iter()
            .find(|e| e.path.ends_with("runtime-info.json"))
            .unwrap()
            .data;
        assert_eq!(
            runtime_info::parse_json(entry.as_bytes(), runtime_info::Source::File, false).unwrap(),
            big
        );
    }

    #[test]
    fn disk_identity_prefers_serial_and_refuses_ambiguous_serialless() {
        let f = facts(vec![disk("vda", 4 << 30, 512, "A")]);
        let id = identify_disk(Some("/dev/vda"), &f).unwrap();
        assert_eq!(id.serial.as_deref(), Some("A"));
        assert_eq!(id.size_bytes, Some(4 << 30));
        assert!(identify_disk(None, &f).is_err());
        assert!(identify_disk(Some("/dev/vdz"), &f).is_err());

        let mut a = disk("vda", 4 << 30, 512, "A");
        let mut b = disk("vdb", 4 << 30, 512, "B");
        a.serial = None;
        b.serial = None;
        assert!(identify_disk(Some("/dev/vda"), &facts(vec![a.clone(), b])).is_err());
        let id = identify_disk(Some("/dev/vda"), &facts(vec![a])).unwrap();
        assert_eq!(id.path.as_deref(), Some("/dev/vda"));
    }

    /// Two namespaces of one NVMe controller: one serial, an EUI each.
    fn nvme_namespaces() -> Vec<Disk> {
        let mut disks = vec![
            disk("nvme0n1", 4 << 30, 512, "NV-SHARED"),
            disk("nvme0n2", 4 << 30, 512, "NV-SHARED"),
        ];
        for (i, d) in disks.iter_mut().enumerate() {
            d.transport = crate::machine::facts::Transport::Nvme;
            d.wwn = Some(format!("eui.00112233445566{i:02}"));
            d.by_id = vec![
                format!("nvme-Model_NV-SHARED_{}", i + 1),
                format!("nvme-eui.00112233445566{i:02}"),
            ];
        }
        disks
    }

    /// The most specific identity no other disk shares: WWN/EUI, then serial, then path and a
    /// size of its own; refused when even that is shared, listing the look-alike.
    #[test]
    fn disk_identity_is_the_most_specific_unique_one() {
        let f = facts(nvme_namespaces());
        let id = identify_disk(Some("/dev/nvme0n2"), &f).unwrap();
        assert_eq!(id.wwn.as_deref(), Some("eui.0011223344556601"));
        assert_eq!((id.serial, id.path, id.size_bytes), (None, None, Some(4 << 30)));

        // A WWN of its own wins over a serial of its own too.
        let mut one = nvme_namespaces();
        one.truncate(1);
        let id = identify_disk(Some("/dev/nvme0n1"), &facts(one)).unwrap();
        assert_eq!(id.wwn.as_deref(), Some("eui.0011223344556600"));

        // Multipath-like: serial and WWN shared, sizes differ.
        let mut a = disk("sda", 4 << 30, 512, "LUN-1");
        let mut b = disk("sdb", 5 << 30, 512, "LUN-1");
        a.wwn = Some("0x5000c50015ea71ac".into());
        b.wwn = a.wwn.clone();
        let id = identify_disk(Some("/dev/sdb"), &facts(vec![a.clone(), b.clone()])).unwrap();
        assert_eq!(
            id,
            DiskSelector {
                path: Some("/dev/sdb".into()),
                size_bytes: Some(5 << 30),
                ..DiskSelector::default()
            }
        );

        // The same in every way: refused before the kexec, naming both.
        b.size_bytes = a.size_bytes;
        let err = identify_disk(Some("/dev/sdb"), &facts(vec![a, b])).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.problem.contains("/dev/sdb") && user.problem.contains("/dev/sda"),
            "{user}"
        );
        assert!(user.problem.contains("WWN 0x5000c50015ea71ac"), "{user}");
        assert!(user.fix.contains("detach the other disk"), "{user}");
    }

    #[test]
    fn secrets_stay_off_the_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "correct horse battery staple").unwrap();
        let options = RunOptions {
            disk: Some("/dev/vda".into()),
            disk_key_file: Some(pass),
            ssh_key_files: vec![],
            ..RunOptions::default()
        };
        let f = facts(vec![disk("vda", 4 << 30, 512, "A")]);
        let gathered = bios_machine_gathered();
        let h = prepare(
            &options,
            &f,
            gathered,
            "BOOT_IMAGE=/vmlinuz console=ttyS0,115200 quiet",
        )
        .unwrap();
        assert!(!h.cmdline.contains("correct horse"));
        assert!(
            h.cmdline
                .starts_with("console=ttyS0,115200 quiet rootfstype=ramfs nixos_kexec.info="),
            "{}",
            h.cmdline
        );
        assert!(!h.archive.listing().join("\n").contains("correct horse"));
        assert!(h.archive.to_bytes().as_bytes().windows(5).any(|w| w == b"horse"));
    }

    /// The operator's options win over what was gathered; what they leave out is kept.
    #[test]
    fn options_are_a_layer_over_the_gathered_info() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.pub");
        std::fs::write(&keys, format!("{KEY}-operator\n{KEY}-other\n")).unwrap();
        let f = facts(vec![disk("vda", 4 << 30, 512, "A")]);
        let decoded = |options: &RunOptions| {
            let h = prepare(options, &f, bios_machine_gathered(), "console=ttyS0").unwrap();
            Config::assemble(None, &Params::parse(&h.cmdline).unwrap())
                .unwrap()
                .runtime_info
        };
        let mut options = RunOptions {
            disk: Some("/dev/vda".into()),
            ..RunOptions::default()
        };
        let gathered = decoded(&options);
        assert_eq!(gathered.hostname.as_deref(), Some("web1"));
        assert_eq!(gathered.ssh_authorized_keys, vec![KEY.to_string()]);
        assert_eq!(gathered.nixpkgs, None);
        options.hostname = Some("db1".into());
        options.nixpkgs = Some("github:me/nixpkgs".into());
        options.ssh_key_files = vec![keys];
        let system = "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-nixos-system-db1-26.05";
        options.system = Some(StorePath::parse(system).unwrap());
        options.substituters = vec![Substituter::parse("https://cache.example.com").unwrap()];
        options.trusted_public_keys =
            vec![PublicKey::parse(crate::input::binary_cache::NIXOS_CACHE_KEY).unwrap()];
        let chosen = decoded(&options);
        assert_eq!(chosen.hostname.as_deref(), Some("db1"));
        assert_eq!(chosen.nixpkgs.as_deref(), Some("github:me/nixpkgs"));
        assert_eq!(chosen.system, options.system);
        assert_eq!(chosen.substituters, options.substituters);
        assert_eq!(chosen.trusted_public_keys, options.trusted_public_keys);
        assert_eq!(
            chosen.ssh_authorized_keys,
            vec![format!("{KEY}-operator"), format!("{KEY}-other")]
        );
        assert_eq!(chosen.disk, gathered.disk);
        options.params = vec![("info-deflate".into(), "AAAA".into())];
        let Err(err) = prepare(&options, &f, bios_machine_gathered(), "") else {
            panic!("--param info_deflate must be refused");
        };
        assert!(crate::error::one_line(&err).contains("would replace"), "{err}");
    }

    /// A local flake directory travels in the archive and the installer is told where it is;
    /// a remote one travels as written; a directory without flake.nix, or `--param flake=`,
    /// is refused before anything is loaded.
    #[test]
    fn flake_directory_is_packed_and_remote_flake_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        std::fs::create_dir_all(&cfg).unwrap();
        let f = facts(vec![disk("vda", 4 << 30, 512, "A")]);
        let mut options = RunOptions {
            disk: Some("/dev/vda".into()),
            flake: Some(UserFlake::parse(&format!("{}#web1", cfg.display())).unwrap()),
            ..RunOptions::default()
        };
        let err = prepare(&options, &f, bios_machine_gathered(), "").err().unwrap();
        assert!(crate::error::one_line(&err).contains("has no flake.nix"), "{err}");

        std::fs::write(cfg.join("flake.nix"), "{ outputs = _: { }; }").unwrap();
        let h = prepare(&options, &f, bios_machine_gathered(), "console=ttyS0").unwrap();
        assert!(h
            .archive
            .listing()
            .iter()
            .any(|l| l.starts_with("file /etc/nixos-kexec/flake/flake.nix mode 644")));
        let plan = plan_as_installer(&options, &f, &h).unwrap();
        let user = plan.user_configuration.unwrap();
        assert_eq!(user.flake.to_string(), "/etc/nixos-kexec/flake#web1");
        assert_eq!(user.nixpkgs, None);

        options.flake = Some(UserFlake::parse("github:me/dotfiles#web1").unwrap());
        let h = prepare(&options, &f, bios_machine_gathered(), "console=ttyS0").unwrap();
        assert!(h.archive.listing().iter().all(|l| !l.contains("/flake/")));
        let plan = plan_as_installer(&options, &f, &h).unwrap();
        assert_eq!(
            plan.user_configuration.unwrap().flake.to_string(),
            "github:me/dotfiles#web1"
        );

        options.flake = None;
        options.params = vec![("flake".into(), "github:me/dotfiles#web1".into())];
        let err = prepare(&options, &f, bios_machine_gathered(), "").err().unwrap();
        assert!(
            crate::error::one_line(&err).contains("--flake FLAKEREF#NAME"),
            "{err}"
        );
    }

    /// The tree travels in the archive only (nothing of it on the command line, its secret's
    /// contents masked in the listing), and the plan made here says where it lands; a missing
    /// or empty directory is refused before anything is loaded.
    #[test]
    fn extra_files_travel_in_the_archive_and_are_planned() {
        let dir = tempfile::tempdir().unwrap();
        let extra = dir.path().join("extra");
        crate::input::tree::tests::sample(&extra);
        let f = facts(vec![disk("vda", 8 << 30, 512, "A")]);
        let mut options = RunOptions {
            disk: Some("/dev/vda".into()),
            extra_files: Some(extra.clone()),
            ..RunOptions::default()
        };
        let h = prepare(&options, &f, bios_machine_gathered(), "console=ttyS0").unwrap();
        assert!(
            !h.cmdline.contains("alice") && !h.cmdline.contains("extra"),
            "{}",
            h.cmdline
        );
        let listing = h.archive.listing().join("\n");
        assert!(!listing.contains("PRIVATE-KEY"), "{listing}");
        assert!(
            listing.contains("file /etc/nixos-kexec/extra-files/home/alice/.ssh/id_ed25519 mode 600, owner 1000:100, 18 bytes (secret, contents not shown)"),
            "{listing}"
        );
        let plan = plan_as_installer(&options, &f, &h).unwrap();
        let planned = plan.extra_files.unwrap();
        assert_eq!(planned.destination, "/");
        assert_eq!(
            planned.tree.entries,
            Tree::walk(&extra, &crate::input::tree::tests::RULES)
                .unwrap()
                .entries
        );
        assert!(plan.steps.contains(&crate::input::config::Step::ExtraFiles));
        options.params = vec![("layout".into(), "btrfs-impermanence".into())];
        let h = prepare(&options, &f, bios_machine_gathered(), "console=ttyS0").unwrap();
        let plan = plan_as_installer(&options, &f, &h).unwrap();
        assert_eq!(plan.extra_files.unwrap().destination, "/persist");

        for (bad, says) in [
            (dir.path().join("absent"), "does not exist"),
            (dir.path().join("empty"), "is empty"),
        ] {
            std::fs::create_dir_all(dir.path().join("empty")).unwrap();
            options.extra_files = Some(bad);
            let Err(err) = prepare(&options, &f, bios_machine_gathered(), "console=ttyS0") else {
                panic!("{says}: accepted");
            };
            let user = crate::error::as_user_error(&err).unwrap();
            assert!(user.problem.contains(says), "{user}");
        }
    }

    /// A flake access token travels as a masked secret and nowhere else, and the plan names its
    /// host; a token file that is empty or holds whitespace, or a token without a flake Nix
    /// would fetch with it, is refused before anything is loaded.
    #[test]
    fn flake_token_travels_as_a_secret_or_is_refused() {
        const TOKEN: &str = "ghp_N0tARealT0kenButL00ksLikeOne1234";
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let f = facts(vec![disk("vda", 4 << 30, 512, "A")]);
        let mut options = RunOptions {
            disk: Some("/dev/vda".into()),
            flake: Some(UserFlake::parse("github:me/private?host=git.corp.example#web1").unwrap()),
            flake_token_file: Some(file("token", &format!("{TOKEN}\n"))),
            ..RunOptions::default()
        };
        let h = prepare(&options, &f, bios_machine_gathered(), "console=ttyS0").unwrap();
        assert!(!h.cmdline.contains(TOKEN));
        let listing = h.archive.listing().join("\n");
        assert!(
            listing.contains("file /etc/nixos-kexec/secrets/flake-access-token mode 600, owner 0:0, 36 bytes (secret, contents not shown)"),
            "{listing}"
        );
        assert!(!listing.contains(TOKEN));
        let entry = h
            .archive
            .entries()
            .iter()
            .find(|e| e.path.ends_with("flake-access-token"))
            .unwrap();
        assert_eq!(entry.data.as_bytes(), TOKEN.as_bytes());
        let plan = plan_as_installer(&options, &f, &h).unwrap();
        let plan_json = serde_json::to_string(&plan).unwrap();
        assert!(plan_json.contains(r#""host":"git.corp.example""#), "{plan_json}");
        assert!(!plan_json.contains(TOKEN));

        let refused = |options: &RunOptions, says: &str| {
            let err = prepare(options, &f, bios_machine_gathered(), "").err().unwrap();
            let text = crate::error::one_line(&err);
            assert!(text.contains(says), "{text}");
            assert!(!text.contains("ghp_N0t"), "{text}");
        };
        for (text, says) in [
            ("", "is empty"),
            (&format!("{TOKEN} {TOKEN}\n"), "whitespace inside"),
        ] {
            options.flake_token_file = Some(file("bad", text));
            refused(&options, says);
        }
        options.flake_token_file = Some(file("token", TOKEN));
        for (flake, says) in [
            (None, "no flake to fetch with it"),
            (
                Some("git+https://github.com/me/private#web1"),
                "github:me/private",
            ),
            (Some("github:me/private?host=10.0.2.2:8443#web1"), "no port"),
        ] {
            options.flake = flake.map(|f| UserFlake::parse(f).unwrap());
            refused(&options, says);
        }
    }

    #[test]
    fn encrypted_layout_without_passphrase_is_refused_before_kexec() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "correct horse battery staple").unwrap();
        let f = facts(vec![disk("vda", 8 << 30, 512, "A")]);
        let gathered = bios_machine_gathered;
        let mut options = RunOptions {
            disk: Some("/dev/vda".into()),
            params: vec![("layout".into(), "luks-ext4".into())],
            ..RunOptions::default()
        };
        let h = prepare(&options, &f, gathered(), "console=ttyS0").unwrap();
        let err = plan_as_installer(&options, &f, &h).unwrap_err();
        assert!(crate::error::one_line(&err).contains("--disk-key-file"), "{err}");
        options.disk_key_file = Some(pass);
        let h = prepare(&options, &f, gathered(), "console=ttyS0").unwrap();
        let plan = plan_as_installer(&options, &f, &h).unwrap();
        assert_eq!(plan.luks.len(), 1);
        options.params = vec![("layout".into(), "zfs".into())];
        let h = prepare(&options, &f, gathered(), "console=ttyS0").unwrap();
        assert!(plan_as_installer(&options, &f, &h).is_err());
    }
}
