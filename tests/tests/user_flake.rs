//! The host flake over the user's own flake, evaluated by real Nix (Debian's nix-bin, flakes
//! on) on the host, no VM: the agent plans as it would on a machine, writes /etc/nixos as its
//! flake step does, and Nix evaluates `nixosConfigurations.web1` from it. The QEMU test of the
//! same path is in rescue.rs (`run --flake ./cfg#web1`).
//!
//! TEST DOUBLE: the nixpkgs is the stand-in of `tests/stand-in/nixpkgs` (see
//! `nixos_kexec_tests::user_flake`): the real nixpkgs cannot be had here. The user's flake,
//! the host flake, its inputs, the lock file and the evaluation are real.

use anyhow::{ensure, Context, Result};
use nixos_kexec::input::cmdline::Params;
use nixos_kexec::input::config::Config;
use nixos_kexec::installer::plan::Plan;
use nixos_kexec::machine::facts::Facts;
use nixos_kexec_tests::user_flake::{
    evaluate_host, evaluated_config, stand_in_nixpkgs, write_user_flake, MARKER,
};
use nixos_kexec_tests::workspace_root;
use serde_json::Value;
use std::path::Path;

const HOST: &str = "vultr-guest";
const MAC: &str = "52:54:00:12:34:56";

/// The agent's plan on the fixture machine (one virtio disk, a NIC with `MAC`) for the
/// parameters `params`, with a network described by MAC and a disk passphrase given.
fn plan(params: &str) -> Result<(Plan, Config)> {
    let params = Params::parse(&format!(
        "nixos_kexec.disk=auto nixos_kexec.hostname={HOST} {params}"
    ))?;
    let mut config = Config::assemble(None, &params)?;
    config.disk_passphrase_given = true;
    config.runtime_info.ssh_authorized_keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop"
            .into(),
    ];
    config.runtime_info.network = Some(serde_json::from_value(serde_json::json!({
        "interfaces": [{ "mac": MAC, "addresses": ["203.0.113.10/24"],
                         "routes": [{ "to": "default", "via": "203.0.113.1" }] }],
        "nameservers": ["203.0.113.53"]
    }))?);
    let path = workspace_root().join("agent/tests/fixtures/plan/input/facts.json");
    let facts: Facts = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let plan = nixos_kexec::installer::plan::make(
        &config,
        &facts,
        &nixos_kexec::installer::layout::PlanIds::random(),
    )?;
    Ok((plan, config))
}

/// The host flake the flake step writes for `plan`, in `dir`.
fn write_host_flake(dir: &Path, plan: &Plan, config: &Config) -> Result<std::path::PathBuf> {
    let flake_dir = dir.join("etc/nixos");
    nixos_kexec::installer::steps::flake::write_all(&flake_dir, plan, &config.runtime_info, None)?;
    Ok(flake_dir)
}

/// In `scratch`: the stand-in nixpkgs, a user's flake whose module also holds `user_module`,
/// and the host flake the agent writes over it for `nixos_kexec.flake=<it>#web1 {params}`.
fn host_flake_over(scratch: &Path, user_module: &str, params: &str) -> Result<(Plan, std::path::PathBuf)> {
    let nixpkgs = stand_in_nixpkgs(scratch, "A")?;
    let user = scratch.join("cfg");
    write_user_flake(&user, &format!("path:{}", nixpkgs.display()), user_module)?;
    let (plan, config) = plan(&format!("nixos_kexec.flake={}#web1 {params}", user.display()))?;
    let flake_dir = write_host_flake(scratch, &plan, &config)?;
    Ok((plan, flake_dir))
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Value> {
    path.iter().try_fold(value, |v, key| {
        v.get(key)
            .with_context(|| format!("no {} in the evaluated configuration:\n{value:#}", path.join(".")))
    })
}

/// LUKS + btrfs + impermanence with a described network, the Vultr report's case: every
/// generated part joins the user's configuration, and the user's own option is there too.
#[test]
fn the_users_flake_is_built_with_every_generated_part() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let (plan, flake_dir) =
        host_flake_over(scratch.path(), "", "nixos_kexec.layout=luks-btrfs-impermanence")?;
    ensure!(
        flake_dir.join("configuration/web1.nix").is_file() && !flake_dir.join("configuration.nix").exists(),
        "the user's flake was not copied into the host flake, or the generic configuration was written"
    );
    let evaluated = evaluated_config(&flake_dir, "web1", &scratch.path().join("store"))?;

    ensure!(at(&evaluated, &["environment", "etc", "marker", "text"])? == MARKER);
    // hardware: the filesystems by UUID, LUKS, the platform, the boot loader, initrd modules
    // (the guest profile's from the stand-in nixpkgs, the disk's from the plan).
    let root = plan
        .mounts
        .iter()
        .find(|m| m.mountpoint == "/nix")
        .context("no /nix mount")?;
    ensure!(at(&evaluated, &["fileSystems", "/nix", "device"])? == root.nix_device.as_str());
    ensure!(at(&evaluated, &["fileSystems", "/", "fsType"])? == "tmpfs");
    let luks = &plan.luks[0];
    ensure!(
        at(
            &evaluated,
            &["boot", "initrd", "luks", "devices", &luks.name, "device"]
        )? == format!("/dev/disk/by-uuid/{}", luks.uuid).as_str()
    );
    ensure!(at(&evaluated, &["nixpkgs", "hostPlatform"])? == "x86_64-linux");
    ensure!(at(&evaluated, &["boot", "loader", "systemd-boot", "enable"])? == true);
    let modules = at(&evaluated, &["boot", "initrd", "availableKernelModules"])?.to_string();
    for module in plan
        .initrd_modules
        .iter()
        .map(String::as_str)
        .chain(["virtio_scsi"])
    {
        ensure!(
            modules.contains(&format!("\"{module}\"")),
            "{module} not in {modules}"
        );
    }
    // network: matched by MAC, with the address.
    let networks = at(&evaluated, &["systemd", "network", "networks"])?.to_string();
    ensure!(
        networks.contains(MAC) && networks.contains("203.0.113.10/24"),
        "the network by MAC is missing: {networks}"
    );
    // persist: the host key under /persist; initrd-ssh: sshd in the initrd.
    let host_keys = at(&evaluated, &["services", "openssh", "hostKeys"])?.to_string();
    ensure!(
        host_keys.contains("/persist/etc/ssh/ssh_host_ed25519_key"),
        "{host_keys}"
    );
    ensure!(at(&evaluated, &["boot", "initrd", "network", "ssh", "enable"])? == true);
    // The lock file pins what was built.
    let lock = std::fs::read_to_string(flake_dir.join("flake.lock")).context("no flake.lock")?;
    ensure!(
        lock.contains("\"configuration\"") && lock.contains("./configuration"),
        "{lock}"
    );
    Ok(())
}

/// A part left out (`generated=network`) is the user's to declare: their own filesystems and
/// boot loader are taken as they are, with no conflict.
#[test]
fn a_part_left_out_is_left_to_the_user() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let (_, flake_dir) = host_flake_over(
        scratch.path(),
        r#"  fileSystems."/" = { device = "/dev/disk/by-label/disko-root"; fsType = "ext4"; };
  boot.loader.grub.enable = true;
  nixpkgs.hostPlatform = "x86_64-linux";"#,
        "nixos_kexec.generated=network",
    )?;
    let flake = std::fs::read_to_string(flake_dir.join("flake.nix"))?;
    ensure!(flake.contains("generated = [ \"network\" ];"), "{flake}");
    let evaluated = evaluated_config(&flake_dir, "web1", &scratch.path().join("store"))?;
    ensure!(at(&evaluated, &["fileSystems", "/", "device"])? == "/dev/disk/by-label/disko-root");
    ensure!(
        evaluated.pointer("/boot/loader/systemd-boot").is_none(),
        "the generated boot loader is in:\n{evaluated:#}"
    );
    ensure!(at(&evaluated, &["systemd", "network", "networks"])?
        .to_string()
        .contains(MAC));
    Ok(())
}

/// Both the user and the generated hardware module declaring `/` is a conflict, and Nix says
/// so in NixOS's words, naming both files: what the README shows.
#[test]
fn a_conflict_names_both_files() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let (_, flake_dir) = host_flake_over(
        scratch.path(),
        r#"  fileSystems."/".device = "/dev/disk/by-label/disko-root";"#,
        "",
    )?;
    let out = evaluate_host(&flake_dir, "web1", &scratch.path().join("store"))?;
    ensure!(!out.status.success(), "the conflict was not found");
    for needle in [
        "The option `fileSystems./.device' has conflicting definition values:",
        "hardware-configuration.nix",
        "web1.nix",
    ] {
        ensure!(out.stderr.contains(needle), "no {needle:?} in:\n{}", out.stderr);
    }
    Ok(())
}

/// The host flake's nixpkgs is the user's unless the input names one; then the user's flake
/// follows that one.
#[test]
fn nixpkgs_follows_the_users_unless_one_is_given() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let users = stand_in_nixpkgs(scratch.path(), "users")?;
    let given = stand_in_nixpkgs(scratch.path(), "given")?;
    let user = scratch.path().join("cfg");
    write_user_flake(&user, &format!("path:{}", users.display()), "")?;
    for (extra, expected) in [
        (String::new(), "users"),
        (format!("nixos_kexec.nixpkgs=path:{}", given.display()), "given"),
    ] {
        let dir = scratch.path().join(expected);
        let (plan, config) = plan(&format!("nixos_kexec.flake={}#web1 {extra}", user.display()))?;
        let flake_dir = write_host_flake(&dir, &plan, &config)?;
        let version = nixos_kexec_tests::run_tool(
            nixos_kexec_tests::nix_cache::nix_command("nix")
                .args(["--extra-experimental-features", "nix-command flakes"])
                .args(["eval", "--raw", "--store"])
                .arg(nixos_kexec_tests::nix_cache::root_store(
                    &scratch.path().join("store"),
                ))
                .arg(format!(
                    "{}#nixosConfigurations.web1.lib.version",
                    flake_dir.display()
                )),
        )?
        .stdout_str();
        ensure!(
            version == expected,
            "{extra:?}: nixpkgs {version}, not {expected}"
        );
    }
    Ok(())
}

/// The rescue VM of the QEMU tests here: `run_args` follow `nixos-kexec run --bundle /bundle
/// --hostname HOST --param after=poweroff`, with QEMU's user network (its NIC with
/// `nic_options`), `files` in the rescue system, and `installer_extra` archives after the
/// bundle's initrd besides the nixos-install test double. The install must succeed.
fn install_from_rescue_vm(
    bundle: &nixos_kexec_tests::Bundle,
    scratch: &Path,
    name: &str,
    run_args: &str,
    files: &[(&str, u32, Vec<u8>)],
    installer_extra: &[std::path::PathBuf],
    nic_options: &str,
) -> Result<nixos_kexec_tests::RunOutcome> {
    use nixos_kexec_tests::rescue::{
        rescue_cpio_with, rescue_init_with_network, QEMU_USER_NETWORK, TARGET_SERIAL,
    };
    use nixos_kexec_tests::{DiskBus, DiskSpec, Vm};

    let init = rescue_init_with_network(
        QEMU_USER_NETWORK,
        &format!("--disk serial:{TARGET_SERIAL} --hostname {HOST} --param after=poweroff {run_args}"),
    );
    let mut extra = vec![bundle.stand_in()?];
    extra.extend_from_slice(installer_extra);
    let cpio = rescue_cpio_with(
        bundle,
        &extra,
        scratch,
        &init,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop",
        files,
    )?;
    let out = Vm::new(bundle)
        .name(name)
        .memory_mib(1024)
        .extra_initrd(&cpio)
        .nic_with(WAN_MAC, nic_options)
        .disk(DiskSpec::new(3 << 30, DiskBus::Virtio).serial(TARGET_SERIAL))
        .timeout(std::time::Duration::from_secs(900))
        .run()?;
    out.expect_success()?;
    Ok(out)
}

/// The stand-in nixpkgs as a tarball the host serves, for the user's flake to name.
fn served_nixpkgs(scratch: &Path) -> Result<(nixos_kexec_tests::FileServer, String)> {
    let served = scratch.join("served");
    std::fs::create_dir_all(&served)?;
    let nixpkgs = stand_in_nixpkgs(scratch, "served")?;
    nixos_kexec_tests::user_flake::tarball(&nixpkgs, &served, "nixpkgs")?;
    let server = nixos_kexec_tests::FileServer::start(&served)?;
    let url = format!("{}/nixpkgs.tar.gz", server.guest_url());
    Ok((server, url))
}

/// From the host, on the installed disk: the profile leads to the system built from the
/// user's flake, the store verifies, and the built system's merged configuration holds the
/// user's option and the generated root filesystem and network. Returns the host flake's lock
/// file.
fn check_built_system(disk: &Path) -> Result<String> {
    use nixos_kexec_tests::nix_cache::{system_profile, verify_store};

    let mounted = nixos_kexec_tests::LoopMount::new(&nixos_kexec_tests::extract_partition(disk, 3)?)?;
    let root = mounted.path();
    let lock =
        std::fs::read_to_string(root.join("etc/nixos/flake.lock")).context("no flake.lock on the target")?;
    let system = system_profile(root)?;
    ensure!(
        system.as_str().ends_with("-nixos-system-web1-stand-in"),
        "the profile leads to {system}"
    );
    verify_store(root)?;
    let built: Value = serde_json::from_slice(
        &std::fs::read(
            root.join(system.as_str().trim_start_matches('/'))
                .join("configuration.json"),
        )
        .context("the built system has no configuration.json")?,
    )?;
    ensure!(at(&built, &["environment", "etc", "marker", "text"])? == MARKER);
    let root_uuid = blkid_of_partition(disk, 3)?;
    ensure!(
        at(&built, &["fileSystems", "/", "device"])? == format!("/dev/disk/by-uuid/{root_uuid}").as_str(),
        "the generated root filesystem is not in the built system"
    );
    let networks = at(&built, &["systemd", "network", "networks"])?.to_string();
    ensure!(
        networks.contains(WAN_MAC) && networks.contains("10.0.2.15/24"),
        "{networks}"
    );
    Ok(lock)
}

const WAN_MAC: &str = "52:54:00:aa:10:01";

/// The whole path in QEMU: a rescue VM runs `nixos-kexec run --flake ./cfg#web1` with a local
/// flake directory (its .gitignore'd file must stay behind); the installer writes the host
/// flake over it, and nixos-install (the test double, running the real Nix) fetches the user's
/// nixpkgs (the stand-in, a tarball served by the host), locks, evaluates and builds the host
/// flake in Nix's sandbox into the target's store. From the host: the built system's merged
/// configuration holds the user's option and the generated filesystems and network, the lock
/// file pins the inputs, the profile leads to the system and the store verifies.
#[test]
fn rescue_run_with_a_local_flake_installs_the_users_configuration() -> Result<()> {
    let bundle = nixos_kexec_tests::dev_bundle_with_nix()?;
    let scratch = tempfile::tempdir()?;
    let (server, nixpkgs_url) = served_nixpkgs(scratch.path())?;
    let user = scratch.path().join("cfg");
    write_user_flake(&user, &nixpkgs_url, "")?;
    let mut files: Vec<(String, u32, Vec<u8>)> = Vec::new();
    for name in ["flake.nix", "web1.nix"] {
        files.push((format!("root/cfg/{name}"), 0o644, std::fs::read(user.join(name))?));
    }
    files.push((
        "root/cfg/.gitignore".into(),
        0o644,
        b"/notes-not-for-the-machine.txt\n".to_vec(),
    ));
    files.push((
        "root/cfg/notes-not-for-the-machine.txt".into(),
        0o644,
        b"ignored".to_vec(),
    ));
    let files: Vec<(&str, u32, Vec<u8>)> = files
        .iter()
        .map(|(p, m, d)| (p.as_str(), *m, d.clone()))
        .collect();
    let out = install_from_rescue_vm(
        &bundle,
        scratch.path(),
        "user-flake",
        "--flake ./cfg#web1",
        &files,
        &[],
        "",
    )?;
    for line in [
        "flake: ./cfg packed, 3 files",
        "the installer builds ./cfg#web1",
        "building the host flake /mnt/etc/nixos#web1",
    ] {
        ensure!(
            out.contains(line),
            "no `{line}` on the console:\n{}",
            out.tail(60)
        );
    }
    ensure!(
        server.requests().iter().any(|r| r.path == "/nixpkgs.tar.gz"),
        "the installer's Nix never fetched the user's nixpkgs"
    );

    let disk = &out.disks[0];
    let lock = check_built_system(disk)?;
    ensure!(
        lock.contains("nixpkgs.tar.gz") && lock.contains("narHash"),
        "{lock}"
    );
    let mounted = nixos_kexec_tests::LoopMount::new(&nixos_kexec_tests::extract_partition(disk, 3)?)?;
    let flake_dir = mounted.path().join("etc/nixos");
    ensure!(
        flake_dir.join("configuration/web1.nix").is_file(),
        "the user's flake is not in the host flake"
    );
    ensure!(
        !flake_dir
            .join("configuration/notes-not-for-the-machine.txt")
            .exists(),
        "a file .gitignore names travelled"
    );
    Ok(())
}

/// The private flake of the tests below: a repository on a fake GitHub Enterprise whose name
/// Nix 2.8's host check takes (letters, digits and dots).
const PRIVATE_HOST: &str = "git.corp.test";
const PRIVATE_FLAKE: &str = "github:me/private?host=git.corp.test";
/// Shaped like a GitHub token, and made up.
const TOKEN: &str = "ghp_f4k3T0kenF0rTheTestsOnly0000000000";

/// The private repository as the fake GitHub serves it: the user's flake (its nixpkgs at
/// `nixpkgs_url`) in a tarball with GitHub's top directory.
fn private_repository(
    scratch: &Path,
    nixpkgs_url: &str,
) -> Result<nixos_kexec_tests::fake_github::FakeGitHub> {
    use nixos_kexec_tests::fake_github::{tarball_top, FakeGitHub};
    let checkout = scratch.join("repository").join(tarball_top("me", "private"));
    write_user_flake(&checkout, nixpkgs_url, "")?;
    let tarball = nixos_kexec_tests::user_flake::tarball(&checkout, scratch, "private")?;
    FakeGitHub::start("me", "private", &tarball, TOKEN, PRIVATE_HOST)
}

/// Real Nix (Debian's 2.8) fetches the private flake from the fake GitHub Enterprise over
/// HTTPS with the token in the file the install step writes (`TokenFile`, named by
/// NIX_USER_CONF_FILES, read together with the nix.conf of NIX_CONF_DIR, which names the flake
/// registry); without a token the server says 404, with a wrong one 401, and Nix fails. Nix
/// prints the token nowhere.
#[test]
fn a_private_flake_is_fetched_with_the_token_only() -> Result<()> {
    use nixos_kexec::input::access_token::{AccessToken, TokenHost};
    use nixos_kexec::input::flake::UserFlake;
    use nixos_kexec::installer::steps::token_file::TokenFile;
    use nixos_kexec::secret::Secret;
    use nixos_kexec_tests::fake_github::{ConnectProxy, COMMIT};

    let scratch = tempfile::tempdir()?;
    let github = private_repository(scratch.path(), "https://nixpkgs.invalid/never-fetched.tar.gz")?;
    let proxy = ConnectProxy::start(github.tls_port())?;
    let conf_dir = scratch.path().join("etc-nix");
    std::fs::create_dir_all(&conf_dir)?;
    let registry = scratch.path().join("registry.json");
    std::fs::write(&registry, r#"{"flakes":[],"version":2}"#)?;
    // Without it Nix fetches the global registry from github.com (no network here).
    std::fs::write(
        conf_dir.join("nix.conf"),
        format!("flake-registry = {}\n", registry.display()),
    )?;
    let host = TokenHost::of(Some(&UserFlake::parse(&format!("{PRIVATE_FLAKE}#web1"))?))?;
    let token_file = |name: &str, token: &str| {
        TokenFile::write(
            &scratch.path().join(name),
            &host,
            &AccessToken::parse(Secret::new(token.as_bytes().to_vec()), name)?,
        )
    };
    let attempt = std::cell::Cell::new(0);
    let prefetch = |conf: Option<&Path>| {
        attempt.set(attempt.get() + 1);
        let mut command = nixos_kexec_tests::nix_cache::nix_command("nix");
        command
            .args([
                "--extra-experimental-features",
                "nix-command flakes",
                "flake",
                "prefetch",
            ])
            .arg("--store")
            .arg(nixos_kexec_tests::nix_cache::root_store(
                &scratch.path().join("store"),
            ))
            .arg(PRIVATE_FLAKE)
            .env("NIX_CONF_DIR", &conf_dir)
            .env("NIX_SSL_CERT_FILE", github.ca().pem_path())
            .env("https_proxy", proxy.url())
            // Nix keeps what a ref resolved to for an hour: each attempt asks again.
            .env(
                "XDG_CACHE_HOME",
                scratch.path().join(format!("cache-{}", attempt.get())),
            )
            .env_remove("NIX_USER_CONF_FILES");
        if let Some(conf) = conf {
            command.env("NIX_USER_CONF_FILES", conf);
        }
        nixos_kexec_tests::run_tool_unchecked(&mut command)
    };

    for (conf, status) in [
        (None, "HTTP error 404"),
        (Some(token_file("wrong", "ghp_notTheOne")?), "HTTP error 401"),
    ] {
        let out = prefetch(conf.as_ref().map(TokenFile::path))?;
        ensure!(
            !out.status.success() && out.stderr.contains(status),
            "the fetch without the right token did not fail with {status}:\n{}",
            out.describe()
        );
    }
    let file = token_file("run", TOKEN)?;
    let out = prefetch(Some(file.path()))?;
    ensure!(
        out.status.success() && out.combined().contains(COMMIT),
        "Nix did not fetch the private flake with the token:\n{}",
        out.describe()
    );
    ensure!(!out.combined().contains(TOKEN), "Nix printed the token");
    let requests = github.requests();
    let with_token: Vec<&str> = requests
        .iter()
        .filter(|r| r.header("Authorization") == Some(&format!("token {TOKEN}")))
        .map(|r| r.path.as_str())
        .collect();
    ensure!(
        with_token
            == [
                "/repos/me/private/commits/HEAD".to_string(),
                format!("/repos/me/private/tarball/{COMMIT}")
            ],
        "the token did not come with Nix 2.8's two requests: {with_token:?}"
    );
    ensure!(
        proxy
            .requests()
            .iter()
            .all(|r| r.method == "CONNECT" && r.path == format!("api.{PRIVATE_HOST}:443")),
        "Nix went somewhere else than api.{PRIVATE_HOST}:443"
    );
    Ok(())
}

/// The whole path in QEMU: a rescue VM runs `run --flake github:me/private?host=git.corp.test#web1
/// --flake-token-file /root/token`; the installer's Nix (through nixos-install, the test
/// double) fetches the private flake from the fake GitHub Enterprise with the token (the
/// server requires it) and installs. The guest finds the host by an /etc/hosts line and trusts
/// its CA through an archive appended to the bundle's initrd; QEMU forwards its port 443 to
/// the host. The token is nowhere on the console, on the target disk, or in the report.
#[test]
fn rescue_run_with_a_private_flake_fetches_it_with_the_token() -> Result<()> {
    use nixos_kexec_tests::fake_github::COMMIT;

    /// Where the guest finds the fake GitHub; QEMU sends it to the host.
    const GUEST_ADDRESS: &str = "10.0.2.100";
    let bundle = nixos_kexec_tests::dev_bundle_with_nix()?;
    let scratch = tempfile::tempdir()?;
    let (_nixpkgs_server, nixpkgs_url) = served_nixpkgs(scratch.path())?;
    let github = private_repository(scratch.path(), &nixpkgs_url)?;
    let mut trusted = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .context("the host's CA bundle (apt-get install ca-certificates)")?;
    trusted += &github.ca().pem()?;
    let installer_files = scratch.path().join("installer-files.cpio");
    nixos_kexec_tests::Cpio::new()
        .file("etc/ssl/certs/ca-certificates.crt", 0o644, trusted)
        .file(
            "etc/hosts",
            0o644,
            format!("127.0.0.1 localhost\n{GUEST_ADDRESS} {PRIVATE_HOST} api.{PRIVATE_HOST}\n"),
        )
        // glibc without nsswitch.conf asks DNS first and gives up on its answer (NXDOMAIN).
        .file("etc/nsswitch.conf", 0o644, "hosts: files dns\n")
        .write_to(&installer_files)?;
    // Compressed, as the stand-in's archive before it: the kernel takes a plain archive only at
    // a 4-byte boundary, which a gzip stream need not end on.
    nixos_kexec_tests::tool("gzip", [&installer_files])?;
    let out = install_from_rescue_vm(
        &bundle,
        scratch.path(),
        "private-flake",
        &format!("--flake '{PRIVATE_FLAKE}#web1' --flake-token-file /root/token"),
        &[("root/token", 0o600, format!("{TOKEN}\n").into_bytes())],
        &[installer_files.with_extension("cpio.gz")],
        &github.guestfwd(GUEST_ADDRESS),
    )?;
    for line in [
        "appended archive: file /etc/nixos-kexec/secrets/flake-access-token mode 600",
        "flake: the access token for git.corp.test (github references) travels in the appended archive",
        "install: Nix has the flake access token for git.corp.test (github references) for this step only",
        "building the host flake /mnt/etc/nixos#web1",
    ] {
        ensure!(
            out.contains(line),
            "no `{line}` on the console:\n{}",
            out.tail(60)
        );
    }
    ensure!(!out.contains(TOKEN), "the token is on the console");
    let requests = github.requests();
    ensure!(
        requests
            .iter()
            .any(|r| r.path.ends_with(&format!("/tarball/{COMMIT}"))),
        "the installer's Nix never fetched the private flake"
    );
    ensure!(
        requests
            .iter()
            .all(|r| r.header("Authorization") == Some(&format!("token {TOKEN}"))),
        "a request came without the token"
    );

    let disk = &out.disks[0];
    let lock = check_built_system(disk)?;
    ensure!(
        lock.contains(&format!("\"host\": \"{PRIVATE_HOST}\"")) && lock.contains(COMMIT),
        "the lock file does not pin the private flake: {lock}"
    );
    ensure!(
        nixos_kexec_tests::count_in_image(disk, TOKEN.as_bytes())? == 0,
        "the token is on the target disk"
    );
    let mounted = nixos_kexec_tests::LoopMount::new(&nixos_kexec_tests::extract_partition(disk, 3)?)?;
    let logs = mounted.path().join("var/log/nixos-kexec");
    let report = std::fs::read_to_string(logs.join("report.json")).context("no report on the target")?;
    let log = std::fs::read_to_string(logs.join("install.log")).context("no install.log on the target")?;
    ensure!(
        log.contains("install: Nix has the flake access token for git.corp.test"),
        "install.log is not the installer's console"
    );
    ensure!(
        !report.contains(TOKEN) && !log.contains(TOKEN),
        "the token is in the report or the log"
    );
    Ok(())
}

/// The UUID blkid reads from partition `number` of `disk`.
fn blkid_of_partition(disk: &Path, number: u32) -> Result<String> {
    let part = nixos_kexec_tests::extract_partition(disk, number)?;
    nixos_kexec_tests::blkid(&part)?
        .get("UUID")
        .cloned()
        .context("no UUID")
}

/// Bad input on the rescue side: a flake reference that does not parse, and a local flake
/// directory without flake.nix. Each is one error naming the problem and the fix, before the
/// kexec, and the target disk stays untouched.
#[test]
fn bad_flakes_are_refused_before_the_kexec() -> Result<()> {
    use nixos_kexec_tests::rescue::{rescue_cpio, rescue_vm};
    use nixos_kexec_tests::*;

    let bundle = dev_bundle()?;
    for (flake, files, expected) in [
        (
            "'nixpkgs#web1'",
            vec![],
            "flake \"nixpkgs#web1\" is not a flake reference the installer can fetch",
        ),
        (
            "./cfg#web1",
            vec![("root/cfg/configuration.nix", 0o644, b"{ }".to_vec())],
            "The flake directory ./cfg (of ./cfg#web1) has no flake.nix.",
        ),
    ] {
        let scratch = tempfile::tempdir()?;
        let cpio = rescue_cpio(
            &bundle,
            scratch.path(),
            &format!("--disk serial:TARGET-DISK --flake {flake} --param after=poweroff"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop",
            &files,
        )?;
        let out = rescue_vm(&bundle, &cpio)
            .grace(std::time::Duration::from_secs(2))
            .run()?;
        // `run` printed the error and returned, and the rescue system powered off.
        ensure!(
            out.exited_by_itself,
            "{flake}: the rescue VM did not power off:\n{}",
            out.tail(20)
        );
        // clap prints a bad value with our fix in one line; `run` prints `error:` and `fix:`.
        ensure!(
            out.contains(expected)
                && (out.contains("Fix: name it") || out.contains("nixos-kexec: fix: name the directory")),
            "{flake}: no `{expected}` with its fix on the console:\n{}",
            out.tail(20)
        );
        ensure!(
            !out.contains("starting as init"),
            "{flake}: the installer was started"
        );
        for disk in &out.disks {
            ensure!(
                nonzero_blocks(disk)?.is_empty(),
                "{flake}: {} was written to",
                disk.display()
            );
        }
    }
    Ok(())
}
