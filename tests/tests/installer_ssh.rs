//! SSH into the installer (issue #13): the operator's authorized key logs in and
//! `nixos-kexec status` shows where the run is; the host key is the one the operator gave, so
//! its fingerprint is the one printed; a wrong key and a password are refused; `nixos-kexec
//! stay` there cancels the way back's reboot. Debian's ssh,
//! ssh-keyscan and ssh-keygen on the host, dropbear in the dev bundle, QEMU's port forwarding
//! between them.

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::tls::free_port;
use nixos_kexec_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MAC: &str = "52:54:00:12:34:56";
/// The way back's announcement after a failure that wrote nothing: a reboot in 10 minutes.
const WAY_BACK: &str = "nixos-kexec: reboot: no disk was written, so this machine reboots in 10 min";

/// `ssh` to the installer's forwarded port with nothing from the host's own configuration,
/// checking the host key strictly against `known_hosts`.
fn ssh(port: u16, known_hosts: &Path) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["60", "ssh", "-F", "/dev/null", "-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "IdentityAgent=none", "-o", "ConnectTimeout=30"])
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("DISPLAY");
    command
}

/// Logging in with `key` (no password, no other key); the caller adds more options, then
/// [`ROOT`] and the command.
fn ssh_with_key(port: u16, known_hosts: &Path, key: &Path) -> Command {
    let mut command = ssh(port, known_hosts);
    command
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args([
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "KbdInteractiveAuthentication=no",
        ])
        .arg("-i")
        .arg(key);
    command
}

/// Root on the installer, through QEMU's port forwarding.
const ROOT: &str = "root@127.0.0.1";

/// The fingerprint the installer's port shows a client, as `ssh-keygen -l` prints it (the
/// comment is where the key was seen).
fn scanned_fingerprint(port: u16) -> Result<String> {
    let scan = run_tool(Command::new("ssh-keyscan").args([
        "-T",
        "20",
        "-t",
        "ed25519",
        "-p",
        &port.to_string(),
        "127.0.0.1",
    ]))?;
    let listed = run_tool_with_input(Command::new("ssh-keygen").args(["-l", "-f", "-"]), &scan.stdout)?;
    ensure!(listed.status.success(), "{}", listed.describe());
    Ok(listed.stdout_str().trim().to_string())
}

/// The `SHA256:...` field of a fingerprint line.
fn sha256_of(line: &str) -> Option<&str> {
    line.split_whitespace().find(|word| word.starts_with("SHA256:"))
}

/// A run that fails before the wipe (this VM has no disk) keeps the installer up for the way
/// back's grace period, reachable over SSH with the key from the runtime info and the host key
/// from the secrets archive, as `nixos-kexec run` hands them over; the runtime info's network
/// is up before planning.
#[test]
fn ssh_into_a_stopped_installer_with_the_pinned_host_key() -> Result<()> {
    let bundle = dev_bundle()?;
    let dir = tempfile::tempdir()?;
    let host_key = dir.path().join("ssh_host_ed25519_key");
    ssh_keygen_new(&host_key, &["ed25519"], "root@web1")?;
    let operator = dir.path().join("operator");
    ssh_keygen_new(&operator, &["ed25519"], "operator@laptop")?;
    let stranger = dir.path().join("stranger");
    ssh_keygen_new(&stranger, &["ed25519"], "stranger@elsewhere")?;
    let info = serde_json::json!({
        "version": 1,
        "hostname": "web1",
        "ssh_authorized_keys": [std::fs::read_to_string(operator.with_extension("pub"))?.trim()],
        "network": {
            "interfaces": [{ "mac": MAC, "addresses": ["10.0.2.15/24"],
                             "routes": [{ "to": "default", "via": "10.0.2.2" }] }],
            "nameservers": ["10.0.2.3"]
        }
    });
    let handover = dir.path().join("handover.cpio");
    Cpio::new()
        .file("etc/nixos-kexec/runtime-info.json", 0o644, info.to_string())
        .file(
            "etc/nixos-kexec/secrets/ssh_host_ed25519_key",
            0o600,
            std::fs::read(&host_key)?,
        )
        .write_to(&handover)?;
    let port = free_port()?;
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{port} {}",
            std::fs::read_to_string(host_key.with_extension("pub"))?
        ),
    )?;
    let given = ssh_keygen_fingerprint(&host_key)?;
    let mut printed = String::new();
    let mut status = String::new();
    let out = Vm::new(&bundle)
        .memory_mib(512)
        .timeout(Duration::from_secs(240))
        .grace(Duration::from_secs(1))
        .nic_with(MAC, &format!("hostfwd=tcp:127.0.0.1:{port}-:22"))
        .extra_initrd(&handover)
        .run_with(|console| {
            console.wait_for(
                "nixos-kexec: ssh: listening on port 22;",
                Duration::from_secs(180),
            )?;
            printed = console.wait_for("\n", Duration::from_secs(5))?;
            console.wait_for(RESULT_PREFIX, Duration::from_secs(120))?;
            console.wait_for(WAY_BACK, Duration::from_secs(10))?;

            let login = run_tool_unchecked(
                ssh_with_key(port, &known_hosts, &operator).args([ROOT, "nixos-kexec status"]),
            )?;
            ensure!(
                login.status.success(),
                "login with the authorized key:\n{}",
                login.describe()
            );
            status = login.stdout_str();

            // What an operator types: a login shell on a terminal.
            let shell = run_tool_with_input(
                ssh_with_key(port, &known_hosts, &operator).args(["-tt", ROOT]),
                b"tty; echo \"shell $0\"; exit\n",
            )?;
            ensure!(
                shell.status.success()
                    && shell.stdout_str().contains("/dev/pts/")
                    && shell.stdout_str().contains("shell -sh"),
                "an interactive login:\n{}",
                shell.describe()
            );

            let scanned = scanned_fingerprint(port)?;
            ensure!(
                sha256_of(&scanned).is_some() && sha256_of(&scanned) == sha256_of(&given),
                "the port shows {scanned}, the given key is {given}"
            );

            let refused =
                run_tool_unchecked(ssh_with_key(port, &known_hosts, &stranger).args([ROOT, "true"]))?;
            ensure!(
                refused.status.code() == Some(255)
                    && refused.stderr.contains("Permission denied (publickey)"),
                "a key that is not authorized:\n{}",
                refused.describe()
            );

            // The password would come from this program; the server must not even offer a
            // password or keyboard-interactive login, so it is never asked.
            let asked = dir.path().join("asked");
            let askpass = dir.path().join("askpass");
            std::fs::write(
                &askpass,
                format!("#!/bin/sh\ntouch {}\necho root\n", asked.display()),
            )?;
            std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            let password = run_tool_unchecked(
                ssh(port, &known_hosts)
                    .args([
                        "-v",
                        "-o",
                        "PubkeyAuthentication=no",
                        "-o",
                        "NumberOfPasswordPrompts=1",
                    ])
                    .args(["-o", "PreferredAuthentications=password,keyboard-interactive"])
                    .env("SSH_ASKPASS", &askpass)
                    .env("SSH_ASKPASS_REQUIRE", "force")
                    .args([ROOT, "true"]),
            )?;
            ensure!(
                password.status.code() == Some(255)
                    && password
                        .stderr
                        .lines()
                        .any(|l| l.trim_end() == "debug1: Authentications that can continue: publickey")
                    && password.stderr.contains("Permission denied (publickey)")
                    && !asked.exists(),
                "a password login:\n{}",
                password.describe()
            );

            // The operator keeps the installer for a closer look: the way back stands down.
            let stay = run_tool_unchecked(
                ssh_with_key(port, &known_hosts, &operator).args([ROOT, "nixos-kexec stay"]),
            )?;
            ensure!(stay.status.success(), "nixos-kexec stay:\n{}", stay.describe());
            console.wait_for(
                "nixos-kexec: reboot: cancelled from an SSH session (nixos-kexec stay); the installer stays up",
                Duration::from_secs(30),
            )?;
            Ok(())
        })?;
    let reason = out.expect_failure()?;
    let fingerprint = printed.split("host key ").nth(1).unwrap_or_default().trim();
    ensure!(
        fingerprint == given,
        "printed {printed:?}, the given key is {given}"
    );
    let position = |text: &str| {
        out.log
            .find(text)
            .with_context(|| format!("no {text:?} on the console"))
    };
    ensure!(
        position("nixos-kexec: ssh: listening on port 22;")? < position("nixos-kexec: error:")?,
        "the SSH server must be up before the run stops:\n{}",
        out.tail(40)
    );
    eprintln!("nixos-kexec status over SSH printed:\n{status}");
    let lines: Vec<&str> = status.lines().collect();
    ensure!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("nixos-kexec status: finished ")
                && l.ends_with(&format!("result: failure: {reason}"))),
        "nixos-kexec status printed:\n{status}"
    );
    let result_line = format!("nixos-kexec: result: failure: {reason}");
    ensure!(
        matches!(lines.as_slice(), [.., result, way_back] if *result == result_line && way_back.starts_with(WAY_BACK)),
        "nixos-kexec status ends with the console's last lines:\n{status}"
    );
    Ok(())
}

/// Without an authorized key there is no server, and the console says so.
#[test]
fn no_authorized_key_no_ssh_server() -> Result<()> {
    let bundle = dev_bundle()?;
    let port = free_port()?;
    let mut scan = None;
    let out = Vm::new(&bundle)
        .memory_mib(512)
        .timeout(Duration::from_secs(180))
        .grace(Duration::from_secs(1))
        .nic_with(MAC, &format!("hostfwd=tcp:127.0.0.1:{port}-:22"))
        .run_with(|console| {
            console.wait_for(RESULT_PREFIX, Duration::from_secs(150))?;
            scan = Some(run_tool_unchecked(Command::new("ssh-keyscan").args([
                "-T",
                "5",
                "-p",
                &port.to_string(),
                "127.0.0.1",
            ]))?);
            Ok(())
        })?;
    out.expect_failure()?;
    ensure!(
        out.contains(
            "nixos-kexec: ssh: no authorized key in the input, so the installer's SSH server does not start"
        ),
        "{}",
        out.tail(30)
    );
    ensure!(!out.contains("ssh: listening"), "{}", out.tail(30));
    let scan = scan.context("no scan")?;
    ensure!(
        scan.stdout.is_empty(),
        "something answers on port 22:\n{}",
        scan.describe()
    );
    Ok(())
}
