//! `nixos-kexec deploy` from the operator's machine (issue #13): this host is the laptop, with
//! Debian's OpenSSH client and an ssh config of its own; a rescue VM runs Debian's sshd,
//! reached through QEMU's port forwarding, as a rented machine's rescue system is. deploy
//! copies, shows the plan, runs, reconnects to the installer's SSH (dropbear, behind the same
//! forwarded port) with the pinned host key, and follows the install to its result.
//!
//! TEST DOUBLE: the bundle deploy sends is the one with Debian's Nix, with `nixos-install`'s
//! stand-in (`tests/stand-in/nixos-install`, see tests/tests/boot.rs) appended to its initrd:
//! it stands for the one boundary this machine cannot cross, a NixOS closure from nixpkgs. The
//! real Nix builds the stand-in system, Debian's grub-install writes the boot loader, and the
//! agent's verification runs, all in the installer that deploy follows.

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::rescue::QEMU_USER_NETWORK;
use nixos_kexec_tests::sshd::{add_sshd, START_SSHD};
use nixos_kexec_tests::tls::free_port;
use nixos_kexec_tests::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MAC: &str = "52:54:00:de:91:01";
const GIB: u64 = 1 << 30;

/// The rescue system: the network QEMU serves, set statically, and sshd; then it waits.
fn rescue_init() -> String {
    init_with_sshd("rescue-box")
}

/// `/init` of a system that sets up the network QEMU serves, names itself `hostname`, starts
/// sshd and waits.
fn init_with_sshd(hostname: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net virtio_blk; do modprobe $m; done
sleep 1
{QEMU_USER_NETWORK}
echo {hostname} > /proc/sys/kernel/hostname
{START_SSHD}
while true; do sleep 3600; done
"#
    )
}

/// The bundle directory deploy sends: the Nix bundle's kernel and agent, its initrd with the
/// stand-in appended (the kernel unpacks concatenated archives).
fn bundle_with_stand_in(bundle: &Bundle, dir: &Path) -> Result<PathBuf> {
    let sent = dir.join("bundle");
    std::fs::create_dir(&sent)?;
    std::fs::copy(&bundle.bzimage, sent.join("bzImage"))?;
    std::fs::copy(bundle.dir.join("nixos-kexec"), sent.join("nixos-kexec"))
        .context("build-dev puts the agent beside the bundle")?;
    let mut initrd = std::fs::read(&bundle.initrd)?;
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    initrd.extend(std::fs::read(bundle.stand_in()?)?);
    std::fs::write(sent.join("initrd"), initrd)?;
    Ok(sent)
}

/// `nixos-kexec deploy ARGS` on this host, as the operator types it; stopped after `limit`.
fn deploy(agent: &Path, args: &[&str], limit: Duration) -> Result<ToolOutput> {
    let mut command = Command::new("timeout");
    command
        .arg(limit.as_secs().to_string())
        .arg(agent)
        .arg("deploy")
        .args(args)
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("NIXOS_KEXEC_LOG");
    run_tool_unchecked(&mut command)
}

/// The lines deploy printed (its console lines are on stderr).
fn lines(out: &ToolOutput) -> Vec<String> {
    out.combined().lines().map(str::to_string).collect()
}

fn has(out: &ToolOutput, line_start: &str) -> bool {
    lines(out).iter().any(|l| l.starts_with(line_start))
}

/// This host as the operator's laptop: keys, an ssh config naming the rescue system
/// `rescue-vm`, and the rescue VM's extra initrd.
struct Laptop {
    dir: tempfile::TempDir,
    port: u16,
    config: String,
    rescue: PathBuf,
    operator_pub: String,
}

impl Laptop {
    fn new() -> Result<Laptop> {
        let dir = tempfile::tempdir()?;
        let rescue_key = dir.path().join("rescue_host_key");
        ssh_keygen_new(&rescue_key, &["ed25519"], "root@rescue-box")?;
        let operator = dir.path().join("operator");
        ssh_keygen_new(&operator, &["ed25519"], "operator@laptop")?;
        let operator_pub = std::fs::read_to_string(operator.with_extension("pub"))?;
        let rescue = dir.path().join("rescue.cpio");
        add_sshd(
            Cpio::new().file("init", 0o755, rescue_init()),
            &rescue_key,
            operator_pub.trim(),
        )?
        .write_to(&rescue)?;
        // The rescue system by a name of the operator's, its host key known (strict checking,
        // as an operator who checked it has it).
        let port = free_port()?;
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "[127.0.0.1]:{port} {}",
                std::fs::read_to_string(rescue_key.with_extension("pub"))?
            ),
        )?;
        let config = dir.path().join("ssh_config");
        std::fs::File::create(&config)?.write_all(
            format!(
                "Host rescue-vm\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
                operator.display(),
                known_hosts.display()
            )
            .as_bytes(),
        )?;
        Ok(Laptop {
            config: config.to_string_lossy().into_owned(),
            dir,
            port,
            rescue,
            operator_pub: operator_pub.trim().to_string(),
        })
    }

    /// The rescue VM, its port 22 forwarded to [`Laptop::port`], and a blank target disk.
    fn rescue_vm(&self, bundle: &Bundle, name: &str) -> Vm {
        Vm::new(bundle)
            .name(name)
            .memory_mib(1024)
            .extra_initrd(&self.rescue)
            .nic_with(MAC, &format!("hostfwd=tcp:127.0.0.1:{}-:22", self.port))
            .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("TARGET-DISK"))
    }

    /// `deploy rescue-vm -F CONFIG ARGS`.
    fn deploy(&self, agent: &Path, args: &[&str], limit: Duration) -> Result<ToolOutput> {
        let mut all = vec!["rescue-vm", "-F", &self.config];
        all.extend(args);
        deploy(agent, &all, limit)
    }
}

/// From a fresh rescue VM: a refused deploy changes nothing and removes its upload; then a
/// deploy installs, with every stage streamed to this terminal, and exits 0 only after the
/// installer's verified success.
#[test]
fn deploy_from_the_laptop_through_the_rescue_systems_sshd() -> Result<()> {
    let plain = dev_bundle()?;
    let with_nix = dev_bundle_with_nix()?;
    let laptop = Laptop::new()?;
    let sent = bundle_with_stand_in(&with_nix, laptop.dir.path())?;
    let agent = sent.join("nixos-kexec");
    let config = laptop.config.clone();

    let mut refused = None;
    let mut installed = None;
    let out = laptop
        .rescue_vm(&plain, "deploy-rescue")
        .timeout(Duration::from_secs(1200))
        .run_with(|console| {
            console.wait_for("rescue: sshd started", Duration::from_secs(240))?;
            // No such disk: refused by the dry run, before anything changed.
            let bundle = plain.dir.to_string_lossy();
            let no_disk = laptop.deploy(
                &agent,
                &["--bundle", &bundle, "--disk", "/dev/vdz"],
                Duration::from_secs(300),
            )?;
            let gone = run_tool_unchecked(Command::new("ssh").args([
                "-F",
                &config,
                "rescue-vm",
                "test ! -e /run/nixos-kexec-deploy",
            ]))?;
            refused = Some((no_disk, gone));

            let bundle = sent.to_string_lossy();
            installed = Some(laptop.deploy(
                &agent,
                &[
                    "--bundle",
                    &bundle,
                    "--disk",
                    "serial:TARGET-DISK",
                    "--hostname",
                    "web1",
                    "--param",
                    "after=poweroff",
                ],
                Duration::from_secs(900),
            )?);
            Ok(())
        })?;

    let (no_disk, gone) = refused.context("the refused deploy did not run")?;
    ensure!(
        no_disk.status.code() == Some(1),
        "a refused deploy exits 1:\n{}",
        no_disk.describe()
    );
    for expected in [
        "nixos-kexec: deploy: [1/4] copy done in ",
        "nixos-kexec: rescue: error: Disk /dev/vdz is not on this machine.",
        "nixos-kexec: error: run refused on the rescue system: Disk /dev/vdz is not on this machine.",
        "nixos-kexec: result: failure: run refused on the rescue system",
    ] {
        ensure!(
            has(&no_disk, expected),
            "`{expected}` missing:\n{}",
            no_disk.describe()
        );
    }
    ensure!(
        !has(&no_disk, "nixos-kexec: deploy: [3/4] kexec"),
        "a refused plan went on:\n{}",
        no_disk.describe()
    );
    ensure!(
        gone.status.success(),
        "the refused deploy left its upload (secrets) behind:\n{}",
        gone.describe()
    );

    let deployed = installed.context("the deploy did not run")?;
    ensure!(
        deployed.status.success(),
        "deploy failed:\n{}",
        deployed.describe()
    );
    // Streamed in this order: every stage with its counter and duration, the rescue system's
    // plan and kexec, then the installer's steps to its verified result.
    let printed = lines(&deployed);
    let mut expected_in_order = vec![
        "nixos-kexec: host key: 256 SHA256:",
        "nixos-kexec: deploy: [1/4] copy: ",
        "nixos-kexec: deploy: [1/4] copy done in ",
        "nixos-kexec: deploy: [2/4] plan: ",
        "nixos-kexec: rescue: the installer will write layout ",
        "nixos-kexec: rescue: dry run: nothing was loaded",
        "nixos-kexec: deploy: [2/4] plan done in ",
        "nixos-kexec: deploy: [3/4] kexec: ",
        "nixos-kexec: rescue: installer loaded; rebooting into it now",
        "nixos-kexec: deploy: [3/4] kexec done in ",
        "nixos-kexec: deploy: [4/4] install: following the installer over SSH, host key pinned",
        "nixos-kexec: installer: nixos-kexec ",
        "nixos-kexec: installer: [1/",
    ];
    let verify_done = printed
        .iter()
        .find(|l| l.starts_with("nixos-kexec: installer: [") && l.contains("] verify done in "))
        .cloned()
        .with_context(|| format!("no verify step streamed:\n{}", deployed.describe()))?;
    expected_in_order.extend([
        verify_done.as_str(),
        "nixos-kexec: installer: result: success",
        "nixos-kexec: deploy: [4/4] install done in ",
        "nixos-kexec: result: success",
    ]);
    let mut at = 0;
    for expected in &expected_in_order {
        let found = printed[at..]
            .iter()
            .position(|l| l.starts_with(expected))
            .with_context(|| format!("`{expected}` missing, or out of order:\n{}", deployed.describe()))?;
        at += found + 1;
    }
    ensure!(
        printed.last().map(String::as_str) == Some("nixos-kexec: result: success"),
        "deploy's last line:\n{}",
        deployed.describe()
    );
    // Each of the installer's lines once, though the connection may have been made twice.
    let results = printed
        .iter()
        .filter(|l| l.starts_with("nixos-kexec: installer: result:"))
        .count();
    ensure!(results == 1, "{results} result lines:\n{}", deployed.describe());

    // The key deploy pinned is the one the installer's SSH server had, and the installed one.
    let pinned = printed
        .iter()
        .find_map(|l| l.strip_prefix("nixos-kexec: host key: "))
        .context("no host key line")?;
    ensure!(
        out.contains(&format!("never a password; host key {pinned}\n")),
        "the installer's SSH server had another host key than the pinned `{pinned}`"
    );
    ensure!(
        out.exited_by_itself,
        "the installed machine should have powered off"
    );
    ensure!(!out.contains("verify: FAILED"), "a verification failed");
    sgdisk_verify(&out.disks[0])?;
    eprintln!("deploy printed:\n{}", deployed.combined());
    Ok(())
}

/// With `--bundle-url` the rescue system fetches the bundle from a web server (here on this
/// host's loopback) instead of receiving it over SSH: a served file that is not the local
/// bundle's is refused before anything runs. Then the installer fails after the kexec (the
/// plain bundle has no nixos-install, so the install step fails, after the wipe): deploy exits
/// 1 with the installer's reason and last lines, and the ssh command it prints reaches the
/// installer, with the pinned key, for a look.
#[test]
fn a_failed_install_ends_deploy_with_the_last_lines_and_the_way_in() -> Result<()> {
    let plain = dev_bundle()?;
    let laptop = Laptop::new()?;
    let agent = plain.dir.join("nixos-kexec");
    let bundle = plain.dir.to_string_lossy().into_owned();
    let served = FileServer::start(&plain.dir)?;
    let tampered_dir = laptop.dir.path().join("tampered");
    std::fs::create_dir(&tampered_dir)?;
    std::fs::copy(&plain.bzimage, tampered_dir.join("bzImage"))?;
    std::fs::write(tampered_dir.join("initrd"), b"not the bundle's initrd")?;
    let tampered = FileServer::start(&tampered_dir)?;
    let deploy_args = |url: String| {
        vec![
            "--bundle".to_string(),
            bundle.clone(),
            "--bundle-url".into(),
            url,
            "--disk".into(),
            "serial:TARGET-DISK".into(),
            "--hostname".into(),
            "web1".into(),
        ]
    };
    let mut refused = None;
    let mut failed = None;
    let mut looked = None;
    let out = laptop
        .rescue_vm(&plain, "deploy-failure")
        .timeout(Duration::from_secs(600))
        .grace(Duration::from_secs(1))
        .run_with(|console| {
            console.wait_for("rescue: sshd started", Duration::from_secs(240))?;
            let args = deploy_args(format!("{}/", tampered.guest_url()));
            refused = Some(laptop.deploy(
                &agent,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                Duration::from_secs(300),
            )?);
            let args = deploy_args(served.guest_url());
            let deployed = laptop.deploy(
                &agent,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                Duration::from_secs(500),
            )?;
            let way_in = lines(&deployed).iter().find_map(|l| {
                l.split_once("; log in with: ")
                    .map(|(_, command)| command.to_string())
            });
            if let Some(command) = way_in {
                looked = Some(run_tool_unchecked(Command::new("sh").args(["-c", &command]))?);
            }
            failed = Some(deployed);
            Ok(())
        })?;
    let refused = refused.context("deploy did not run")?;
    ensure!(
        refused.status.code() == Some(1)
            && has(
                &refused,
                "nixos-kexec: error: fetching the bundle's initrd on the rescue system: "
            )
            && refused.combined().contains("/initrd (23 bytes) has SHA-256 ")
            && !has(&refused, "nixos-kexec: deploy: [2/4] plan"),
        "a served initrd that is not the local bundle's must stop deploy before the plan:\n{}",
        refused.describe()
    );
    let failed = failed.context("deploy did not run")?;
    ensure!(
        failed.status.code() == Some(1),
        "a failed install exits 1:\n{}",
        failed.describe()
    );
    // Every file of the bundle came from the web server, checked against the local one.
    let fetched: Vec<String> = served
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    for name in ["bzImage", "initrd"] {
        ensure!(
            fetched.contains(&format!("GET /{name}")),
            "the rescue system did not fetch {name}: {fetched:?}"
        );
        ensure!(
            lines(&failed).iter().any(|l| l.starts_with(&format!(
                "nixos-kexec: rescue: fetched {}/{name}: ",
                served.guest_url()
            )) && l.ends_with("as expected")),
            "no line for the fetched {name}:\n{}",
            failed.describe()
        );
    }
    for expected in [
        "nixos-kexec: deploy: [3/4] kexec done in ",
        "nixos-kexec: installer: [8/10] install ...",
        "nixos-kexec: deploy: the installer failed; its last 25 lines:",
        "nixos-kexec: deploy: | result: failure: ",
        "nixos-kexec: error: the installer failed: ",
        "nixos-kexec: result: failure: the installer failed: ",
    ] {
        ensure!(
            has(&failed, expected),
            "`{expected}` missing:\n{}",
            failed.describe()
        );
    }
    ensure!(
        failed
            .combined()
            .contains("nixos-install is not in this installer bundle"),
        "the installer's reason is not shown:\n{}",
        failed.describe()
    );
    let looked = looked.with_context(|| format!("deploy printed no way in:\n{}", failed.describe()))?;
    ensure!(
        looked.status.success() && looked.stdout_str().starts_with("nixos-kexec status: finished "),
        "the printed ssh command did not reach the installer:\n{}",
        looked.describe()
    );
    ensure!(
        out.contains("nixos-kexec: no reboot: /dev/vda may be half-written"),
        "the installer should stay up after the wipe:\n{}",
        out.tail(20)
    );
    Ok(())
}

/// `--wait-for-boot`: after the installer's success and its reboot, deploy waits until the
/// installed system answers SSH with the pinned host key.
///
/// TEST DOUBLE: the installed system. What the stand-in installs boots to its boot loader only
/// (a NixOS closure from nixpkgs is the boundary this machine cannot cross), so a second VM
/// stands for the booted system: Debian's sshd with the host key read from the installed disk
/// and the operator's key, on the same forwarded port. deploy's side is the real one: it polls
/// through QEMU's forward, refuses any other host key, and tells the installer (which has a
/// status file) from the installed system.
#[test]
fn wait_for_boot_waits_for_the_installed_system_with_the_pinned_key() -> Result<()> {
    let plain = dev_bundle()?;
    let with_nix = dev_bundle_with_nix()?;
    let laptop = Laptop::new()?;
    let sent = bundle_with_stand_in(&with_nix, laptop.dir.path())?;
    let agent = sent.join("nixos-kexec");
    let bundle = sent.to_string_lossy().into_owned();
    std::thread::scope(|scope| -> Result<()> {
        let mut deploying = None;
        // The installer reboots after its success; QEMU runs with -no-reboot, so the VM ends.
        let installed = laptop
            .rescue_vm(&plain, "deploy-wait-for-boot")
            .timeout(Duration::from_secs(900))
            .run_with(|console| {
                console.wait_for("rescue: sshd started", Duration::from_secs(240))?;
                let (laptop, agent, bundle) = (&laptop, &agent, &bundle);
                deploying = Some(scope.spawn(move || {
                    laptop.deploy(
                        agent,
                        &[
                            "--bundle",
                            bundle,
                            "--disk",
                            "serial:TARGET-DISK",
                            "--hostname",
                            "web1",
                            "--wait-for-boot",
                            "--ssh-timeout",
                            "5m",
                        ],
                        Duration::from_secs(900),
                    )
                }));
                Ok(())
            })?;
        ensure!(installed.exited_by_itself, "the installer should have rebooted");
        installed.expect_success()?;
        let deploying = deploying.context("deploy did not start")?;

        // The booted system (the test double above), with the installed host key.
        let root = extract_partition(&installed.disks[0], 3)?;
        let host_key = laptop.dir.path().join("installed_host_key");
        std::fs::write(&host_key, ext4_read_file(&root, "/etc/ssh/ssh_host_ed25519_key")?)?;
        std::fs::set_permissions(&host_key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let booted = laptop.dir.path().join("booted.cpio");
        add_sshd(
            Cpio::new().file("init", 0o755, init_with_sshd("web1")),
            &host_key,
            &laptop.operator_pub,
        )?
        .write_to(&booted)?;
        let mut deployed = None;
        Vm::new(&plain)
            .name("deploy-booted-system")
            .memory_mib(512)
            .extra_initrd(&booted)
            .nic_with(MAC, &format!("hostfwd=tcp:127.0.0.1:{}-:22", laptop.port))
            .timeout(Duration::from_secs(600))
            .stop_after_interaction()
            .run_with(|console| {
                console.wait_for("rescue: sshd started", Duration::from_secs(240))?;
                deployed = Some(
                    deploying
                        .join()
                        .map_err(|_| anyhow::anyhow!("the deploy thread panicked"))??,
                );
                Ok(())
            })?;
        let deployed = deployed.context("deploy did not end")?;
        ensure!(
            deployed.status.success(),
            "deploy --wait-for-boot:\n{}",
            deployed.describe()
        );
        for expected in [
            "nixos-kexec: installer: result: success",
            "nixos-kexec: deploy: [4/5] install done in ",
            "nixos-kexec: deploy: [5/5] boot: waiting for the installed system to answer SSH with the pinned host key",
            "nixos-kexec: deploy: the installed system answers: web1, kernel ",
            "nixos-kexec: deploy: [5/5] boot done in ",
        ] {
            ensure!(has(&deployed, expected), "`{expected}` missing:\n{}", deployed.describe());
        }
        ensure!(
            lines(&deployed).last().map(String::as_str) == Some("nixos-kexec: result: success"),
            "{}",
            deployed.describe()
        );
        Ok(())
    })
}
