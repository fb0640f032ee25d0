//! Writes the host flake to /etc/nixos on the target, from the templates in nix/templates/host.

use super::Execution;
use crate::input::flake::{FlakeSource, GeneratedPart, UserFlake};
use crate::input::runtime_info::RuntimeInfo;
use crate::installer::layout::{LuksVolume, PlannedMount, SwapArea};
use crate::installer::plan::{Plan, UserConfiguration};
use crate::installer::templates::{self, Value};
use crate::machine::facts::Firmware;
use crate::machine::platform::{CpuVendor, Virtualisation};
use crate::network::{self, facts::NetworkFacts};
use anyhow::{Context, Result};
use std::path::Path;

/// The directory of the host flake that holds the user's flake when it came as a directory.
pub const CONFIGURATION_DIR: &str = "configuration";

pub struct HostFlake {
    pub flake: String,
    /// `configuration.nix`, the generic configuration, when the user gave none of their own.
    pub configuration: Option<String>,
    pub hardware: String,
    /// `network.nix`, when the runtime info described the network.
    pub network: Option<String>,
    /// `persist.nix`, when `/` is a tmpfs.
    pub persist: Option<String>,
    /// `initrd-ssh.nix`, when the disk is encrypted and someone can log in to unlock it.
    pub initrd_ssh: Option<String>,
}

pub fn render(plan: &Plan, network_facts: Option<&NetworkFacts>) -> Result<HostFlake> {
    let firmware = match plan.firmware {
        Firmware::Uefi => "uefi",
        Firmware::Bios => "bios",
    };
    let boot_disk = plan
        .disk
        .by_id
        .clone()
        .unwrap_or_else(|| plan.disk.dev_path.clone());
    let common = |extra: Vec<(&'static str, Value)>| {
        let mut values = vec![
            ("hostname", Value::Text(plan.hostname.clone())),
            ("nixpkgs", Value::Text(plan.nixpkgs.clone())),
            ("state_version", Value::Text(plan.state_version.clone())),
            ("firmware", Value::Text(firmware.into())),
            ("boot_disk", Value::Text(boot_disk.clone())),
            ("system", Value::Text(plan.system.clone())),
        ];
        values.extend(extra);
        values
    };
    let persist = plan
        .root_is_tmpfs()
        .then(|| {
            templates::render(
                templates::PERSIST,
                &[
                    ("persist", Value::Text(plan.state_dir.clone())),
                    ("host_keys", Value::Block(host_keys(plan))),
                ],
            )
        })
        .transpose()?;
    let initrd_ssh = plan
        .initrd_ssh
        .as_ref()
        .map(|initrd| {
            templates::render(
                templates::INITRD_SSH,
                &[
                    ("port", Value::Text(initrd.port.to_string())),
                    ("host_key", Value::Text(initrd.host_key.clone())),
                    (
                        "nic_modules",
                        Value::Block(templates::list_lines(&initrd.nic_modules, 0).replace('\n', " ")),
                    ),
                    (
                        "initrd_network",
                        Value::Block(initrd_network(plan.network.is_some())),
                    ),
                ],
            )
        })
        .transpose()?;
    let mut imports = Vec::new();
    if plan.network.is_some() {
        imports.push("./network.nix");
    }
    if persist.is_some() {
        imports.push("./persist.nix");
    }
    if initrd_ssh.is_some() {
        imports.push("./initrd-ssh.nix");
    }
    let network = plan
        .network
        .as_ref()
        .map(|n| network::nixos::render(n, network_facts))
        .transpose()?;
    let (flake, configuration) = match &plan.user_configuration {
        Some(user) => (composed_flake(plan, user)?, None),
        None => (
            templates::render(templates::FLAKE, &common(vec![]))?,
            Some(templates::render(
                templates::CONFIGURATION,
                &common(vec![
                    (
                        "authorized_keys",
                        Value::Block(templates::list_lines(&plan.ssh_authorized_keys, 4)),
                    ),
                    ("imports", Value::Block(imports.join(" "))),
                ]),
            )?),
        ),
    };
    Ok(HostFlake {
        flake,
        configuration,
        hardware: templates::render(
            templates::HARDWARE,
            &common(vec![
                ("serial_console", Value::Block(serial_console(plan))),
                (
                    "initrd_modules",
                    Value::Block(templates::list_lines(&plan.initrd_modules, 0).replace('\n', " ")),
                ),
                ("file_systems", Value::Block(file_systems(&plan.mounts))),
                ("luks_devices", Value::Block(luks_devices(&plan.luks))),
                ("swap_devices", Value::Block(swap_devices(&plan.swaps))),
                ("hardware_imports", Value::Block(hardware_imports(plan))),
                ("hardware_settings", Value::Block(hardware_settings(plan))),
            ]),
        )?,
        network,
        persist,
        initrd_ssh,
    })
}

/// The host flake over the user's: their `nixosConfigurations.NAME`, extended with the
/// generated modules (`extendModules`, which every NixOS system made by `lib.nixosSystem` has:
/// nixos/lib/eval-config.nix), under this machine's hostname.
fn composed_flake(plan: &Plan, user: &UserConfiguration) -> Result<String> {
    let configuration_url = match &user.flake.source {
        FlakeSource::Remote(reference) => reference.clone(),
        // Copied next to flake.nix, so the host flake holds it wherever it is (/mnt/etc/nixos
        // during the install, /etc/nixos or /persist/etc/nixos afterwards).
        FlakeSource::Directory(_) => format!("path:./{CONFIGURATION_DIR}"),
    };
    let nixpkgs_input = match &user.nixpkgs {
        None => "# nixpkgs is your configuration's.\n  \
                 inputs.nixpkgs.follows = \"configuration/nixpkgs\";"
            .to_string(),
        Some(nixpkgs) => format!(
            "# The installer was given a nixpkgs, which your configuration follows here.\n  \
             inputs.nixpkgs.url = {};\n  \
             inputs.configuration.inputs.nixpkgs.follows = \"nixpkgs\";",
            templates::string(nixpkgs)
        ),
    };
    let parts: Vec<GeneratedPart> = GeneratedPart::ALL
        .into_iter()
        .filter(|part| written(plan, *part))
        .collect();
    let modules = parts
        .iter()
        .map(|part| format!("{} = ./{};", templates::string(part.name()), part.file()))
        .collect::<Vec<_>>()
        .join("\n        ");
    let generated: Vec<String> = user.generated.iter().map(|p| p.name().to_string()).collect();
    templates::render(
        templates::FLAKE_WITH_CONFIGURATION,
        &[
            ("hostname", Value::Text(plan.hostname.clone())),
            ("user_flake", Value::Text(user.flake.to_string())),
            ("configuration_url", Value::Text(configuration_url)),
            ("nixpkgs_input", Value::Block(nixpkgs_input)),
            ("name", Value::Text(user.flake.name.clone())),
            (
                "generated",
                Value::Block(templates::list_lines(&generated, 0).replace('\n', " ")),
            ),
            ("modules", Value::Block(modules)),
        ],
    )
}

/// The files of the host flake, relative to its directory: what the flake step writes and the
/// verification looks for.
pub fn files(plan: &Plan) -> Vec<String> {
    let mut files = vec!["flake.nix".to_string()];
    match &plan.user_configuration {
        None => files.push("configuration.nix".into()),
        Some(user) => {
            if let FlakeSource::Directory(_) = user.flake.source {
                files.push(format!("{CONFIGURATION_DIR}/flake.nix"));
            }
        }
    }
    files.extend(
        GeneratedPart::ALL
            .into_iter()
            .filter(|part| written(plan, *part))
            .map(|part| part.file().to_string()),
    );
    files
}

/// Whether the flake step writes the module of `part` for this plan (whether or not the host
/// flake uses it).
fn written(plan: &Plan, part: GeneratedPart) -> bool {
    match part {
        GeneratedPart::Hardware => true,
        GeneratedPart::Network => plan.network.is_some(),
        GeneratedPart::Persist => plan.root_is_tmpfs(),
        GeneratedPart::InitrdSsh => plan.initrd_ssh.is_some(),
    }
}

fn file_systems(mounts: &[PlannedMount]) -> String {
    mounts
        .iter()
        .map(|m| {
            let mut text = format!(
                "fileSystems.{} = {{\n    device = {};\n    fsType = {};\n",
                templates::string(&m.mountpoint),
                templates::string(&m.nix_device),
                templates::string(&m.fstype)
            );
            if !m.options.is_empty() {
                text += &format!(
                    "    options = [ {} ];\n",
                    templates::list_lines(&m.options, 0).replace('\n', " ")
                );
            }
            if m.needed_for_boot {
                text += "    neededForBoot = true;\n";
            }
            text + "  };"
        })
        .collect::<Vec<_>>()
        .join("\n\n  ")
}

/// `boot.initrd.luks.devices` (nixos/modules/system/boot/luksroot.nix): the initrd opens each
/// container at /dev/mapper/<name> before it mounts the filesystems inside.
fn luks_devices(luks: &[LuksVolume]) -> String {
    luks.iter()
        .map(|l| {
            format!(
                "boot.initrd.luks.devices.{}.device = {};",
                templates::string(&l.name),
                templates::string(&format!("/dev/disk/by-uuid/{}", l.uuid))
            )
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// `swapDevices` (nixos/modules/config/swap.nix); random encryption re-keys the partition at
/// every boot, so it is found by PARTUUID, which is not inside it.
fn swap_devices(swaps: &[SwapArea]) -> String {
    swaps
        .iter()
        .map(|s| {
            let mut text = format!("{{ device = {};", templates::string(&s.nix_device));
            if s.random_encryption {
                text += " randomEncryption.enable = true;";
            }
            text + " }"
        })
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// The installer's serial console for the installed system too: many VPS operators can only
/// reach their machine that way. The kernel prints to every `console=`, but only the last is
/// /dev/console (systemd's status, emergency shell), so the serial port goes last.
fn serial_console(plan: &Plan) -> String {
    let Some(console) = &plan.serial_console else {
        return String::new();
    };
    // boot.kernelParams: nixos/modules/system/boot/kernel.nix (both boot loaders pass them).
    let mut text = format!(
        "# The installer ran with the serial console {}: the kernel, systemd and a login\n  \
         # prompt use it here too, and the screen (tty0) as well.\n  \
         boot.kernelParams = [ \"console=tty0\" {} ];",
        console.device,
        templates::string(&console.kernel_param())
    );
    // boot.loader.grub.extraConfig (types.lines, "inserted in the configuration file just
    // before the menu entries": nixos/modules/system/boot/loader/grub/grub.nix, whose own
    // example is a serial console): the GRUB menu on the same port. It only matters where GRUB
    // boots (BIOS machines here); PL011 ports have no GRUB unit number.
    if let Some(unit) = console.grub_unit() {
        text += &format!(
            "\n  boot.loader.grub.extraConfig = ''\n    \
             serial --unit={unit} --speed={}\n    \
             terminal_input serial console\n    \
             terminal_output serial console\n  \
             '';",
            console.speed
        );
    }
    text
}

/// The module nixos-generate-config imports for this kind of machine, decided as it decides by
/// systemd-detect-virt's answer (nixos/modules/installer/tools/nixos-generate-config.pl, the
/// `$virt` checks; unchanged since nixpkgs PR #221050, 2023, so the same in 25.11 and 26.05).
fn hardware_imports(plan: &Plan) -> String {
    let module = match plan.virtualisation {
        // `$virt eq "none"`: nixos/modules/installer/scan/not-detected.nix sets
        // hardware.enableRedistributableFirmware, for devices no scan detects.
        Virtualisation::None => "/installer/scan/not-detected.nix",
        // `qemu`, `kvm`, `bochs`: nixos/modules/profiles/qemu-guest.nix puts the virtio drivers
        // in the initrd.
        Virtualisation::Qemu | Virtualisation::Kvm | Virtualisation::Bochs => "/profiles/qemu-guest.nix",
        _ => return String::new(),
    };
    format!("(modulesPath + {})", templates::string(module))
}

/// The settings nixos-generate-config writes for this machine, in its words (same file).
fn hardware_settings(plan: &Plan) -> String {
    let mut lines = Vec::new();
    match plan.virtualisation {
        // `microsoft`: nixos/modules/virtualisation/hyperv-guest.nix (the hv_* drivers in the
        // initrd, the Hyper-V daemons).
        Virtualisation::Microsoft => lines.push("virtualisation.hypervGuest.enable = true;"),
        // `oracle`: nixos/modules/virtualisation/virtualbox-guest.nix (guest additions).
        Virtualisation::Oracle => lines.push("virtualisation.virtualbox.guest.enable = true;"),
        _ => {}
    }
    // Bare metal only (the plan leaves it out in a VM, as nixos-generate-config has since
    // PR #221050): nixos/modules/hardware/cpu/{intel,amd}-microcode.nix, following
    // hardware.enableRedistributableFirmware (nixos/modules/hardware/all-firmware.nix).
    match plan.microcode {
        Some(CpuVendor::Intel) => lines.push(
            "hardware.cpu.intel.updateMicrocode = lib.mkDefault config.hardware.enableRedistributableFirmware;",
        ),
        Some(CpuVendor::Amd) => lines.push(
            "hardware.cpu.amd.updateMicrocode = lib.mkDefault config.hardware.enableRedistributableFirmware;",
        ),
        None => {}
    }
    lines.join("\n  ")
}

/// `services.openssh.hostKeys` entries for the keys the keys step puts under the persist path.
fn host_keys(plan: &Plan) -> String {
    let kinds: Vec<String> = if plan.provided_host_keys.is_empty() {
        vec!["ed25519".into()]
    } else {
        plan.provided_host_keys
            .iter()
            .filter_map(|p| {
                let name = Path::new(p).file_name()?.to_string_lossy().into_owned();
                Some(name.strip_prefix("ssh_host_")?.strip_suffix("_key")?.to_string())
            })
            .collect()
    };
    kinds
        .iter()
        .map(|kind| {
            format!(
                "{{ path = {}; type = {}; }}",
                templates::string(&plan.state_path(&format!("etc/ssh/ssh_host_{kind}_key"))),
                templates::string(kind)
            )
        })
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// The initrd's network: the system's own networkd networks (network.nix) when the runtime
/// info described them (boot.initrd.systemd.network in nixos/modules/system/boot/networkd.nix
/// takes the same options), else DHCP on every Ethernet NIC.
fn initrd_network(described: bool) -> String {
    if described {
        "# The static network of network.nix, matched by MAC here too.\n  \
         boot.initrd.systemd.network.networks = config.systemd.network.networks;"
            .into()
    } else {
        "boot.initrd.systemd.network.networks.\"99-ethernet-dhcp\" = {\n    \
         matchConfig.Name = \"en* eth*\";\n    \
         networkConfig.DHCP = \"yes\";\n  \
         };"
        .into()
    }
}

/// The user's flake directory, as it came (modes and symlinks kept), into the host flake.
fn copy_flake_directory(source: &Path, destination: &Path) -> Result<()> {
    // Copies the directory's contents, not the directory into an existing one.
    crate::machine::runner::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg("--")
            .arg(source)
            .arg(destination),
    )
    .with_context(|| format!("copying your flake {} into the host flake", source.display()))?;
    Ok(())
}

/// A flake directory the installer was told of must be there and be a flake, or the install
/// would fail after the wipe.
pub fn check_before_wiping(plan: &Plan) -> Result<()> {
    let Some(UserConfiguration {
        flake: flake @ UserFlake {
            source: FlakeSource::Directory(dir),
            ..
        },
        ..
    }) = &plan.user_configuration
    else {
        return Ok(());
    };
    check_flake_directory(flake, dir)
}

/// `dir` holds `flake.nix`: the rescue side checks the operator's directory with it, the
/// installer the copy it was sent.
pub fn check_flake_directory(flake: &UserFlake, dir: &Path) -> Result<()> {
    if dir.join("flake.nix").is_file() {
        return Ok(());
    }
    let problem = if dir.is_dir() {
        format!(
            "The flake directory {} (of {flake}) has no flake.nix.",
            dir.display()
        )
    } else {
        format!("The flake directory {} (of {flake}) is not there.", dir.display())
    };
    Err(crate::error::user_error(
        problem,
        "name the directory that holds your flake.nix (nixos-kexec run --flake ./DIR#NAME packs it and sends it to the installer), or a flake the installer fetches, e.g. github:me/dotfiles#NAME.",
    ))
}

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let dir = execution
        .target_path(&plan.state_path("etc/nixos"))
        .context("the target root is not mounted")?;
    write_all(&dir, plan, &plan.runtime_info, execution.network_facts.as_ref())
}

pub fn write_all(
    dir: &Path,
    plan: &Plan,
    runtime_info: &RuntimeInfo,
    network_facts: Option<&NetworkFacts>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rendered = render(plan, network_facts)?;
    for (name, text) in [
        ("network.nix", &rendered.network),
        ("persist.nix", &rendered.persist),
        ("initrd-ssh.nix", &rendered.initrd_ssh),
    ] {
        if let Some(text) = text {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let info = serde_json::to_string_pretty(runtime_info).context("serialising runtime info")? + "\n";
    for (name, text) in [
        ("configuration.nix", &rendered.configuration),
        ("flake.nix", &Some(rendered.flake)),
        ("hardware-configuration.nix", &Some(rendered.hardware)),
        ("runtime-info.json", &Some(info)),
    ] {
        if let Some(text) = text {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if let Some(UserConfiguration {
        flake: UserFlake {
            source: FlakeSource::Directory(source),
            ..
        },
        ..
    }) = &plan.user_configuration
    {
        copy_flake_directory(source, &dir.join(CONFIGURATION_DIR))?;
    }
    log::info!("wrote the host flake to {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::{Config, Layout};
    use crate::installer::plan::tests::{disk, facts, ids};

    fn parse(dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Ok(out) = std::process::Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&path)
            .output()
        else {
            panic!("nix-instantiate is needed for this test (Debian: nix-bin)");
        };
        assert!(
            out.status.success(),
            "{name}: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    #[test]
    fn generated_nix_parses() {
        let mut config = Config {
            disk_auto: true,
            ..Config::default()
        };
        config.runtime_info.ssh_authorized_keys = vec!["ssh-ed25519 AAAA \"quoted\" ${x}".into()];
        let plan =
            crate::installer::plan::make(&config, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids())
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
        let hardware = parse(dir.path(), "hardware-configuration.nix");
        assert!(hardware.contains("\"/dev/disk/by-uuid/1A2B-3C4D\""), "{hardware}");
        assert!(
            hardware.contains("[ \"virtio_blk\" \"virtio_pci\" ]"),
            "{hardware}"
        );
        assert!(
            hardware.contains("imports = [ (modulesPath + \"/profiles/qemu-guest.nix\") ];"),
            "{hardware}"
        );
        assert!(hardware.contains("nixpkgs.hostPlatform = lib.mkDefault \"x86_64-linux\";"));
        assert!(!hardware.contains("updateMicrocode"), "{hardware}");
        for name in ["flake.nix", "configuration.nix"] {
            parse(dir.path(), name);
        }
        let configuration = parse(dir.path(), "configuration.nix");
        assert!(
            !configuration.contains("console="),
            "no serial console, nothing added"
        );
        assert!(!dir.path().join("persist.nix").exists());
        assert!(!dir.path().join("initrd-ssh.nix").exists());
    }

    /// What nixos-generate-config would add on bare metal, Hyper-V and VirtualBox.
    #[test]
    fn hardware_of_the_machine() {
        use crate::machine::platform::Machine;
        let config = Config {
            disk_auto: true,
            ..Config::default()
        };
        for (machine, wanted, unwanted) in [
            (
                Machine {
                    arch: "x86_64".into(),
                    virtualisation: Virtualisation::None,
                    cpu_vendor: Some(CpuVendor::Amd),
                },
                vec![
                    "imports = [ (modulesPath + \"/installer/scan/not-detected.nix\") ];",
                    "hardware.cpu.amd.updateMicrocode = lib.mkDefault config.hardware.enableRedistributableFirmware;",
                ],
                vec!["qemu-guest", "intel"],
            ),
            (
                Machine {
                    arch: "aarch64".into(),
                    virtualisation: Virtualisation::None,
                    cpu_vendor: None,
                },
                vec![
                    "not-detected.nix",
                    "nixpkgs.hostPlatform = lib.mkDefault \"aarch64-linux\";",
                ],
                vec!["updateMicrocode"],
            ),
            (
                Machine {
                    arch: "x86_64".into(),
                    virtualisation: Virtualisation::Microsoft,
                    cpu_vendor: Some(CpuVendor::Intel),
                },
                vec!["imports = [  ];", "virtualisation.hypervGuest.enable = true;"],
                vec!["updateMicrocode", "not-detected", "qemu-guest"],
            ),
            (
                Machine {
                    arch: "x86_64".into(),
                    virtualisation: Virtualisation::Oracle,
                    cpu_vendor: Some(CpuVendor::Intel),
                },
                vec!["virtualisation.virtualbox.guest.enable = true;"],
                vec!["updateMicrocode", "not-detected"],
            ),
        ] {
            let mut f = facts(vec![disk("vda", 8 << 30, 512, "A")]);
            f.machine = machine.clone();
            if machine.arch == "aarch64" {
                // arm64 machines are installed through UEFI only.
                f.firmware = Firmware::Uefi;
            }
            let plan = crate::installer::plan::make(&config, &f, &ids()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
            let hardware = parse(dir.path(), "hardware-configuration.nix");
            for needle in wanted {
                assert!(hardware.contains(needle), "{machine:?}: {needle}\n{hardware}");
            }
            for needle in unwanted {
                assert!(!hardware.contains(needle), "{machine:?}: {needle}\n{hardware}");
            }
        }
    }

    /// The plan for the parameters `params` on a machine with one 8 GiB disk, chosen by `auto`.
    fn plan_from(params: &str) -> (Plan, Config) {
        let params = crate::input::cmdline::Params::parse(params).unwrap();
        let mut config = Config::assemble(None, &params).unwrap();
        config.disk_auto = true;
        let plan =
            crate::installer::plan::make(&config, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids())
                .unwrap();
        (plan, config)
    }

    #[test]
    fn serial_console_of_the_installer() {
        let (plan, config) = plan_from("console=tty0 console=ttyS1,57600n8");
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
        let configuration = parse(dir.path(), "hardware-configuration.nix");
        for needle in [
            "boot.kernelParams = [ \"console=tty0\" \"console=ttyS1,57600\" ];",
            "    serial --unit=1 --speed=57600\n    terminal_input serial console\n    terminal_output serial console\n  '';",
        ] {
            assert!(configuration.contains(needle), "{needle}\n{configuration}");
        }
        // aarch64's PL011: the kernel parameter, no GRUB lines.
        let (plan, config) = plan_from("console=ttyAMA0");
        write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
        let configuration = parse(dir.path(), "hardware-configuration.nix");
        assert!(
            configuration.contains("\"console=ttyAMA0,115200\" ];"),
            "{configuration}"
        );
        assert!(!configuration.contains("grub.extraConfig"), "{configuration}");
    }

    /// With the user's flake: the composed flake.nix parses, names the user's flake and the
    /// parts asked for, and no generic configuration.nix is written; a flake directory that is
    /// not there is refused before the wipe.
    #[test]
    fn users_flake_is_composed() {
        for (params, wanted) in [
            (
                "nixos_kexec.flake=github:me/dotfiles#web1",
                vec![
                    "inputs.configuration.url = \"github:me/dotfiles\";",
                    "inputs.nixpkgs.follows = \"configuration/nixpkgs\";",
                    "generated = [ \"hardware\" ];",
                    "configuration.nixosConfigurations.\"web1\".extendModules",
                    "nixosConfigurations.\"web1\" = configuration",
                ],
            ),
            (
                "nixos_kexec.flake=git+https://git.example.com/infra.git?ref=prod#db.example.com nixos_kexec.nixpkgs=github:NixOS/nixpkgs/nixos-26.05 nixos_kexec.generated=none",
                vec![
                    "inputs.configuration.url = \"git+https://git.example.com/infra.git?ref=prod\";",
                    "inputs.nixpkgs.url = \"github:NixOS/nixpkgs/nixos-26.05\";",
                    "inputs.configuration.inputs.nixpkgs.follows = \"nixpkgs\";",
                    "generated = [  ];",
                    "nixosConfigurations.\"db.example.com\" = configuration",
                    "\"hardware\" = ./hardware-configuration.nix;",
                ],
            ),
        ] {
            let (plan, config) = plan_from(params);
            let dir = tempfile::tempdir().unwrap();
            write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
            let flake = parse(dir.path(), "flake.nix");
            for needle in wanted {
                assert!(flake.contains(needle), "{needle}\n{flake}");
            }
            assert!(!dir.path().join("configuration.nix").exists());
            parse(dir.path(), "hardware-configuration.nix");
            check_before_wiping(&plan).unwrap();
            for file in files(&plan) {
                assert!(dir.path().join(&file).is_file(), "{file}");
            }
        }
        let (plan, _) = plan_from("nixos_kexec.flake=/nowhere/cfg#web1");
        let err = check_before_wiping(&plan).unwrap_err();
        assert!(
            crate::error::one_line(&err).contains("/nowhere/cfg (of /nowhere/cfg#web1) is not there"),
            "{err}"
        );

        let params = crate::input::cmdline::Params::parse("nixos_kexec.generated=network").unwrap();
        let mut config = Config::assemble(None, &params).unwrap();
        config.disk_auto = true;
        let err = crate::installer::plan::make(&config, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids())
            .unwrap_err();
        assert!(
            crate::error::one_line(&err).contains("no flake is given"),
            "{err}"
        );
    }

    /// Every preset, with swap and an SSH key (and so initrd SSH when encrypted), writes Nix
    /// that parses and says what the README's layout table says.
    #[test]
    fn every_preset_writes_its_configuration() {
        for layout in Layout::PRESETS {
            for with_network in [false, true] {
                let mut config = Config {
                    disk_auto: true,
                    layout,
                    swap_bytes: 1 << 30,
                    disk_passphrase_given: true,
                    ..Config::default()
                };
                config.runtime_info.ssh_authorized_keys = vec!["ssh-ed25519 AAAA op@laptop".into()];
                if with_network {
                    config.runtime_info.network = Some(crate::input::runtime_info::Network {
                        interfaces: vec![crate::input::runtime_info::Interface {
                            mac: "52:54:00:12:34:56".parse().unwrap(),
                            addresses: vec!["203.0.113.10/32".parse().unwrap()],
                            ..Default::default()
                        }],
                        nameservers: vec![],
                    });
                }
                let plan = crate::installer::plan::make(
                    &config,
                    &facts(vec![disk("vda", 8 << 30, 4096, "A")]),
                    &ids(),
                )
                .unwrap();
                let dir = tempfile::tempdir().unwrap();
                write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
                let hardware = parse(dir.path(), "hardware-configuration.nix");
                let configuration = parse(dir.path(), "configuration.nix");
                parse(dir.path(), "flake.nix");
                let what = format!("{layout:?} network {with_network}");
                match layout {
                    Layout::Btrfs | Layout::LuksBtrfs => {
                        for needle in [
                            "fileSystems.\"/nix\"",
                            "\"subvol=@home\"",
                            "\"compress=zstd\" \"noatime\"",
                            "fsType = \"btrfs\"",
                        ] {
                            assert!(hardware.contains(needle), "{what}: {needle}\n{hardware}");
                        }
                    }
                    Layout::BtrfsImpermanence | Layout::LuksBtrfsImpermanence => {
                        for needle in [
                            "fsType = \"tmpfs\"",
                            "device = \"none\"",
                            "\"subvol=@persist\"",
                            "neededForBoot = true;",
                        ] {
                            assert!(hardware.contains(needle), "{what}: {needle}\n{hardware}");
                        }
                        let persist = parse(dir.path(), "persist.nix");
                        assert!(configuration.contains("./persist.nix"), "{configuration}");
                        for needle in [
                            "persist = \"/persist\"",
                            "environment.etc.\"machine-id\".source",
                            "{ path = \"/persist/etc/ssh/ssh_host_ed25519_key\"; type = \"ed25519\"; }",
                        ] {
                            assert!(persist.contains(needle), "{needle}\n{persist}");
                        }
                    }
                    Layout::Ext4 | Layout::LuksExt4 => {
                        assert!(hardware.contains("fsType = \"ext4\""), "{hardware}")
                    }
                    Layout::Custom => unreachable!(),
                }
                if layout.encrypts() {
                    let uuid = &plan.luks[0].uuid;
                    assert!(
                        hardware.contains(&format!(
                            "boot.initrd.luks.devices.\"cryptroot\".device = \"/dev/disk/by-uuid/{uuid}\";"
                        )),
                        "{hardware}"
                    );
                    assert!(hardware.contains("randomEncryption.enable = true;"), "{hardware}");
                    assert!(hardware.contains("/dev/disk/by-partuuid/"), "{hardware}");
                    let initrd = parse(dir.path(), "initrd-ssh.nix");
                    assert!(configuration.contains("./initrd-ssh.nix"), "{configuration}");
                    // Under /persist when `/` is a tmpfs: the file must outlive the reboot
                    // for the next generation's initrd to carry the same key.
                    let host_key = format!(
                        "hostKeys = [ \"{}\" ];",
                        plan.state_path("etc/secrets/initrd/ssh_host_ed25519_key")
                    );
                    assert_eq!(
                        host_key.starts_with("hostKeys = [ \"/persist/"),
                        plan.root_is_tmpfs(),
                        "{host_key}"
                    );
                    for needle in [
                        "port = lib.toInt \"2222\";",
                        &host_key,
                        "boot.initrd.systemd.enable = true;",
                    ] {
                        assert!(initrd.contains(needle), "{needle}\n{initrd}");
                    }
                    let networks = if with_network {
                        "boot.initrd.systemd.network.networks = config.systemd.network.networks;"
                    } else {
                        "matchConfig.Name = \"en* eth*\";"
                    };
                    assert!(initrd.contains(networks), "{what}\n{initrd}");
                } else {
                    assert!(!hardware.contains("luks"), "{hardware}");
                    assert!(
                        hardware.contains(&format!(
                            "{{ device = \"/dev/disk/by-uuid/{}\"; }}",
                            plan.swaps[0].uuid
                        )),
                        "{hardware}"
                    );
                    assert!(!dir.path().join("initrd-ssh.nix").exists());
                }
            }
        }
    }
}
