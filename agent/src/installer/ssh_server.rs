//! The installer's SSH server: the operator's way in while the installer runs and after it
//! stopped, until the machine reboots or powers off.
//!
//! It is dropbear: with its libraries it adds about 1.3 MB to the initrd, where OpenSSH's sshd
//! brings libcrypto, Kerberos and PAM (about 8 MB), and it needs no privilege-separation user
//! or config file. It reads only its own key format, so dropbearconvert, which both bundles
//! carry, converts the host keys.
//!
//! - Root logs in with the input's authorized keys (as written, options too; dropbear refuses
//!   a line with an option it does not know, such as cert-authority), never with a password
//!   (`-s`; dropbear has no keyboard-interactive login).
//! - Its host key is the installed system's: the one `run` made or was given, from the secrets
//!   archive, converted into a root-only directory in RAM before the keys step wipes the
//!   secret. Booted without one (PXE, GRUB), a new ed25519 key goes where `run` would have put
//!   it, so the keys step installs that same key.
//! - Without an authorized key it does not start.

use crate::console;
use crate::error::one_line;
use crate::input::config::{self, Config, SECRETS_DIR};
use crate::installer::steps::keys;
use crate::machine::runner;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const PORT: u16 = 22;
const SERVER: &str = "dropbear";
const CONVERT: &str = "dropbearconvert";
/// Root-only, in RAM: dropbear's copies of the host keys, its pid file and its log.
pub const RUN_DIR: &str = "/run/nixos-kexec/ssh";
const PID_FILE: &str = "dropbear.pid";
/// Root's home in both bundles' /etc/passwd (nix/passwd): dropbear reads
/// `.ssh/authorized_keys` there.
const ROOT_HOME: &str = "/root";
/// How long dropbear may take to load its keys and listen.
const STARTUP: Duration = Duration::from_secs(10);

/// Starts the SSH server when `config` has authorized keys, and says on the console how it
/// went: the port and host key fingerprint, or why not. It never fails the run, which goes on
/// without it. `root` is where the input's files are (`/`).
pub fn open(config: &Config, root: &Path) {
    if config.ssh_authorized_keys().is_empty() {
        console::line(
            "ssh: no authorized key in the input, so the installer's SSH server does not start (nixos-kexec run takes root's keys; at a boot prompt: nixos_kexec.ssh_key=)",
        );
        return;
    }
    let secrets = root.join(SECRETS_DIR.trim_start_matches('/'));
    match start(config, &secrets, Path::new(RUN_DIR)) {
        // Dropping the handle leaves dropbear running, the agent's child: it outlives the
        // agent, and PID 1 reaps it.
        Ok((_child, fingerprints)) => console::line(&format!(
            "ssh: listening on port {PORT}; root logs in with the input's authorized keys ({}), never a password; host key {}",
            config.ssh_authorized_keys().len(),
            fingerprints.join("; ")
        )),
        Err(e) => console::line(&format!(
            "ssh: the installer's SSH server did not start: {}",
            one_line(&e)
        )),
    }
}

/// Whether the server started here is still serving (its pid file names a live process).
pub fn is_running() -> bool {
    std::fs::read_to_string(Path::new(RUN_DIR).join(PID_FILE))
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// How long the installer waits after its result before it reboots or powers off while the
/// server runs: a session following the log (`nixos-kexec status`, `deploy`) polls it four
/// times a second and needs the last lines sent before the machine goes away.
pub const HOLD_FOR_FOLLOWERS: Duration = Duration::from_secs(2);

/// Starts dropbear; returns it and its host keys' fingerprint lines.
fn start(config: &Config, secrets: &Path, run_dir: &Path) -> Result<(Child, Vec<String>)> {
    if runner::find_in_path(SERVER).is_none() {
        bail!("this bundle has no {SERVER}");
    }
    private_dir(run_dir)?;
    let mut converted = Vec::new();
    let mut fingerprints = Vec::new();
    for key in host_keys(config, secrets)? {
        fingerprints.push(keys::provided_fingerprint(&key)?);
        converted.push(convert(&key, run_dir)?);
    }
    write_authorized_keys(Path::new(ROOT_HOME), config.ssh_authorized_keys())?;
    let pid_file = run_dir.join(PID_FILE);
    let _ = std::fs::remove_file(&pid_file);
    let log = run_dir.join("dropbear.log");
    let mut child = runner::spawn_service(&mut server_command(&converted, &pid_file), &log)?;
    wait_until_listening(&mut child, &pid_file, &log)?;
    Ok((child, fingerprints))
}

/// The host keys in the secrets archive; without any, a new ed25519 key put there, which the
/// keys step installs as it would one from `run`.
fn host_keys(config: &Config, secrets: &Path) -> Result<Vec<PathBuf>> {
    let provided = config::host_key_files(secrets);
    if !provided.is_empty() {
        return Ok(provided);
    }
    private_dir(secrets)?;
    let (private, _) = keys::new_ed25519(&format!("root@{}", config.hostname()))?;
    let path = secrets.join("ssh_host_ed25519_key");
    keys::write_file(&path, private.as_bytes(), 0o600)?;
    Ok(vec![path])
}

/// dropbear's own copy of an OpenSSH private key, in `dir` under the same name.
fn convert(openssh: &Path, dir: &Path) -> Result<PathBuf> {
    let name = openssh.file_name().context("host key path without a file name")?;
    let converted = dir.join(name);
    // dropbearconvert does not overwrite.
    let _ = std::fs::remove_file(&converted);
    runner::run(
        Command::new(CONVERT)
            .args(["openssh", "dropbear"])
            .arg(openssh)
            .arg(&converted),
    )?;
    std::fs::set_permissions(&converted, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", converted.display()))?;
    Ok(converted)
}

/// The server's command line: in the foreground (`-F`, the agent's child), logging to stderr
/// (`-E`, its log file), no password logins for anyone (`-s`), these host keys only.
fn server_command(host_keys: &[PathBuf], pid_file: &Path) -> Command {
    let mut command = Command::new(SERVER);
    command.args(["-F", "-E", "-s", "-p", &PORT.to_string()]);
    for key in host_keys {
        command.arg("-r").arg(key);
    }
    command.arg("-P").arg(pid_file);
    command
}

/// Root's `.ssh/authorized_keys` under `home`, one key a line, as sshd and dropbear read it.
fn write_authorized_keys(home: &Path, authorized: &[String]) -> Result<()> {
    let dir = home.join(".ssh");
    private_dir(&dir)?;
    let mut text = authorized.join("\n");
    text.push('\n');
    keys::write_file(&dir.join("authorized_keys"), text.as_bytes(), 0o600)
}

fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Waits until dropbear wrote its pid file, which it does once it has loaded the host keys and
/// bound its port; its last log lines name the problem when it ended instead.
fn wait_until_listening(child: &mut Child, pid_file: &Path, log: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for dropbear")? {
            bail!("{SERVER} ended ({status}): {}", last_lines(log));
        }
        if pid_file.exists() {
            return Ok(());
        }
        if started.elapsed() > STARTUP {
            bail!(
                "{SERVER} did not listen within {} s: {}",
                STARTUP.as_secs(),
                last_lines(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last_lines(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
    }

    /// Port 22, the given host keys only, no password logins, in the foreground.
    #[test]
    fn the_server_command_line() {
        let command = server_command(
            &[
                PathBuf::from("/run/nixos-kexec/ssh/ssh_host_ed25519_key"),
                PathBuf::from("/run/nixos-kexec/ssh/ssh_host_rsa_key"),
            ],
            Path::new("/run/nixos-kexec/ssh/dropbear.pid"),
        );
        assert_eq!(
            runner::describe(&command),
            "dropbear -F -E -s -p 22 -r /run/nixos-kexec/ssh/ssh_host_ed25519_key -r /run/nixos-kexec/ssh/ssh_host_rsa_key -P /run/nixos-kexec/ssh/dropbear.pid"
        );
    }

    /// Booted without a host key, the one made for the server is where the keys step takes
    /// it from; one that came is used as it is.
    #[test]
    fn a_host_key_is_made_once_where_the_keys_step_finds_it() {
        let root = tempfile::tempdir().unwrap();
        let secrets = root.path().join("etc/nixos-kexec/secrets");
        let mut config = Config::default();
        config.runtime_info.hostname = Some("web1".into());
        let made = host_keys(&config, &secrets).unwrap();
        assert_eq!(made, [secrets.join("ssh_host_ed25519_key")]);
        assert_eq!(mode(&made[0]), 0o600);
        assert_eq!(mode(&secrets), 0o700);
        let fingerprint = keys::provided_fingerprint(&made[0]).unwrap();
        assert!(fingerprint.ends_with(" root@web1 (ED25519)"), "{fingerprint}");
        assert_eq!(host_keys(&config, &secrets).unwrap(), made);
        assert_eq!(keys::provided_fingerprint(&made[0]).unwrap(), fingerprint);
        config.find_secrets(root.path());
        assert_eq!(
            config.provided_host_keys,
            [made[0].to_string_lossy().into_owned()]
        );
    }

    #[test]
    fn authorized_keys_are_root_only_one_a_line() {
        let home = tempfile::tempdir().unwrap();
        let keys = [
            "ssh-ed25519 AAAA one".to_string(),
            "restrict ssh-ed25519 AAAA two".to_string(),
        ];
        write_authorized_keys(home.path(), &keys).unwrap();
        let file = home.path().join(".ssh/authorized_keys");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "ssh-ed25519 AAAA one\nrestrict ssh-ed25519 AAAA two\n"
        );
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&home.path().join(".ssh")), 0o700);
    }
}
