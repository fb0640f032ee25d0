//! Runs `nixos-install` on the prepared target, streaming its output to the console and log.

use super::Execution;
use crate::console;
use crate::error::user_error;
use crate::input::config::Step;
use crate::installer::plan::Plan;
use crate::machine::runner;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Refuses before the disk is wiped when the install step is planned and is sure to fail for
/// want of a network: nixos-install downloads nixpkgs and the system's packages.
pub fn check_network_before_wiping(plan: &Plan) -> Result<()> {
    if !plan.steps.contains(&Step::Install) {
        return Ok(());
    }
    let Some(program) = plan.install_command.first() else {
        return Ok(());
    };
    // Without nixos-install the install step fails by itself with its own, clearer message.
    if find_in_path(program).is_none() {
        return Ok(());
    }
    let facts = crate::network::facts::gather()?;
    if facts.routes.iter().any(|r| r.destination.is_none()) {
        return Ok(());
    }
    Err(user_error(
        format!(
            "The install step needs the network ({program} downloads {} and the system's packages), but the installer has no default route. Nothing was written.",
            plan.nixpkgs
        ),
        "connect the machine to a network with DHCP or router advertisements, describe its network in the runtime info (network.interfaces), or add nixos_kexec.stop_before=install to only prepare the disk.",
    ))
}

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let root = execution
        .target_root()
        .context("the target root is not mounted")?
        .to_path_buf();
    let Some((program, args)) = plan.install_command.split_first() else {
        anyhow::bail!("the plan has no install command");
    };
    if find_in_path(program).is_none() {
        return Err(user_error(
            format!("{program} is not in this installer bundle, so NixOS cannot be installed from it (the dev bundle carries no Nix)."),
            "boot the Nix-built bundle (nix build .#kexec-bundle), or pass nixos_kexec.stop_before=install to stop once the disk and host flake are ready.",
        ));
    }
    // The store and temporary files go to the target disk, not to RAM: a 1 GB machine has no room
    // (with a tmpfs `/` the plan puts them on /nix).
    let tmp = PathBuf::from(&plan.install_tmpdir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env("TMPDIR", &tmp)
        // Nix's download and evaluation caches would otherwise grow in RAM under /root.
        .env("XDG_CACHE_HOME", tmp.join(".cache"))
        .env("NIX_CONFIG", "experimental-features = nix-command flakes");
    runner::run_streaming(
        &mut command,
        &|line| console::line(&format!("install: {line}")),
        runner::QUIET_NOTICE,
        &|silent| {
            console::line(&format!(
                "install: no output from {program} for {} min; still running (downloads and builds can be silent for long)",
                silent.as_secs() / 60
            ))
        },
    )?;
    if tmp != root.join("tmp") {
        // Not the system's /tmp, so nothing else would ever clean it.
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    Ok(())
}
