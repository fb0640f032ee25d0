//! A user's own flake for the tests, and the stand-in nixpkgs it is built with.
//!
//! TEST DOUBLE: the nixpkgs is `tests/stand-in/nixpkgs` (a `lib.nixosSystem` whose module
//! system merges the modules it gets and whose toplevel holds the merged configuration as
//! JSON), since the real nixpkgs cannot be had here. Everything else is real: the user's flake
//! is an ordinary flake, and Debian's Nix fetches, locks, evaluates and builds.

use crate::nix_cache::nix_command;
use crate::{run_tool, run_tool_unchecked, workspace_root, ToolOutput};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// What the user's configuration sets that nothing else does: the tests find it in the
/// evaluated (or built) system.
pub const MARKER: &str = "web1-from-the-users-own-flake";

/// The stand-in nixpkgs as a flake directory under `dir` (the flake's files, the host's static
/// busybox as the builder, and the switch-to-configuration test double); `version` is what its
/// `lib.version` says, so two copies can be told apart.
pub fn stand_in_nixpkgs(dir: &Path, version: &str) -> Result<PathBuf> {
    let out = dir.join(format!("nixpkgs-{version}"));
    run_tool(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(workspace_root().join("tests/stand-in/nixpkgs"))
            .arg(&out),
    )?;
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file(),
        "/bin/busybox is missing (Debian: busybox-static); the stand-in nixpkgs builds with it"
    );
    std::fs::copy(busybox, out.join("busybox")).context("copying busybox")?;
    std::fs::copy(
        workspace_root().join("tests/stand-in/switch-to-configuration"),
        out.join("switch-to-configuration"),
    )
    .context("copying switch-to-configuration")?;
    std::fs::write(out.join(".version"), version)?;
    Ok(out)
}

/// `nixpkgs` packed as `NAME.tar.gz` in `dir`, one top directory inside as GitHub's archives
/// have (Nix strips it): what a flake input `https://…/nixpkgs.tar.gz` fetches.
pub fn tarball(nixpkgs: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let file = dir.join(format!("{name}.tar.gz"));
    let parent = nixpkgs.parent().context("the stand-in nixpkgs has no parent")?;
    let top = nixpkgs.file_name().context("the stand-in nixpkgs has no name")?;
    run_tool(
        std::process::Command::new("tar")
            .arg("-czf")
            .arg(&file)
            .arg("-C")
            .arg(parent)
            .arg(top),
    )?;
    Ok(file)
}

/// A user's flake directory `dir` with `nixosConfigurations.web1`, whose nixpkgs is
/// `nixpkgs_url`; `extra` is more of its module (Nix, inside the module's braces).
pub fn write_user_flake(dir: &Path, nixpkgs_url: &str, extra: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("flake.nix"),
        format!(
            r#"{{
  description = "a user's own configuration, with a host web1";
  inputs.nixpkgs.url = "{nixpkgs_url}";
  outputs = {{ self, nixpkgs }}: {{
    nixosConfigurations.web1 = nixpkgs.lib.nixosSystem {{
      modules = [ ./web1.nix ];
    }};
  }};
}}
"#
        ),
    )?;
    std::fs::write(
        dir.join("web1.nix"),
        format!(
            r#"{{ config, lib, ... }}:
{{
  environment.etc."marker".text = "{MARKER}";
  networking.hostName = "web1";
  services.openssh.enable = true;
  users.users.root.openssh.authorizedKeys.keys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop" ];
  system.stateVersion = "26.05";
{extra}
}}
"#
        ),
    )?;
    Ok(())
}

/// Real Nix evaluates `nixosConfigurations.HOST.config` of the host flake in `flake_dir` (all
/// but `system`, which holds the toplevel) into JSON, with its store under `store_root`.
pub fn evaluate_host(flake_dir: &Path, host: &str, store_root: &Path) -> Result<ToolOutput> {
    run_tool_unchecked(
        nix_command("nix")
            .args(["--extra-experimental-features", "nix-command flakes"])
            .args(["eval", "--json", "--store"])
            .arg(crate::nix_cache::root_store(store_root))
            .arg(format!(
                "{}#nixosConfigurations.\"{host}\".config",
                flake_dir.display()
            ))
            .args(["--apply", "config: removeAttrs config [ \"system\" ]"]),
    )
}

/// [`evaluate_host`], which must succeed, parsed.
pub fn evaluated_config(flake_dir: &Path, host: &str, store_root: &Path) -> Result<serde_json::Value> {
    let out = evaluate_host(flake_dir, host, store_root)?;
    ensure!(
        out.status.success(),
        "Nix did not evaluate the host flake:\n{}",
        out.describe()
    );
    serde_json::from_slice(&out.stdout).context("reading Nix's JSON")
}
