//! The `--system` path of the nixos-install test double (`tests/stand-in/nixos-install`), run
//! on the host with the host's real Nix (Debian's nix-bin, the same as in the dev bundle): the
//! stand-in closure's signed cache (`stand_in_cache`) is substituted into a target root by the
//! stand-in's `nix-env --set`, with the substituter and key given as the installer gives them
//! (`--option extra-substituters`, `--option extra-trusted-public-keys`). No VM: this checks how
//! the stand-in hands nixos-install's options to Nix; its flake path runs in QEMU (boot.rs).

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::nix_cache::{nix_command, root_store, system_profile, verify_store};
use nixos_kexec_tests::*;
use std::path::{Path, PathBuf};

/// Runs the stand-in as the installer would for a prebuilt `system` into a fresh root under
/// `dir`, trusting `key`, without the boot loader (the closure is not a bootable system).
fn install_system(dir: &Path, cache: &StandInCache, key: &str) -> Result<(PathBuf, ToolOutput)> {
    let root = dir.join("target");
    // The host flake the agent writes; the stand-in reads the boot-loader settings there.
    std::fs::create_dir_all(root.join("etc/nixos"))?;
    std::fs::write(
        root.join("etc/nixos/hardware-configuration.nix"),
        "{ ... }:\nlet\n  firmware = \"bios\";\n  bootDisk = \"/dev/vda\";\nin\n{ }\n",
    )?;
    let out = run_tool_unchecked(
        nix_command("sh")
            .arg(workspace_root().join("tests/stand-in/nixos-install"))
            .arg("--root")
            .arg(&root)
            .args(["--system", cache.toplevel.as_str()])
            .args(["--no-root-passwd", "--no-channel-copy", "--no-bootloader"])
            .args(["--option", "extra-substituters", &cache.file_url()])
            .args(["--option", "extra-trusted-public-keys", key])
            .env_remove("TMPDIR"),
    )?;
    Ok((root, out))
}

#[test]
fn stand_in_system_path_substitutes_the_signed_closure() -> Result<()> {
    let cache = stand_in_cache()?;
    let scratch = tempfile::tempdir().context("a directory for the target")?;
    let (root, out) = install_system(scratch.path(), cache, &cache.key.public)?;
    ensure!(out.status.success(), "the stand-in failed:\n{}", out.describe());
    ensure!(
        out.stdout_str()
            .contains(&format!("stand-in: system profile set to {}", cache.toplevel)),
        "the stand-in did not report the profile:\n{}",
        out.describe()
    );
    ensure!(
        system_profile(&root)? == cache.toplevel,
        "the system profile does not lead to {}",
        cache.toplevel
    );
    verify_store(&root)?;
    let closure = run_tool(
        nix_command("nix-store")
            .arg("--store")
            .arg(root_store(&root))
            .args(["-qR", cache.toplevel.as_str()]),
    )?
    .stdout_str();
    ensure!(
        closure.lines().count() == cache.closure.len(),
        "{} of the closure's {} paths are registered in the target:\n{closure}",
        closure.lines().count(),
        cache.closure.len()
    );
    ensure!(root.join("etc/NIXOS").is_file(), "/etc/NIXOS was not made");
    Ok(())
}

/// A key that did not sign the closure: Nix refuses the system, the stand-in fails with Nix's
/// error, and no profile is set.
#[test]
fn stand_in_system_path_refuses_a_closure_signed_by_another_key() -> Result<()> {
    let cache = stand_in_cache()?;
    let scratch = tempfile::tempdir().context("a directory for the target")?;
    let (root, out) = install_system(scratch.path(), cache, &cache.wrong_key.public)?;
    ensure!(
        !out.status.success(),
        "the stand-in accepted an unsigned closure:\n{}",
        out.describe()
    );
    ensure!(
        out.stderr.contains(&format!(
            "the substitute for '{}' from '{}' is not signed by any of the keys in 'trusted-public-keys'",
            cache.toplevel,
            cache.file_url()
        )),
        "Nix did not refuse the system for its signature:\n{}",
        out.describe()
    );
    ensure!(
        root.join("nix/var/nix/profiles/system")
            .symlink_metadata()
            .is_err(),
        "a system profile was set without a trusted signature"
    );
    Ok(())
}
