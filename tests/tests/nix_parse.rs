//! Every `.nix` file of the repository must parse (`nix-instantiate --parse`), `flake.nix`
//! must be an attribute set with `description`, `inputs` and `outputs`, the host flake the
//! agent writes from `nix/templates/host` must parse with every generated block filled in, and
//! the installer's `nix/nix.conf` must say to this machine's Nix what the installer relies on,
//! with the build users it names in `nix/passwd` and `nix/group`.
//!
//! Nothing here builds or needs nixpkgs: this machine has neither nixpkgs nor a binary cache.
//! `--parse` also resolves variables, so a misspelt name outside a `with` scope fails here.
//! The commands run with `--store dummy://` (so no Nix store or daemon is needed, and they work
//! as any user) and with HOME/XDG directories in a temporary directory.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIN_NIX_FILES: usize = 3;

fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the tests crate lives in a directory of the repository")
        .canonicalize()
        .expect("the repository root exists")
}

/// All `*.nix` files under `dir`, sorted; skips `target/` and `.git/` and does not follow
/// symlinks (a `result` link from `nix build` points into /nix/store).
fn nix_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading directory {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
            let file_type = entry
                .file_type()
                .with_context(|| format!("inspecting {}", entry.path().display()))?;
            let name = entry.file_name();
            if file_type.is_dir() {
                if name != "target" && name != ".git" {
                    pending.push(entry.path());
                }
            } else if file_type.is_file() && Path::new(&name).extension().is_some_and(|e| e == "nix") {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Runs nix-instantiate; how depends on what this machine's Nix accepts.
struct NixInstantiate {
    home: tempfile::TempDir,
    store_args: Vec<&'static str>,
}

impl NixInstantiate {
    fn new() -> Result<NixInstantiate> {
        let home = tempfile::tempdir().context("creating a temporary HOME for nix-instantiate")?;
        let mut tool = NixInstantiate {
            home,
            store_args: vec!["--store", "dummy://"],
        };
        // Very old Nix may not know the dummy store; then the default store has to do.
        let probe = tool.run(&["--parse", "-E", "{ }"])?;
        if !probe.status.success() {
            tool.store_args.clear();
            let probe = tool.run(&["--parse", "-E", "{ }"])?;
            if !probe.status.success() {
                bail!(
                    "nix-instantiate cannot parse even `{{ }}` (neither with --store dummy:// nor with its default store):\n{}",
                    String::from_utf8_lossy(&probe.stderr)
                );
            }
        }
        Ok(tool)
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        let home = self.home.path();
        let output = Command::new("nix-instantiate")
            .args(&self.store_args)
            .args(args)
            .env("HOME", home)
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_STATE_HOME", home.join("state"))
            .env_remove("NIX_PATH")
            .output();
        match output {
            Ok(output) => Ok(output),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "nix-instantiate is not installed (or not in PATH), so the Nix files cannot be checked. \
                 Install it: `apt-get install nix-bin` on Debian/Ubuntu, or any Nix from https://nixos.org/download"
            ),
            Err(e) => Err(e).context("running nix-instantiate"),
        }
    }
}

#[test]
fn every_nix_file_parses() -> Result<()> {
    let root = repo_root();
    let files = nix_files(&root)?;
    let relative = |p: &Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    if files.len() < MIN_NIX_FILES {
        bail!(
            "found only {} .nix file(s) under {} ({}); expected at least {} (flake.nix and nix/*.nix), \
             so this test would prove nothing",
            files.len(),
            root.display(),
            files.iter().map(|p| relative(p)).collect::<Vec<_>>().join(", "),
            MIN_NIX_FILES
        );
    }

    let nix = NixInstantiate::new()?;
    let mut failures = Vec::new();
    for file in &files {
        let path = file
            .to_str()
            .with_context(|| format!("{} is not UTF-8", file.display()))?;
        let output = nix.run(&["--parse", path])?;
        if !output.status.success() {
            failures.push(format!(
                "{} ({}):\n{}",
                relative(file),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            ));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} .nix files do not parse with `nix-instantiate --parse`:\n\n{}",
            failures.len(),
            files.len(),
            failures.join("\n\n")
        );
    }
    eprintln!(
        "{} .nix files parse: {}",
        files.len(),
        files.iter().map(|p| relative(p)).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

#[test]
fn flake_has_description_inputs_and_outputs() -> Result<()> {
    let root = repo_root();
    let flake = root.join("flake.nix");
    if !flake.is_file() {
        bail!(
            "{} is missing: the repository needs a flake.nix at its root",
            flake.display()
        );
    }
    // Only the top level of flake.nix is evaluated: `outputs` stays an unapplied function, so
    // no input (nixpkgs) is fetched or needed.
    // The path travels as --argstr, so no quoting of it inside the expression is needed.
    let expression = r#"{ flakePath }:
        let flake = import flakePath; in
        assert builtins.isAttrs flake;
        {
          names = builtins.attrNames flake;
          description = flake.description;
          inputs = builtins.attrNames flake.inputs;
          nixpkgsUrl = flake.inputs.nixpkgs.url or null;
          outputsIsFunction = builtins.isFunction flake.outputs;
        }"#;
    let flake_path = flake.to_str().context("the path of flake.nix is not UTF-8")?;
    let nix = NixInstantiate::new()?;
    let output = nix.run(&[
        "--eval",
        "--strict",
        "--json",
        "-E",
        expression,
        "--argstr",
        "flakePath",
        flake_path,
    ])?;
    if !output.status.success() {
        bail!(
            "evaluating the top level of flake.nix failed:\n{}",
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("nix-instantiate --json printed no JSON")?;

    let names: Vec<&str> = value["names"]
        .as_array()
        .context("attrNames is not a list")?
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    for required in ["description", "inputs", "outputs"] {
        if !names.contains(&required) {
            bail!("flake.nix has no `{required}` (it has: {})", names.join(", "));
        }
    }
    let description = value["description"]
        .as_str()
        .context("flake.nix `description` is not a string")?;
    if description.trim().is_empty() {
        bail!("flake.nix has an empty description");
    }
    let inputs = value["inputs"]
        .as_array()
        .context("flake.nix `inputs` is not an attribute set")?;
    if !inputs.iter().any(|i| i == "nixpkgs") {
        bail!("flake.nix has no nixpkgs input (inputs: {inputs:?})");
    }
    if !value["nixpkgsUrl"]
        .as_str()
        .is_some_and(|url| url.starts_with("github:NixOS/nixpkgs/"))
    {
        bail!(
            "the nixpkgs input of flake.nix is not a github:NixOS/nixpkgs/... URL: {}",
            value["nixpkgsUrl"]
        );
    }
    if value["outputsIsFunction"] != serde_json::Value::Bool(true) {
        bail!("flake.nix `outputs` is not a function");
    }
    Ok(())
}

/// A plan the agent would make on a machine like `machine`, from the kernel command line
/// `cmdline` (for its `console=`), with one disk: x86_64 on BIOS (so GRUB's lines apply),
/// aarch64 on UEFI (the only firmware the agent installs ARM machines on).
fn plan_for(
    machine: nixos_kexec::machine::platform::Machine,
    cmdline: &str,
) -> Result<nixos_kexec::installer::plan::Plan> {
    use nixos_kexec::input::config::Config;
    use nixos_kexec::machine::facts::{Facts, Firmware};
    let params = nixos_kexec::input::cmdline::Params::parse(cmdline)?;
    let mut config = Config {
        disk_auto: true,
        swap_bytes: 1 << 30,
        ..Config::assemble(None, &params)?
    };
    config.runtime_info.ssh_authorized_keys = vec!["ssh-ed25519 AAAA op@laptop".into()];
    // The agent's fixture machine (one virtio disk), with this machine's firmware, RAM and
    // platform.
    let path = nixos_kexec_tests::workspace_root().join("agent/tests/fixtures/plan/input/facts.json");
    let mut facts: Facts = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    facts.firmware = if machine.arch == "aarch64" {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    facts.ram_bytes = 1 << 30;
    facts.disks[0].size_bytes = 8 << 30;
    facts.nics.clear();
    facts.machine = machine;
    nixos_kexec::installer::plan::make(
        &config,
        &facts,
        &nixos_kexec::installer::layout::PlanIds::random(),
    )
}

#[test]
fn rendered_host_flakes_parse() -> Result<()> {
    use nixos_kexec::machine::platform::{CpuVendor, Machine, Virtualisation};
    let nix = NixInstantiate::new()?;
    let cases = [
        (
            "QEMU VM, Intel, serial console",
            plan_for(
                Machine {
                    arch: "x86_64".into(),
                    virtualisation: Virtualisation::Kvm,
                    cpu_vendor: Some(CpuVendor::Intel),
                },
                "console=tty0 console=ttyS0,115200n8",
            )?,
            vec![
                "(modulesPath + \"/profiles/qemu-guest.nix\")",
                "boot.kernelParams = [ \"console=tty0\" \"console=ttyS0,115200\" ];",
                "serial --unit=0 --speed=115200",
                "nixpkgs.hostPlatform = lib.mkDefault \"x86_64-linux\";",
            ],
            vec!["updateMicrocode", "not-detected.nix"],
        ),
        (
            "bare-metal AMD, no serial console",
            plan_for(
                Machine {
                    arch: "x86_64".into(),
                    virtualisation: Virtualisation::None,
                    cpu_vendor: Some(CpuVendor::Amd),
                },
                "console=tty0",
            )?,
            vec![
                "(modulesPath + \"/installer/scan/not-detected.nix\")",
                "hardware.cpu.amd.updateMicrocode = lib.mkDefault config.hardware.enableRedistributableFirmware;",
            ],
            vec!["console=", "qemu-guest", "grub.extraConfig"],
        ),
        (
            "Hyper-V, aarch64 serial console",
            plan_for(
                Machine {
                    arch: "aarch64".into(),
                    virtualisation: Virtualisation::Microsoft,
                    cpu_vendor: None,
                },
                "console=ttyAMA0,115200",
            )?,
            vec![
                "virtualisation.hypervGuest.enable = true;",
                "\"console=ttyAMA0,115200\"",
                "nixpkgs.hostPlatform = lib.mkDefault \"aarch64-linux\";",
                "firmware = \"uefi\";",
            ],
            vec!["grub.extraConfig", "updateMicrocode"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, plan, wanted, unwanted) in cases {
        let rendered = nixos_kexec::installer::steps::flake::render(&plan, None)?;
        let configuration = rendered
            .configuration
            .context("the generic host flake has a configuration.nix")?;
        let all = format!("{configuration}\n{}", rendered.hardware);
        for needle in wanted {
            if !all.contains(needle) {
                failures.push(format!("{what}: no {needle:?} in:\n{all}"));
            }
        }
        for needle in unwanted {
            if all.contains(needle) {
                failures.push(format!("{what}: {needle:?} should not be in:\n{all}"));
            }
        }
        for (name, text) in [
            ("flake.nix", &rendered.flake),
            ("configuration.nix", &configuration),
            ("hardware-configuration.nix", &rendered.hardware),
        ] {
            let output = nix.run(&["--parse", "-E", text])?;
            if !output.status.success() {
                failures.push(format!(
                    "{what}: {name} does not parse:\n{}\n{text}",
                    String::from_utf8_lossy(&output.stderr).trim_end()
                ));
            }
            eprintln!("--- {what}: {name}\n{text}");
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }
    Ok(())
}

/// `nix/nix.conf` as this machine's Nix (Debian's nix-bin 2.8, the dev bundle's) reads it
/// with nothing else configured: flakes on, build users, the sandbox without a fallback, the
/// target's store, no reserved space; and no setting it does not know but `ssl-cert-file`,
/// newer than 2.8, whose exact line `kexec-bundle/build-dev` leaves out for it.
#[test]
fn installer_nix_conf_is_what_nix_reads() -> Result<()> {
    const SSL_CERT_FILE: &str = "ssl-cert-file = /etc/ssl/certs/ca-certificates.crt";
    let conf = repo_root().join("nix/nix.conf");
    let text = std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    if !text.lines().any(|l| l == SSL_CERT_FILE) {
        bail!("nix/nix.conf lacks the line `{SSL_CERT_FILE}` that build-dev leaves out for Debian's Nix");
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("nix.conf"), &text)?;
    let output = Command::new("nix")
        .arg("show-config")
        .env("NIX_CONF_DIR", dir.path())
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("XDG_CONFIG_DIRS", dir.path().join("config-dirs"))
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .env_remove("NIX_CONFIG")
        .output()
        .context("running nix show-config (apt-get install nix-bin)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "nix show-config with nix/nix.conf failed ({}):\n{stderr}",
            output.status
        );
    }
    let unknown: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("unknown setting") && !l.contains("'ssl-cert-file'"))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "Nix does not know these settings of nix/nix.conf:\n{}",
            unknown.join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let setting = |name: &str| -> Option<&str> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
    };
    let mut failures = Vec::new();
    let features: Vec<&str> = setting("experimental-features")
        .unwrap_or("")
        .split(' ')
        .collect();
    for feature in ["nix-command", "flakes"] {
        if !features.contains(&feature) {
            failures.push(format!("experimental-features lacks {feature}: {features:?}"));
        }
    }
    for (name, wanted) in [
        ("build-users-group", "nixbld"),
        ("sandbox", "true"),
        ("sandbox-fallback", "false"),
        ("store", "/mnt"),
        ("gc-reserved-space", "0"),
    ] {
        if setting(name) != Some(wanted) {
            failures.push(format!("{name} is {:?}, not {wanted:?}", setting(name)));
        }
    }
    failures.extend(build_users_problems("nixbld")?);
    if !failures.is_empty() {
        bail!("nix/nix.conf, nix/passwd, nix/group:\n{}", failures.join("\n"));
    }
    Ok(())
}

/// What is wrong with the build users of group `group` in nix/passwd and nix/group (Nix needs
/// the group to have members, each a user of its own).
fn build_users_problems(group: &str) -> Result<Vec<String>> {
    let read = |name: &str| -> Result<String> {
        let path = repo_root().join("nix").join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let (passwd, groups) = (read("passwd")?, read("group")?);
    let fields = |line: &str| line.split(':').map(str::to_string).collect::<Vec<_>>();
    let Some(entry) = groups.lines().map(fields).find(|f| f[0] == group) else {
        return Ok(vec![format!("nix/group has no {group}")]);
    };
    let gid = entry.get(2).cloned().unwrap_or_default();
    let members: Vec<&str> = entry
        .get(3)
        .map(|m| m.split(',').filter(|m| !m.is_empty()).collect())
        .unwrap_or_default();
    let mut problems = Vec::new();
    if members.is_empty() {
        problems.push(format!("the group {group} has no members"));
    }
    let users: Vec<Vec<String>> = passwd.lines().map(fields).collect();
    let mut uids = std::collections::BTreeSet::new();
    for member in &members {
        match users.iter().find(|u| u[0] == *member) {
            None => problems.push(format!("{member} of {group} is not in nix/passwd")),
            Some(user) => {
                let uid = user.get(2).cloned().unwrap_or_default();
                if uid == "0" || !uids.insert(uid.clone()) {
                    problems.push(format!("{member} has uid {uid}, root's or another build user's"));
                }
                if user.get(3) != Some(&gid) {
                    problems.push(format!("{member}'s group is not {group} ({gid})"));
                }
            }
        }
    }
    for (file, text) in [("passwd", &passwd), ("group", &groups)] {
        if !text.lines().any(|l| l.starts_with("root:x:0:")) {
            problems.push(format!("nix/{file} has no root"));
        }
    }
    Ok(problems)
}

#[test]
fn nix_file_walk_skips_target_and_git() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (path, text) in [
        ("a.nix", "{ }"),
        ("sub/b.nix", "{ }"),
        ("sub/c.txt", "not nix"),
        ("target/d.nix", "{"),
        (".git/e.nix", "{"),
        ("sub/target/f.nix", "{"),
    ] {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, text)?;
    }
    std::os::unix::fs::symlink("/nonexistent", dir.path().join("result"))?;
    let found: Vec<String> = nix_files(dir.path())?
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(found, vec!["a.nix", "sub/b.nix"]);
    Ok(())
}
