//! The `--system` path of the nixos-install test double (`tests/stand-in/nixos-install`), run
//! on the host with the host's real Nix (Debian's nix-bin, the same as in the dev bundle): a
//! tiny closure built here, signed and put in a `file://` binary cache, is substituted into a
//! target root by the stand-in's `nix-env --set`, with the substituter and key given as
//! nixos-install's `--option`s. No VM: this checks how the stand-in hands the options to Nix,
//! which the installer's `--system` installs rely on; the flake path runs in QEMU (boot.rs).

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Nix on the host with its own configuration and caches: no build users (the host has no
/// nixbld group), no default substituter, everything else as Nix has it.
struct HostNix {
    dir: tempfile::TempDir,
}

impl HostNix {
    fn new() -> Result<HostNix> {
        let dir = tempfile::tempdir().context("creating a directory for the host's Nix")?;
        std::fs::write(
            dir.path().join("nix.conf"),
            "experimental-features = nix-command\nbuild-users-group =\nsandbox = true\nsubstituters =\n",
        )?;
        Ok(HostNix { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("NIX_CONF_DIR", self.dir.path())
            .env("HOME", self.path("home"))
            .env("XDG_CACHE_HOME", self.path("cache"))
            .env_remove("NIX_PATH")
            .env_remove("TMPDIR");
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        Ok(run_tool(self.command(program).args(args))?
            .stdout_str()
            .trim()
            .to_string())
    }

    /// A new signing key pair named `name`: the secret key's file and the public key.
    fn signing_key(&self, name: &str) -> Result<(PathBuf, String)> {
        let secret = self.run("nix", &["key", "generate-secret", "--key-name", name])?;
        let path = self.path(&format!("{name}.sk"));
        std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
        let out = run_tool_with_input(
            self.command("nix").args(["key", "convert-secret-to-public"]),
            secret.as_bytes(),
        )?;
        ensure!(out.status.success(), "{}", out.describe());
        Ok((path, out.stdout_str().trim().to_string()))
    }
}

/// A system-like store path with a dependency, built in a store under `src`.
fn build_closure(nix: &HostNix, src: &Path) -> Result<String> {
    let tools = nix.path("tools");
    std::fs::create_dir_all(&tools)?;
    std::fs::copy("/bin/busybox", tools.join("busybox")).context("copying /bin/busybox")?;
    let expr = nix.path("closure.nix");
    std::fs::write(
        &expr,
        r#"{ tools }:
let
  busybox = "${builtins.path { path = tools; name = "busybox-tools"; }}/busybox";
  payload = derivation {
    name = "payload";
    system = "x86_64-linux";
    builder = busybox;
    args = [ "sh" "-c" "mkdir $out && echo payload >$out/data" ];
  };
in
derivation {
  name = "nixos-system-substituted-stand-in";
  system = "x86_64-linux";
  builder = busybox;
  inherit payload;
  args = [ "sh" "-c" "mkdir $out && ln -s $payload $out/payload" ];
}
"#,
    )?;
    let store = format!("local?root={}", src.display());
    let tools_arg = tools.to_str().context("tools path")?;
    nix.run(
        "nix-build",
        &[
            "--store",
            &store,
            "--no-out-link",
            expr.to_str().context("expr path")?,
            "--arg",
            "tools",
            tools_arg,
        ],
    )
}

#[test]
fn stand_in_system_path_is_substituted_from_a_signed_cache() -> Result<()> {
    let nix = HostNix::new()?;
    let src = nix.path("src");
    let system = build_closure(&nix, &src)?;
    ensure!(system.starts_with("/nix/store/"), "nix-build printed {system:?}");

    let (secret, public) = nix.signing_key("cache-1")?;
    let cache = nix.path("cache");
    let cache_url = format!("file://{}", cache.display());
    nix.run(
        "nix",
        &[
            "copy",
            "--from",
            &format!("local?root={}", src.display()),
            "--to",
            &format!("{cache_url}?secret-key={}&compression=none", secret.display()),
            &system,
        ],
    )?;

    let install = |name: &str, key: &str| -> Result<(PathBuf, ToolOutput)> {
        let root = nix.path(name);
        std::fs::create_dir_all(root.join("etc/nixos"))?;
        std::fs::write(
            root.join("etc/nixos/configuration.nix"),
            "{ ... }:\nlet\n  firmware = \"bios\";\n  bootDisk = \"/dev/vda\";\nin\n{ }\n",
        )?;
        let out = run_tool_unchecked(
            nix.command("sh")
                .arg(workspace_root().join("tests/stand-in/nixos-install"))
                .args(["--root", root.to_str().context("root path")?])
                .args(["--system", &system])
                .args(["--option", "extra-substituters", &cache_url])
                .args(["--option", "extra-trusted-public-keys", key])
                .args(["--no-root-passwd", "--no-channel-copy", "--no-bootloader"]),
        )?;
        Ok((root, out))
    };

    let (root, out) = install("target", &public)?;
    ensure!(out.status.success(), "the stand-in failed:\n{}", out.describe());
    let target = TargetStore::at(&root);
    ensure!(
        target.profile_target("/nix/var/nix/profiles/system")? == system,
        "the system profile does not lead to {system}"
    );
    target.verify_contents()?;
    let closure = target.nix_store(&["-qR", &system])?;
    ensure!(
        closure.lines().count() == 2 && closure.contains("-payload"),
        "the closure in the target:\n{closure}"
    );
    for path in closure.lines() {
        target.registered_hash(path)?;
    }
    ensure!(root.join("etc/NIXOS").is_file(), "/etc/NIXOS was not made");

    // A key that did not sign the closure: Nix refuses every path, and the profile stays unset.
    let (_, wrong) = nix.signing_key("other-1")?;
    let (root, out) = install("target-wrong-key", &wrong)?;
    ensure!(
        !out.status.success(),
        "the stand-in accepted an unsigned closure:\n{}",
        out.describe()
    );
    ensure!(
        out.stderr.contains(&format!(
            "the substitute for '{system}' from '{cache_url}' is not signed by any of the keys in 'trusted-public-keys'"
        )),
        "Nix did not refuse the system path for its signature:\n{}",
        out.describe()
    );
    ensure!(
        !root.join("nix/var/nix/profiles/system").exists(),
        "a system profile was set without a trusted signature"
    );
    Ok(())
}
