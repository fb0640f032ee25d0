//! Writes the host flake to /etc/nixos on the target, from the templates in nix/templates/host.

use super::Execution;
use crate::facts::Firmware;
use crate::network::{self, facts::NetworkFacts};
use crate::plan::{Filesystem, FsKind, Plan};
use crate::runtime_info::RuntimeInfo;
use crate::templates::{self, Value};
use anyhow::{Context, Result};
use std::path::Path;

pub struct HostFlake {
    pub flake: String,
    pub configuration: String,
    pub hardware: String,
    /// `network.nix`, when the runtime info described the network.
    pub network: Option<String>,
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
            ("system", Value::Text("x86_64-linux".into())),
        ];
        values.extend(extra);
        values
    };
    Ok(HostFlake {
        flake: templates::render(templates::FLAKE, &common(vec![]))?,
        configuration: templates::render(
            templates::CONFIGURATION,
            &common(vec![
                (
                    "authorized_keys",
                    Value::Block(templates::list_lines(&plan.ssh_authorized_keys, 4)),
                ),
                (
                    "imports",
                    Value::Block(if plan.network.is_some() {
                        "./network.nix".into()
                    } else {
                        String::new()
                    }),
                ),
            ]),
        )?,
        hardware: templates::render(
            templates::HARDWARE,
            &common(vec![
                (
                    "initrd_modules",
                    Value::Block(templates::list_lines(&plan.initrd_modules, 0).replace('\n', " ")),
                ),
                ("file_systems", Value::Block(file_systems(&plan.filesystems))),
            ]),
        )?,
        network: plan
            .network
            .as_ref()
            .map(|n| network::nixos::render(n, network_facts))
            .transpose()?,
    })
}

fn file_systems(filesystems: &[Filesystem]) -> String {
    filesystems
        .iter()
        .map(|fs| {
            let fs_type = match fs.kind {
                FsKind::Vfat => "vfat",
                FsKind::Ext4 => "ext4",
            };
            let mut text = format!(
                "fileSystems.{} = {{\n    device = {};\n    fsType = {};\n",
                templates::string(&fs.mountpoint),
                templates::string(&format!("/dev/disk/by-uuid/{}", fs.uuid)),
                templates::string(fs_type)
            );
            if !fs.mount_options.is_empty() {
                text += &format!(
                    "    options = [ {} ];\n",
                    templates::list_lines(&fs.mount_options, 0).replace('\n', " ")
                );
            }
            text + "  };"
        })
        .collect::<Vec<_>>()
        .join("\n\n  ")
}

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let dir = execution
        .target_path("etc/nixos")
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
    if let Some(text) = &rendered.network {
        let path = dir.join("network.nix");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let info = serde_json::to_string_pretty(runtime_info).context("serialising runtime info")? + "\n";
    for (name, text) in [
        ("flake.nix", &rendered.flake),
        ("configuration.nix", &rendered.configuration),
        ("hardware-configuration.nix", &rendered.hardware),
        ("runtime-info.json", &info),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    log::info!("wrote the host flake to {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{disk, facts, ids};

    #[test]
    fn generated_nix_parses() {
        let mut config = crate::config::Config::default();
        config.disk = crate::config::DiskChoice::Auto;
        config.ssh_authorized_keys = vec!["ssh-ed25519 AAAA \"quoted\" ${x}".into()];
        let plan = crate::plan::make(&config, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), &plan, &config.runtime_info, None).unwrap();
        let hardware = std::fs::read_to_string(dir.path().join("hardware-configuration.nix")).unwrap();
        assert!(hardware.contains("\"/dev/disk/by-uuid/1A2B-3C4D\""), "{hardware}");
        assert!(
            hardware.contains("[ \"virtio_blk\" \"virtio_pci\" ]"),
            "{hardware}"
        );
        for name in ["flake.nix", "configuration.nix", "hardware-configuration.nix"] {
            let Ok(out) = std::process::Command::new("nix-instantiate")
                .arg("--parse")
                .arg(dir.path().join(name))
                .output()
            else {
                panic!("nix-instantiate is needed for this test (Debian: nix-bin)");
            };
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
