//! One `Config`, built once from the input's layers folded lowest first, the later winning
//! field by field: the bundle's defaults, the runtime-info file in the initrd,
//! `nixos_kexec.info=`, `info_deflate=`, the runtime info fetched from
//! `nixos_kexec.config_url=`, then single `nixos_kexec.*` parameters ([`PARAMETERS`]).

use crate::error::user_error;
use crate::input::binary_cache::{PublicKey, StorePath, Substituter};
use crate::input::cmdline::{percent_decode, Params, SerialConsole};
use crate::input::flake::{GeneratedPart, UserFlake};
use crate::input::report_url::ReportUrl;
use crate::input::runtime_info::{self, DiskSelector, Network, RuntimeInfo, Source};
use crate::input::tree::{Tree, Walk};
use crate::installer::storage::{self, Storage, Table};
use crate::installer::way_back::FailureReboot;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const RUNTIME_INFO_FILE: &str = "/etc/nixos-kexec/runtime-info.json";
pub const DEFAULTS_FILE: &str = "/etc/nixos-kexec/defaults.json";
pub const SECRETS_DIR: &str = "/etc/nixos-kexec/secrets";
/// The operator's extra files (`nixos-kexec run --extra-files DIR`), as they are to be laid
/// out under the target's `/` (or its persist path).
pub const EXTRA_FILES_DIR: &str = "/etc/nixos-kexec/extra-files";
pub const HOST_KEY_TYPES: [&str; 3] = ["ed25519", "rsa", "ecdsa"];
/// The release the flake's own nixpkgs input follows (flake.nix), for bundles without
/// /etc/nixos-kexec/defaults.json (the dev bundle). The Nix bundle writes its own nixpkgs and
/// `lib.trivial.release` there, and those win. Keep the two in step: a `system.stateVersion`
/// newer than the nixpkgs of the host flake names a release that system does not know.
pub const DEFAULT_NIXPKGS: &str = "github:NixOS/nixpkgs/nixos-26.05";
pub const DEFAULT_STATE_VERSION: &str = "26.05";
pub const DEFAULT_HOSTNAME: &str = "nixos";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Network,
    Wipe,
    Partition,
    Format,
    Mount,
    Keys,
    Flake,
    ExtraFiles,
    Install,
    Verify,
    Finish,
}

impl Step {
    pub const ALL: [Step; 11] = [
        Step::Network,
        Step::Wipe,
        Step::Partition,
        Step::Format,
        Step::Mount,
        Step::Keys,
        Step::Flake,
        Step::ExtraFiles,
        Step::Install,
        Step::Verify,
        Step::Finish,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Network => "network",
            Step::Wipe => "wipe",
            Step::Partition => "partition",
            Step::Format => "format",
            Step::Mount => "mount",
            Step::Keys => "keys",
            Step::Flake => "flake",
            Step::ExtraFiles => "extra_files",
            Step::Install => "install",
            Step::Verify => "verify",
            Step::Finish => "finish",
        }
    }

    pub fn parse(text: &str) -> Result<Step> {
        Step::ALL.into_iter().find(|s| s.name() == text).ok_or_else(|| {
            let names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
            user_error(
                format!("nixos_kexec.stop_before={text:?} names no step."),
                format!("use one of: {}.", names.join(", ")),
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    Reboot,
    Poweroff,
    Halt,
}

impl After {
    fn parse(text: &str) -> Result<After> {
        match text {
            "reboot" => Ok(After::Reboot),
            "poweroff" => Ok(After::Poweroff),
            "halt" => Ok(After::Halt),
            _ => Err(user_error(
                format!("nixos_kexec.after={text:?} is not an action."),
                "use reboot, poweroff or halt.",
            )),
        }
    }
}

/// The one-word disk layouts (README, "Disk layouts"); `Custom` is the declarative form given
/// as `storage` in the runtime info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    Ext4,
    Btrfs,
    BtrfsImpermanence,
    LuksBtrfs,
    LuksExt4,
    LuksBtrfsImpermanence,
    Custom,
}

impl Layout {
    pub const PRESETS: [Layout; 6] = [
        Layout::Ext4,
        Layout::Btrfs,
        Layout::BtrfsImpermanence,
        Layout::LuksBtrfs,
        Layout::LuksExt4,
        Layout::LuksBtrfsImpermanence,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layout::Ext4 => "ext4",
            Layout::Btrfs => "btrfs",
            Layout::BtrfsImpermanence => "btrfs-impermanence",
            Layout::LuksBtrfs => "luks-btrfs",
            Layout::LuksExt4 => "luks-ext4",
            Layout::LuksBtrfsImpermanence => "luks-btrfs-impermanence",
            Layout::Custom => "custom",
        }
    }

    pub fn parse(text: &str) -> Result<Layout> {
        let normalised = text.trim().to_ascii_lowercase().replace('_', "-");
        if normalised.contains("zfs") {
            return Err(crate::installer::storage::zfs_refusal(&format!(
                "Layout {text:?}"
            )));
        }
        if let Some(layout) = Layout::PRESETS.into_iter().find(|l| l.name() == normalised) {
            return Ok(layout);
        }
        if normalised == "custom" {
            return Err(user_error(
                "Layout custom needs the partitions described as \"storage\" in the runtime info.",
                "add a \"storage\" object to the runtime info (see the README), or choose a preset layout.",
            ));
        }
        let names: Vec<_> = Layout::PRESETS.iter().map(|l| l.name()).collect();
        Err(user_error(
            format!("Layout {text:?} is not supported by this installer."),
            format!(
                "use one of {} (see the README's layout table), or describe the partitions as \"storage\" in the runtime info.",
                names.join(", ")
            ),
        ))
    }

    /// Whether the layout asks for a LUKS container (and so for a disk passphrase).
    pub fn encrypts(self) -> bool {
        matches!(
            self,
            Layout::LuksBtrfs | Layout::LuksExt4 | Layout::LuksBtrfsImpermanence
        )
    }
}

/// How the operator chose the target disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskChoice {
    /// Nothing chosen: refuse to write, list the candidates.
    Unspecified,
    /// `disk=auto`: the only eligible disk, refuse when there are several.
    Auto,
    Selected(DiskSelector),
}

/// What one input source says, as a partial config: an empty field says nothing, so the layer
/// below shows through. Runtime-info sources fill `info` only; the parameters' layer may fill
/// any field.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    pub info: RuntimeInfo,
    /// `disk=auto`: the only eligible disk, whatever disk a lower layer names.
    pub disk_auto: bool,
    pub config_url: Option<String>,
    pub dry_run: Option<bool>,
    pub reinstall: Option<bool>,
    pub stop_before: Option<Step>,
    pub after: Option<After>,
    /// Read from the parameters' layer alone, before the config is built
    /// ([`Layers::failure_reboot_after`]).
    pub failure_reboot_after: Option<FailureReboot>,
}

impl From<RuntimeInfo> for Layer {
    fn from(info: RuntimeInfo) -> Layer {
        Layer {
            info,
            ..Layer::default()
        }
    }
}

impl Layer {
    /// Lays `upper` over this layer: what `upper` says wins, what it leaves empty stays.
    fn overlay(&mut self, upper: Layer) {
        // Destructured whole, so that a new field cannot be forgotten here.
        let Layer {
            info,
            disk_auto,
            config_url,
            dry_run,
            reinstall,
            stop_before,
            after,
            failure_reboot_after,
        } = upper;
        if info.disk.is_some() {
            self.disk_auto = false;
        }
        self.disk_auto |= disk_auto;
        self.info.overlay(info);
        self.config_url = config_url.or(self.config_url.take());
        self.dry_run = dry_run.or(self.dry_run);
        self.reinstall = reinstall.or(self.reinstall);
        self.stop_before = stop_before.or(self.stop_before);
        self.after = after.or(self.after);
        self.failure_reboot_after = failure_reboot_after.or(self.failure_reboot_after);
    }
}

/// One `nixos_kexec.*` parameter. [`PARAMETERS`] is the one list of them: the command line
/// accepts exactly these keys, and each entry says how its value is applied.
#[derive(Debug)]
pub struct Parameter {
    /// After the prefix, with underscores (`stop_before`).
    pub key: &'static str,
    pub effect: Effect,
}

#[derive(Debug, Clone, Copy)]
pub enum Effect {
    /// A whole runtime info, decoded into a layer of its own below config_url's answer.
    RuntimeInfo(Source),
    /// A yes/no setting of the parameters' layer: the key alone, `=1` or `=0`.
    Flag(fn(&mut Layer) -> &mut Option<bool>),
    /// A setting of the parameters' layer kept as written, once `check` (if any) accepts it.
    Text(
        fn(&mut Layer) -> &mut Option<String>,
        Option<fn(&str) -> Result<()>>,
    ),
    /// Any other setting of the parameters' layer, checked as it is set.
    Set(fn(&mut Layer, &str) -> Result<()>),
}

/// In this order in the message that names the known keys. layout, swap and table are checked
/// together once all layers are in ([`Layers::config`]), so runtime info and parameters give
/// the same errors for them.
pub const PARAMETERS: &[Parameter] = &[
    Parameter::new("info", Effect::RuntimeInfo(Source::Info)),
    Parameter::new("info_deflate", Effect::RuntimeInfo(Source::InfoDeflate)),
    Parameter::new("disk", Effect::Set(set_disk)),
    Parameter::new(
        "hostname",
        Effect::Text(
            |layer| &mut layer.info.hostname,
            Some(runtime_info::validate_hostname),
        ),
    ),
    Parameter::new("config_url", Effect::Text(|layer| &mut layer.config_url, None)),
    Parameter::new(
        "report_url",
        Effect::Set(|layer, value| {
            layer.info.report_url = Some(ReportUrl::parse(value)?);
            Ok(())
        }),
    ),
    Parameter::new("reinstall", Effect::Flag(|layer| &mut layer.reinstall)),
    Parameter::new("dry_run", Effect::Flag(|layer| &mut layer.dry_run)),
    Parameter::new(
        "stop_before",
        Effect::Set(|layer, value| {
            layer.stop_before = Some(Step::parse(value)?);
            Ok(())
        }),
    ),
    Parameter::new(
        "after",
        Effect::Set(|layer, value| {
            layer.after = Some(After::parse(value)?);
            Ok(())
        }),
    ),
    Parameter::new(
        "failure_reboot_after",
        Effect::Set(|layer, value| {
            layer.failure_reboot_after = Some(FailureReboot::parse(value)?);
            Ok(())
        }),
    ),
    Parameter::new("layout", Effect::Text(|layer| &mut layer.info.layout, None)),
    Parameter::new(
        "ssh_key",
        Effect::Set(|layer, value| {
            let key = percent_decode(value)?;
            runtime_info::validate_ssh_key(&key)?;
            layer.info.ssh_authorized_keys = vec![key];
            Ok(())
        }),
    ),
    Parameter::new(
        "nixpkgs",
        Effect::Text(
            |layer| &mut layer.info.nixpkgs,
            Some(runtime_info::validate_flake_ref),
        ),
    ),
    Parameter::new(
        "state_version",
        Effect::Text(
            |layer| &mut layer.info.state_version,
            Some(runtime_info::validate_state_version),
        ),
    ),
    Parameter::new("swap", Effect::Text(|layer| &mut layer.info.swap, None)),
    Parameter::new("table", Effect::Text(|layer| &mut layer.info.table, None)),
    Parameter::new(
        "system",
        Effect::Set(|layer, value| {
            layer.info.system = Some(StorePath::parse(value)?);
            Ok(())
        }),
    ),
    Parameter::new(
        "substituters",
        Effect::Set(|layer, value| {
            layer.info.substituters = comma_list(value, Substituter::parse)?;
            Ok(())
        }),
    ),
    Parameter::new(
        "trusted_public_keys",
        Effect::Set(|layer, value| {
            layer.info.trusted_public_keys = comma_list(value, PublicKey::parse)?;
            Ok(())
        }),
    ),
    Parameter::new(
        "flake",
        Effect::Set(|layer, value| {
            layer.info.flake = Some(UserFlake::parse(value)?);
            Ok(())
        }),
    ),
    Parameter::new(
        "generated",
        Effect::Set(|layer, value| {
            layer.info.generated = Some(match value {
                "none" => Vec::new(),
                _ => comma_list(value, GeneratedPart::parse)?,
            });
            Ok(())
        }),
    ),
];

/// A parameter's list: the kernel command line splits words at spaces, so items are
/// separated by commas.
fn comma_list<T>(value: &str, parse: fn(&str) -> Result<T>) -> Result<Vec<T>> {
    value
        .split(',')
        .filter(|item| !item.is_empty())
        .map(parse)
        .collect()
}

/// The parameter `key` names (after the prefix, with underscores).
pub fn parameter(key: &str) -> Option<&'static Parameter> {
    PARAMETERS.iter().find(|p| p.key == key)
}

/// Every key, in the table's order.
pub fn parameter_keys() -> Vec<&'static str> {
    PARAMETERS.iter().map(|p| p.key).collect()
}

impl Parameter {
    const fn new(key: &'static str, effect: Effect) -> Parameter {
        Parameter { key, effect }
    }

    /// Applies the value to the parameters' layer. A runtime-info parameter is a layer of its
    /// own ([`Layers::new`]) and leaves this one alone.
    fn apply(&self, layer: &mut Layer, value: &str) -> Result<()> {
        match self.effect {
            Effect::RuntimeInfo(_) => {}
            Effect::Flag(field) => *field(layer) = Some(parse_bool(self.key, value)?),
            Effect::Text(field, check) => {
                if let Some(check) = check {
                    check(value)?;
                }
                *field(layer) = Some(value.to_string());
            }
            Effect::Set(set) => set(layer, value)?,
        }
        Ok(())
    }
}

/// The whole input, read and decoded once, as layers lowest first. config_url's answer is
/// known only later (fetching it may need this input's network), so it is passed to
/// [`Layers::config`], which puts it in its place.
#[derive(Debug, Clone)]
pub struct Layers {
    /// The bundle's defaults, the initrd's runtime-info file, `info=`, `info_deflate=`.
    below_fetched: Vec<Layer>,
    /// The single parameters, the top layer.
    params: Layer,
    serial_console: Option<SerialConsole>,
    /// The bundle's defaults file's nixpkgs.
    bundle_nixpkgs: Option<String>,
}

impl Layers {
    /// The files under `root` (the initrd's `/`) and the parameters.
    pub fn read(root: &Path, params: &Params) -> Result<Layers> {
        let mut defaults = read_defaults_file(root)?;
        // The bundle's nixpkgs is a default, not a choice: the user's own flake brings its own
        // nixpkgs, which only a nixpkgs from the input overrides (`Config::nixpkgs_chosen`).
        let bundle_nixpkgs = defaults.as_mut().and_then(|d| d.nixpkgs.take());
        let files = [defaults, read_info_file(root)?].into_iter().flatten().collect();
        let mut layers = Layers::new(files, params)?;
        layers.bundle_nixpkgs = bundle_nixpkgs;
        Ok(layers)
    }

    /// Runtime-info files, lowest first, and the parameters.
    pub fn new(files: Vec<RuntimeInfo>, params: &Params) -> Result<Layers> {
        let mut below_fetched: Vec<Layer> = files.into_iter().map(Layer::from).collect();
        // Decoded before any single parameter is applied, and in the table's order.
        for parameter in PARAMETERS {
            if let (Effect::RuntimeInfo(source), Some(value)) = (parameter.effect, params.get(parameter.key))
            {
                let info = runtime_info::from_param(value, source, params.possibly_truncated)?;
                below_fetched.push(info.into());
            }
        }
        let mut top = Layer::default();
        for (parameter, value) in params.iter() {
            parameter.apply(&mut top, value)?;
        }
        Ok(Layers {
            below_fetched,
            params: top,
            serial_console: params.serial_console.clone(),
            bundle_nixpkgs: None,
        })
    }

    /// What a run that fails before writing to a disk does: the parameter, or the default.
    /// Known as soon as the layers are read, so it holds for every failure after that, also
    /// one in building the config or in fetching config_url.
    pub fn failure_reboot_after(&self) -> FailureReboot {
        self.params.failure_reboot_after.unwrap_or_default()
    }

    /// Folds the layers, `fetched` (config_url's answer) between `info_deflate=` and the
    /// parameters, and builds the config from the result.
    pub fn config(&self, fetched: Option<RuntimeInfo>) -> Result<Config> {
        let mut merged = Layer::from(RuntimeInfo {
            version: runtime_info::VERSION,
            ..RuntimeInfo::default()
        });
        let layers = self.below_fetched.iter().cloned();
        for layer in layers
            .chain(fetched.map(Layer::from))
            .chain([self.params.clone()])
        {
            merged.overlay(layer);
        }
        let mut config = Config::build(merged, self.serial_console.clone())?;
        config.bundle_nixpkgs = self.bundle_nixpkgs.clone();
        Ok(config)
    }
}

fn read_info_file(root: &Path) -> Result<Option<RuntimeInfo>> {
    read_json(root, RUNTIME_INFO_FILE, Source::File)
}

fn read_defaults_file(root: &Path) -> Result<Option<RuntimeInfo>> {
    read_json(root, DEFAULTS_FILE, Source::Defaults)
}

fn read_json(root: &Path, file: &str, source: Source) -> Result<Option<RuntimeInfo>> {
    let path = root.join(file.trim_start_matches('/'));
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(runtime_info::parse_json(&bytes, source, false)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The input layers folded into one: the only copy of the hostname, disk, SSH keys,
    /// network, nixpkgs, state version and storage (the methods below read them, with the
    /// defaults), and of layout, swap and table as they were written. The target gets it as
    /// runtime-info.json.
    pub runtime_info: RuntimeInfo,
    /// `nixos_kexec.disk=auto`, which wins over the disk `runtime_info` names.
    pub disk_auto: bool,
    /// Parsed from `runtime_info` (`Custom` when it has `storage`).
    pub layout: Layout,
    /// Swap partition size for the preset layouts; 0 for none.
    pub swap_bytes: u64,
    /// Partition table for the preset layouts.
    pub table: Table,
    pub dry_run: bool,
    pub stop_before: Option<Step>,
    /// `None`: reboot after an install; stay at the console after a dry run.
    pub after: Option<After>,
    pub config_url: Option<String>,
    /// Install even over a disk that holds a finished nixos-kexec install (`nixos_kexec.reinstall`).
    pub reinstall: bool,
    /// Paths of host private keys found in the secrets archive.
    pub provided_host_keys: Vec<String>,
    /// Whether a disk passphrase came in the secrets archive (its value is never kept here).
    pub disk_passphrase_given: bool,
    /// The operator's extra files found in the initrd ([`EXTRA_FILES_DIR`]), as walked.
    pub extra_files: Option<Tree>,
    /// Whether an access token for the user's flake came in the secrets archive (never its
    /// value).
    #[serde(default)]
    pub flake_token_given: bool,
    /// The serial console the installer runs with (the kernel command line's last serial
    /// `console=`), for the installed system too.
    pub serial_console: Option<SerialConsole>,
    /// The nixpkgs of the bundle's defaults file, for the generic host flake when the input
    /// names none.
    #[serde(default)]
    pub bundle_nixpkgs: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            runtime_info: RuntimeInfo {
                version: runtime_info::VERSION,
                ..RuntimeInfo::default()
            },
            disk_auto: false,
            layout: Layout::Ext4,
            swap_bytes: 0,
            table: Table::Gpt,
            dry_run: false,
            stop_before: None,
            after: None,
            config_url: None,
            reinstall: false,
            provided_host_keys: Vec::new(),
            disk_passphrase_given: false,
            extra_files: None,
            flake_token_given: false,
            serial_console: None,
            bundle_nixpkgs: None,
        }
    }
}

impl Config {
    /// Builds the config from an optional runtime-info file and the parsed parameters.
    pub fn assemble(file: Option<RuntimeInfo>, params: &Params) -> Result<Config> {
        Layers::new(file.into_iter().collect(), params)?.config(None)
    }

    /// The config from the folded layers, with the defaults for what none of them says.
    fn build(merged: Layer, serial_console: Option<SerialConsole>) -> Result<Config> {
        let Layer {
            info,
            disk_auto,
            config_url,
            dry_run,
            reinstall,
            stop_before,
            after,
            // The installer reads it from the layers (Layers::failure_reboot_after): it must
            // hold when building the config fails.
            failure_reboot_after: _,
        } = merged;
        let (layout, swap_bytes, table) = resolve_layout(&info)?;
        Ok(Config {
            runtime_info: info,
            disk_auto,
            layout,
            swap_bytes,
            table,
            dry_run: dry_run.unwrap_or(false),
            stop_before,
            after,
            config_url,
            reinstall: reinstall.unwrap_or(false),
            provided_host_keys: Vec::new(),
            disk_passphrase_given: false,
            extra_files: None,
            flake_token_given: false,
            serial_console,
            bundle_nixpkgs: None,
        })
    }

    pub fn hostname(&self) -> &str {
        self.runtime_info.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME)
    }

    pub fn disk(&self) -> DiskChoice {
        match (&self.runtime_info.disk, self.disk_auto) {
            (_, true) => DiskChoice::Auto,
            (Some(selector), false) => DiskChoice::Selected(selector.clone()),
            (None, false) => DiskChoice::Unspecified,
        }
    }

    pub fn ssh_authorized_keys(&self) -> &[String] {
        &self.runtime_info.ssh_authorized_keys
    }

    pub fn network(&self) -> Option<&Network> {
        self.runtime_info.network.as_ref()
    }

    pub fn nixpkgs(&self) -> &str {
        self.nixpkgs_chosen()
            .or(self.bundle_nixpkgs.as_deref())
            .unwrap_or(DEFAULT_NIXPKGS)
    }

    /// The nixpkgs the input names (runtime info, config_url, parameters), not a default.
    pub fn nixpkgs_chosen(&self) -> Option<&str> {
        self.runtime_info.nixpkgs.as_deref()
    }

    pub fn state_version(&self) -> &str {
        self.runtime_info
            .state_version
            .as_deref()
            .unwrap_or(DEFAULT_STATE_VERSION)
    }

    /// The declarative layout (`layout` is then `Custom`).
    pub fn storage(&self) -> Option<&Storage> {
        self.runtime_info.storage.as_ref()
    }

    /// Notes which secrets the initrd carries under `root`, without reading their values.
    pub fn find_secrets(&mut self, root: &Path) {
        let dir = root.join(SECRETS_DIR.trim_start_matches('/'));
        self.provided_host_keys = host_key_files(&dir)
            .iter()
            .map(|path| path.to_string_lossy().into_owned())
            .collect();
        self.disk_passphrase_given = dir.join("disk-passphrase").is_file();
        self.flake_token_given = dir.join(crate::input::access_token::SECRET_NAME).is_file();
    }

    /// Reads the tree of extra files the initrd carries under `root`, if any; refuses what
    /// cannot be copied as it is (a hand-made archive may hold anything).
    pub fn find_extra_files(&mut self, root: &Path) -> Result<()> {
        let dir = root.join(EXTRA_FILES_DIR.trim_start_matches('/'));
        if !dir.exists() {
            return Ok(());
        }
        let name = format!("the extra files in the installer ({EXTRA_FILES_DIR})");
        let tree = Tree::walk(
            &dir,
            &Walk {
                name: &name,
                // Already in RAM here: the rescue side limited what it packed.
                max_bytes: u64::MAX,
                why_limited: "",
                too_large_fix: None,
                skip: None,
            },
        )?;
        self.extra_files = Some(tree).filter(|tree| !tree.entries.is_empty());
        Ok(())
    }
}

/// The host private keys in a secrets directory (`ssh_host_<type>_key`), in [`HOST_KEY_TYPES`]
/// order.
pub fn host_key_files(secrets: &Path) -> Vec<std::path::PathBuf> {
    HOST_KEY_TYPES
        .iter()
        .map(|kind| secrets.join(format!("ssh_host_{kind}_key")))
        .filter(|path| path.is_file())
        .collect()
}

/// Settles the layout from the merged runtime info: a declarative `storage`, or a preset with
/// its `swap` and `table` options.
fn resolve_layout(info: &RuntimeInfo) -> Result<(Layout, u64, Table)> {
    if info.storage.is_some() {
        if let Some(layout) = info.layout.as_deref().filter(|l| *l != "custom") {
            return Err(user_error(
                format!("Both layout {layout:?} and a declarative \"storage\" were given."),
                "drop the layout (or set it to custom) to use the storage description, or drop storage to use the preset.",
            ));
        }
        if info.swap.is_some() || info.table.is_some() {
            return Err(user_error(
                "swap and table options were given together with a declarative \"storage\", which describes the swap partition and the table itself.",
                "drop swap/table, and describe a swap partition and \"table\" in storage.",
            ));
        }
        return Ok((Layout::Custom, 0, Table::Gpt));
    }
    Ok((
        Layout::parse(info.layout.as_deref().unwrap_or("ext4"))?,
        storage::parse_swap(info.swap.as_deref().unwrap_or("0"))?,
        Table::parse(info.table.as_deref().unwrap_or("gpt"))?,
    ))
}

fn set_disk(layer: &mut Layer, value: &str) -> Result<()> {
    if value == "auto" {
        layer.disk_auto = true;
        return Ok(());
    }
    let selector = if value.starts_with("/dev/") {
        DiskSelector {
            path: Some(value.to_string()),
            ..DiskSelector::default()
        }
    } else if let Some(serial) = value.strip_prefix("serial:") {
        DiskSelector {
            serial: Some(serial.to_string()),
            ..DiskSelector::default()
        }
    } else {
        return Err(user_error(
            format!("nixos_kexec.disk={value:?} names no disk."),
            "give a device path (/dev/vda, /dev/disk/by-id/...), serial:SERIAL, or auto (the only eligible disk).",
        ));
    };
    layer.info.disk = Some(selector);
    Ok(())
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "" | "1" | "yes" | "true" => Ok(true),
        "0" | "no" | "false" => Ok(false),
        _ => Err(user_error(
            format!("nixos_kexec.{key}={value:?} is not a yes/no value."),
            format!("write nixos_kexec.{key} alone, or =1 / =0."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn single_parameters_override_runtime_info() {
        let info = r#"{"version":1,"hostname":"from-info","disk":{"path":"/dev/vda"}}"#;
        let encoded = base64::engine::general_purpose::STANDARD.encode(info);
        let params = Params::parse(&format!(
            "nixos_kexec.info={encoded} nixos_kexec.hostname=from-param nixos_kexec.stop_before=install nixos_kexec.after=poweroff"
        ))
        .unwrap();
        let file = RuntimeInfo {
            version: 1,
            hostname: Some("from-file".into()),
            nixpkgs: Some("github:me/nixpkgs".into()),
            ..RuntimeInfo::default()
        };
        let config = Config::assemble(Some(file), &params).unwrap();
        assert_eq!(config.hostname(), "from-param");
        assert_eq!(config.nixpkgs(), "github:me/nixpkgs");
        assert_eq!(config.stop_before, Some(Step::Install));
        assert_eq!(config.after, Some(After::Poweroff));
        assert!(
            matches!(config.disk(), DiskChoice::Selected(ref d) if d.path.as_deref() == Some("/dev/vda"))
        );
    }

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD";

    /// Assembles from the six layers, lowest first: the bundle's defaults, the initrd's
    /// runtime-info file, `info=`, `info_deflate=`, config_url's answer, and parameters (a
    /// command-line fragment). A `None` layer says nothing.
    fn assemble_six(infos: [Option<RuntimeInfo>; 5], params: &str) -> Result<Config> {
        use base64::engine::general_purpose::STANDARD;
        let [defaults, file, info, deflated, fetched] = infos;
        let mut line = String::from(params);
        if let Some(info) = info {
            line += &format!(
                " nixos_kexec.info={}",
                STANDARD.encode(serde_json::to_vec(&info)?)
            );
        }
        if let Some(info) = deflated {
            let json = serde_json::to_vec(&info)?;
            let packed = miniz_oxide::deflate::compress_to_vec(&json, 9);
            line += &format!(" nixos_kexec.info_deflate={}", STANDARD.encode(packed));
        }
        let files = [defaults, file].into_iter().flatten().collect();
        Layers::new(files, &Params::parse(&line)?)?.config(fetched)
    }

    /// One field's values per layer, and how to read the field back.
    struct Field {
        name: &'static str,
        set: fn(&mut RuntimeInfo, usize),
        /// The parameter that sets it in the top layer, if there is one.
        param: Option<fn(usize) -> String>,
        /// What the config and the target's runtime info hold when layer `i` is the highest
        /// that sets it.
        check: fn(&Config, usize),
    }

    fn storage_sized(i: usize) -> Storage {
        Storage {
            partitions: vec![crate::installer::storage::PartitionSpec {
                size: format!("{}G", i + 1),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    const LAYOUTS: [&str; 6] = [
        "ext4",
        "btrfs",
        "luks-ext4",
        "luks-btrfs",
        "btrfs-impermanence",
        "Luks_Btrfs_Impermanence",
    ];
    const TABLES: [&str; 6] = ["gpt", "mbr", "dos", "msdos", "gpt", "mbr"];

    fn fields() -> Vec<Field> {
        vec![
            Field {
                name: "hostname",
                set: |info, i| info.hostname = Some(format!("h{i}")),
                param: Some(|i| format!("nixos_kexec.hostname=h{i}")),
                check: |config, i| {
                    assert_eq!(config.hostname(), format!("h{i}"));
                    assert_eq!(config.runtime_info.hostname, Some(format!("h{i}")));
                },
            },
            Field {
                name: "disk",
                set: |info, i| {
                    info.disk = Some(DiskSelector {
                        serial: Some(format!("S{i}")),
                        ..DiskSelector::default()
                    })
                },
                param: Some(|i| format!("nixos_kexec.disk=serial:S{i}")),
                check: |config, i| {
                    let wanted = DiskSelector {
                        serial: Some(format!("S{i}")),
                        ..DiskSelector::default()
                    };
                    assert_eq!(config.disk(), DiskChoice::Selected(wanted.clone()));
                    assert_eq!(config.runtime_info.disk, Some(wanted));
                },
            },
            Field {
                name: "layout",
                set: |info, i| info.layout = Some(LAYOUTS[i].into()),
                param: Some(|i| format!("nixos_kexec.layout={}", LAYOUTS[i])),
                check: |config, i| {
                    assert_eq!(config.layout, Layout::parse(LAYOUTS[i]).unwrap());
                    assert_eq!(config.runtime_info.layout.as_deref(), Some(LAYOUTS[i]));
                },
            },
            Field {
                name: "swap",
                set: |info, i| info.swap = Some(format!("{}M", 16 + i)),
                param: Some(|i| format!("nixos_kexec.swap={}M", 16 + i)),
                check: |config, i| {
                    assert_eq!(config.swap_bytes, (16 + i as u64) << 20);
                    assert_eq!(config.runtime_info.swap, Some(format!("{}M", 16 + i)));
                },
            },
            Field {
                name: "table",
                set: |info, i| info.table = Some(TABLES[i].into()),
                param: Some(|i| format!("nixos_kexec.table={}", TABLES[i])),
                check: |config, i| {
                    assert_eq!(config.table, Table::parse(TABLES[i]).unwrap());
                    assert_eq!(config.runtime_info.table.as_deref(), Some(TABLES[i]));
                },
            },
            Field {
                name: "ssh_authorized_keys",
                set: |info, i| {
                    info.ssh_authorized_keys = vec![format!("{KEY} k{i}"), format!("{KEY} also{i}")]
                },
                param: Some(|i| format!("nixos_kexec.ssh_key={}+k{i}", KEY.replace(' ', "+"))),
                check: |config, i| {
                    let wanted = if i == 5 {
                        vec![format!("{KEY} k{i}")]
                    } else {
                        vec![format!("{KEY} k{i}"), format!("{KEY} also{i}")]
                    };
                    assert_eq!(config.ssh_authorized_keys(), wanted);
                    assert_eq!(config.runtime_info.ssh_authorized_keys, wanted);
                },
            },
            Field {
                name: "nixpkgs",
                set: |info, i| info.nixpkgs = Some(format!("github:me/n{i}")),
                param: Some(|i| format!("nixos_kexec.nixpkgs=github:me/n{i}")),
                check: |config, i| {
                    assert_eq!(config.nixpkgs(), format!("github:me/n{i}"));
                    assert_eq!(config.runtime_info.nixpkgs, Some(format!("github:me/n{i}")));
                },
            },
            Field {
                name: "state_version",
                set: |info, i| info.state_version = Some(format!("20.0{i}")),
                param: Some(|i| format!("nixos_kexec.state_version=20.0{i}")),
                check: |config, i| {
                    assert_eq!(config.state_version(), format!("20.0{i}"));
                    assert_eq!(config.runtime_info.state_version, Some(format!("20.0{i}")));
                },
            },
            Field {
                name: "network",
                set: |info, i| {
                    info.network = Some(Network {
                        nameservers: vec![std::net::IpAddr::from([192, 0, 2, i as u8])],
                        ..Network::default()
                    })
                },
                param: None,
                check: |config, i| {
                    let wanted = Network {
                        nameservers: vec![std::net::IpAddr::from([192, 0, 2, i as u8])],
                        ..Network::default()
                    };
                    assert_eq!(config.network(), Some(&wanted));
                    assert_eq!(config.runtime_info.network, Some(wanted));
                },
            },
            Field {
                name: "storage",
                set: |info, i| info.storage = Some(storage_sized(i)),
                param: None,
                check: |config, i| {
                    assert_eq!(config.layout, Layout::Custom);
                    assert_eq!(config.storage(), Some(&storage_sized(i)));
                    assert_eq!(config.runtime_info.storage, Some(storage_sized(i)));
                },
            },
        ]
    }

    /// For every field and every layer: when that layer is the highest to set the field, its
    /// value is the one the config and the target's runtime info get, whatever lower layers say.
    #[test]
    fn each_layer_wins_over_the_ones_below() {
        for field in fields() {
            let layers = if field.param.is_some() { 6 } else { 5 };
            for top in 0..layers {
                let infos = std::array::from_fn(|i| {
                    (i <= top).then(|| {
                        let mut info = RuntimeInfo {
                            version: 1,
                            ..RuntimeInfo::default()
                        };
                        (field.set)(&mut info, i);
                        info
                    })
                });
                let params = match field.param {
                    Some(param) if top == 5 => param(5),
                    _ => String::new(),
                };
                let config = assemble_six(infos, &params)
                    .unwrap_or_else(|e| panic!("{} from layer {top}: {e:#}", field.name));
                // Shown with a failing assertion (the test harness prints captured output).
                eprintln!("checking {} from layer {top}", field.name);
                (field.check)(&config, top);
            }
        }
    }

    /// Nothing given: the compiled-in defaults, and a runtime info that names nothing.
    #[test]
    fn no_layer_leaves_the_defaults() {
        let config = assemble_six([None, None, None, None, None], "").unwrap();
        assert_eq!(
            config,
            Config::default(),
            "an empty input must assemble to Config::default()"
        );
        assert_eq!(config.hostname(), DEFAULT_HOSTNAME);
        assert_eq!(config.disk(), DiskChoice::Unspecified);
        assert_eq!(
            config.runtime_info,
            RuntimeInfo {
                version: runtime_info::VERSION,
                ..RuntimeInfo::default()
            }
        );
    }

    /// `disk=auto` wins over a disk the runtime info names, and leaves that disk in the
    /// runtime info the target gets.
    #[test]
    fn disk_auto_wins_and_keeps_the_named_disk_in_the_runtime_info() {
        let named = DiskSelector {
            serial: Some("S1".into()),
            ..DiskSelector::default()
        };
        let info = RuntimeInfo {
            version: 1,
            disk: Some(named.clone()),
            ..RuntimeInfo::default()
        };
        let config = assemble_six([None, None, None, None, Some(info)], "nixos_kexec.disk=auto").unwrap();
        assert_eq!(config.disk(), DiskChoice::Auto);
        assert_eq!(config.runtime_info.disk, Some(named));
    }

    /// Settings only parameters make: the last occurrence wins, and nothing else sets them.
    #[test]
    fn parameter_only_settings() {
        let config = assemble_six(
            [None, None, None, None, None],
            "nixos_kexec.dry_run=0 nixos_kexec.dry_run nixos_kexec.reinstall=yes nixos_kexec.stop_before=wipe nixos_kexec.stop_before=flake nixos_kexec.after=halt nixos_kexec.config_url=http://a/ nixos_kexec.config_url=http://b/",
        )
        .unwrap();
        assert!(config.dry_run && config.reinstall);
        assert_eq!(config.stop_before, Some(Step::Flake));
        assert_eq!(config.after, Some(After::Halt));
        assert_eq!(config.config_url.as_deref(), Some("http://b/"));
        let none = assemble_six([None, None, None, None, None], "").unwrap();
        assert!(!none.dry_run && !none.reinstall);
        assert_eq!(
            (none.stop_before, none.after, none.config_url),
            (None, None, None)
        );
    }

    /// The way back's setting is known from the layers, so it holds when the config they fold
    /// into is refused; without the parameter, the default.
    #[test]
    fn failure_reboot_after_holds_when_the_config_is_refused() {
        let params = Params::parse("nixos_kexec.layout=zfs nixos_kexec.failure_reboot_after=never").unwrap();
        let layers = Layers::new(vec![], &params).unwrap();
        assert!(layers.config(None).is_err());
        assert_eq!(layers.failure_reboot_after(), FailureReboot::Never);
        let params = Params::parse("nixos_kexec.failure-reboot-after=90s").unwrap();
        assert_eq!(
            Layers::new(vec![], &params).unwrap().failure_reboot_after(),
            FailureReboot::After(std::time::Duration::from_secs(90))
        );
        let none = Layers::new(vec![], &Params::default()).unwrap();
        assert_eq!(none.failure_reboot_after(), FailureReboot::default());
    }

    /// Runtime info on the command line is decoded before any single parameter is applied, so
    /// its error is the one reported when both are bad.
    #[test]
    fn runtime_info_errors_come_before_parameter_errors() {
        let err = assemble_six(
            [None, None, None, None, None],
            "nixos_kexec.after=explode nixos_kexec.info=!!!",
        )
        .unwrap_err();
        assert!(crate::error::one_line(&err).contains("base64"), "{err}");
    }

    /// The README's table of kernel parameters and [`PARAMETERS`] name the same keys.
    #[test]
    fn readme_documents_every_parameter() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("\n## Kernel parameters\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .unwrap();
        let mut documented: Vec<&str> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `nixos_kexec."))
            .map(|rest| rest.split(['=', '`']).next().unwrap())
            .collect();
        let mut known = parameter_keys();
        documented.sort_unstable();
        known.sort_unstable();
        assert_eq!(documented, known);
    }

    #[test]
    fn bundle_defaults_are_the_lowest_layer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/nixos-kexec")).unwrap();
        std::fs::write(
            dir.path().join("etc/nixos-kexec/defaults.json"),
            r#"{"version":1,"nixpkgs":"github:me/nixpkgs/mine","layout":"ext4","state_version":"26.11"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/nixos-kexec/runtime-info.json"),
            r#"{"version":1,"hostname":"h"}"#,
        )
        .unwrap();
        let defaults = read_defaults_file(dir.path()).unwrap().unwrap();
        let file = read_info_file(dir.path()).unwrap().unwrap();
        let params = Params::parse("nixos_kexec.hostname=p").unwrap();
        let config = Layers::new(vec![defaults.clone(), file.clone()], &params)
            .unwrap()
            .config(None)
            .unwrap();
        assert_eq!(config.nixpkgs(), "github:me/nixpkgs/mine");
        assert_eq!(
            config.state_version(),
            "26.11",
            "the bundle's release is the default"
        );
        assert_eq!(config.hostname(), "p");
        // Without the file (the dev bundle), the compiled-in release of flake.nix's nixpkgs.
        let bare = Layers::new(vec![file.clone()], &params)
            .unwrap()
            .config(None)
            .unwrap();
        assert_eq!(bare.state_version(), DEFAULT_STATE_VERSION);
        assert!(DEFAULT_NIXPKGS.ends_with(&format!("nixos-{DEFAULT_STATE_VERSION}")));
        let flake = include_str!("../../../flake.nix");
        assert!(
            flake.contains(&format!("\"{DEFAULT_NIXPKGS}\"")),
            "DEFAULT_NIXPKGS must follow the nixpkgs input of flake.nix"
        );
        // Runtime info and parameters still win over the bundle's release.
        let params = Params::parse("nixos_kexec.state_version=25.05").unwrap();
        let config = Layers::new(vec![defaults.clone(), file.clone()], &params)
            .unwrap()
            .config(None)
            .unwrap();
        assert_eq!(config.state_version(), "25.05");
        let params = Params::parse("nixos_kexec.nixpkgs=github:NixOS/nixpkgs/nixos-unstable").unwrap();
        let config = Layers::new(vec![defaults, file], &params)
            .unwrap()
            .config(None)
            .unwrap();
        assert_eq!(config.nixpkgs(), "github:NixOS/nixpkgs/nixos-unstable");
    }

    #[test]
    fn fetched_info_sits_between_info_and_single_parameters() {
        let info = r#"{"version":1,"hostname":"from-info","nixpkgs":"github:me/from-info"}"#;
        let encoded = base64::engine::general_purpose::STANDARD.encode(info);
        let params = Params::parse(&format!(
            "nixos_kexec.info={encoded} nixos_kexec.hostname=from-param nixos_kexec.config_url=http://c/x nixos_kexec.reinstall"
        ))
        .unwrap();
        let fetched = RuntimeInfo {
            version: 1,
            hostname: Some("from-url".into()),
            nixpkgs: Some("github:me/from-url".into()),
            disk: Some(DiskSelector {
                serial: Some("S1".into()),
                ..DiskSelector::default()
            }),
            ..RuntimeInfo::default()
        };
        let config = Layers::new(vec![], &params)
            .unwrap()
            .config(Some(fetched))
            .unwrap();
        assert_eq!(config.hostname(), "from-param");
        assert_eq!(config.nixpkgs(), "github:me/from-url");
        assert_eq!(config.runtime_info.nixpkgs.as_deref(), Some("github:me/from-url"));
        assert!(matches!(config.disk(), DiskChoice::Selected(ref d) if d.serial.as_deref() == Some("S1")));
        assert_eq!(config.config_url.as_deref(), Some("http://c/x"));
        assert!(config.reinstall);
        assert!(!Config::assemble(None, &Params::default()).unwrap().reinstall);
    }

    #[test]
    fn serial_console_comes_from_the_command_line() {
        let params = Params::parse("console=ttyS0,38400 console=tty0 nixos_kexec.hostname=h").unwrap();
        let config = Config::assemble(None, &params).unwrap();
        let console = config.serial_console.unwrap();
        assert_eq!((console.device.as_str(), console.speed), ("ttyS0", 38400));
        let params = Params::parse("console=tty0 nixos_kexec.hostname=h").unwrap();
        assert!(Config::assemble(None, &params).unwrap().serial_console.is_none());
    }

    #[test]
    fn disk_forms() {
        let set = |value: &str| {
            let mut layer = Layer::default();
            set_disk(&mut layer, value).map(|()| layer)
        };
        assert!(set("auto").unwrap().disk_auto);
        assert!(
            matches!(set("serial:ABC").unwrap().info.disk, Some(d) if d.serial.as_deref() == Some("ABC"))
        );
        assert!(set("vda").is_err());
    }

    #[test]
    fn layout_swap_and_table_from_parameters_or_runtime_info() {
        let params =
            Params::parse("nixos_kexec.layout=luks-btrfs nixos_kexec.swap=2G nixos_kexec.table=mbr").unwrap();
        let config = Config::assemble(None, &params).unwrap();
        assert_eq!(config.layout, Layout::LuksBtrfs);
        assert_eq!(config.swap_bytes, 2 << 30);
        assert_eq!(config.table, Table::Mbr);
        // From the runtime info alone, without any parameter.
        let info = RuntimeInfo {
            version: 1,
            layout: Some("btrfs_impermanence".into()),
            swap: Some("512M".into()),
            ..RuntimeInfo::default()
        };
        let config = Config::assemble(Some(info), &Params::default()).unwrap();
        assert_eq!(config.layout, Layout::BtrfsImpermanence);
        assert_eq!(config.swap_bytes, 512 << 20);
        assert_eq!(
            Config::assemble(None, &Params::default()).unwrap().layout,
            Layout::Ext4
        );
    }

    #[test]
    fn zfs_is_refused_with_the_alternatives() {
        for line in ["nixos_kexec.layout=zfs", "nixos_kexec.layout=luks-zfs"] {
            let err = Params::parse(line)
                .and_then(|p| Config::assemble(None, &p))
                .unwrap_err();
            let text = crate::error::one_line(&err);
            assert!(text.contains("ZFS") && text.contains("not support"), "{text}");
            assert!(text.contains("btrfs"), "{text}");
        }
    }

    #[test]
    fn declarative_storage_excludes_preset_options() {
        let storage = crate::installer::storage::Storage {
            partitions: vec![crate::installer::storage::PartitionSpec {
                size: "rest".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let info = |layout: Option<&str>, swap: Option<&str>| RuntimeInfo {
            version: 1,
            layout: layout.map(Into::into),
            swap: swap.map(Into::into),
            storage: Some(storage.clone()),
            ..RuntimeInfo::default()
        };
        let config = Config::assemble(Some(info(None, None)), &Params::default()).unwrap();
        assert_eq!(config.layout, Layout::Custom);
        assert_eq!(config.storage(), Some(&storage));
        assert!(Config::assemble(Some(info(Some("custom"), None)), &Params::default()).is_ok());
        for bad in [info(Some("btrfs"), None), info(None, Some("1G"))] {
            let err = Config::assemble(Some(bad), &Params::default()).unwrap_err();
            assert!(crate::error::as_user_error(&err).is_some(), "{err}");
        }
        let err = Params::parse("nixos_kexec.layout=custom")
            .and_then(|p| Config::assemble(None, &p))
            .unwrap_err();
        assert!(crate::error::one_line(&err).contains("storage"));
    }

    #[test]
    fn bad_values_are_user_errors() {
        for line in [
            "nixos_kexec.stop_before=nope",
            "nixos_kexec.after=explode",
            "nixos_kexec.layout=zfs",
            "nixos_kexec.layout=xfs",
            "nixos_kexec.swap=lots",
            "nixos_kexec.table=apm",
            "nixos_kexec.dry_run=maybe",
            "nixos_kexec.ssh_key=not-a-key",
            "nixos_kexec.failure_reboot_after=soon",
        ] {
            let err = Params::parse(line)
                .and_then(|p| Config::assemble(None, &p))
                .unwrap_err();
            assert!(crate::error::as_user_error(&err).is_some(), "{line}: {err}");
        }
    }
}
