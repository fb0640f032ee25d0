//! What `deploy` sends to the rescue system, and the `run` command line that uses it there:
//! the operator's options name files on the laptop, which travel in one archive and are named
//! by their place on the rescue system instead.

use super::ssh::command_line;
use crate::console;
use crate::error::user_error;
use crate::input::flake::FlakeSource;
use crate::installer::steps::keys;
use crate::rescue::cpio::Archive;
use crate::rescue::gather;
use crate::rescue::run::RunOptions;
use crate::secret::Secret;
use anyhow::{anyhow, Context, Result};
use std::path::Path;

/// On the rescue system: in RAM where there is a /run (a tmpfs on every systemd system), root's
/// only. Gone with the kexec, removed by `deploy` when `run` refuses.
pub const REMOTE_DIR: &str = "/run/nixos-kexec-deploy";
/// The uploaded agent, which runs `run` there.
pub const REMOTE_AGENT: &str = "/run/nixos-kexec-deploy/nixos-kexec";
/// The bundle's files `run` reads.
pub const REMOTE_BUNDLE: &str = "/run/nixos-kexec-deploy/bundle";
/// Where the archive of the operator's files is unpacked.
pub const REMOTE_FILES: &str = "/run/nixos-kexec-deploy/files";

/// The bundle's files that `run` reads, those present are copied: the kernel (`bzImage` on
/// x86_64, `Image` on arm64), the initrd, and the Nix bundle's parameters.
pub const BUNDLE_FILES: [&str; 4] = ["bzImage", "Image", "initrd", "kernel-params"];

pub struct Upload {
    /// The operator's files, unpacked under [`REMOTE_FILES`].
    pub archive: Archive,
    /// `run`'s arguments on the rescue system, without `--dry-run`.
    pub run_args: Vec<String>,
    /// The installer's host keys (OpenSSH public key lines): the installed system's too.
    pub host_keys: Vec<String>,
    /// Their fingerprints as `ssh-keygen -l` prints them.
    pub fingerprints: Vec<String>,
}

impl Upload {
    /// The remote `run` command line, `--dry-run` when `dry_run`.
    pub fn run_command(&self, dry_run: bool) -> String {
        let mut words = vec![REMOTE_AGENT.to_string(), "run".into()];
        words.extend(self.run_args.iter().cloned());
        if dry_run {
            words.push("--dry-run".into());
        }
        command_line(&words)
    }
}

/// Reads the files `options` name on this machine into the upload, and makes the host key
/// here when none is given, so `deploy` knows the key to pin before anything is sent.
pub fn prepare(options: &RunOptions) -> Result<Upload> {
    // Every field, so that a new option of `run` cannot be forgotten here.
    let RunOptions {
        bundle: _,
        disk,
        hostname,
        nixpkgs,
        system,
        substituters,
        trusted_public_keys,
        flake,
        flake_token_file,
        ssh_key_files,
        disk_key_file,
        host_keys,
        extra_files,
        params,
        dry_run: _,
    } = options;
    let mut archive = Archive::default();
    let mut args = vec!["--bundle".to_string(), REMOTE_BUNDLE.to_string()];
    let mut option = |name: &str, value: String| {
        args.push(format!("--{name}"));
        args.push(value);
    };
    let remote = |name: &str| format!("{REMOTE_FILES}/{name}");
    if let Some(disk) = disk {
        option("disk", disk.clone());
    }
    if let Some(hostname) = hostname {
        option("hostname", hostname.clone());
    }
    if let Some(nixpkgs) = nixpkgs {
        option("nixpkgs", nixpkgs.clone());
    }
    if let Some(system) = system {
        option("system", system.to_string());
    }
    for substituter in substituters {
        option("substituter", substituter.to_string());
    }
    for key in trusted_public_keys {
        option("trusted-public-key", key.to_string());
    }
    if let Some(flake) = flake {
        match &flake.source {
            FlakeSource::Remote(_) => option("flake", flake.to_string()),
            FlakeSource::Directory(dir) => {
                let packed = crate::rescue::local_flake::pack_under(flake, dir, &mut archive, "flake")?;
                console::line(&format!(
                    "flake: {} packed, {} files, {} KiB (.gitignore respected)",
                    dir.display(),
                    packed.summary.files,
                    packed.summary.bytes.div_ceil(1024)
                ));
                option("flake", flake.moved_to(Path::new(&remote("flake"))).to_string());
            }
        }
    }
    if let Some(path) = flake_token_file {
        archive.file("flake-token", 0o600, Secret::read(path)?, true);
        option("flake-token-file", remote("flake-token"));
    }
    for (index, path) in ssh_key_files.iter().enumerate() {
        let keys = gather::root_authorized_keys(path);
        if keys.is_empty() {
            return Err(user_error(
                format!("{} holds no SSH public key.", path.display()),
                "pass an id_*.pub or authorized_keys file with --ssh-key-file.",
            ));
        }
        let name = format!("ssh-keys/{index}.pub");
        archive.file(&name, 0o644, format!("{}\n", keys.join("\n")).into_bytes(), false);
        option("ssh-key-file", remote(&name));
    }
    if let Some(path) = disk_key_file {
        archive.file("disk-passphrase", 0o600, Secret::read(path)?, true);
        option("disk-key-file", remote("disk-passphrase"));
    }
    let (host_keys, fingerprints) = match host_keys {
        Some(dir) => given_host_keys(dir, &mut archive)?,
        None => new_host_key(hostname.as_deref(), &mut archive)?,
    };
    option("host-keys", remote("host-keys"));
    if let Some(dir) = extra_files {
        let mut tree = crate::rescue::run::walk_extra_files(dir)?;
        operators_files_become_roots(&mut tree);
        let summary = archive.tree(&tree, "extra-files")?;
        console::line(&format!("extra files from {}: {summary}", dir.display()));
        option("extra-files", remote("extra-files"));
    }
    for (key, value) in params {
        option("param", format!("{key}={value}"));
    }
    Ok(Upload {
        archive,
        run_args: args,
        host_keys,
        fingerprints,
    })
}

/// Files an operator who is not root made on the laptop are theirs; on the target they are
/// root's, as they would be had root made them on the rescue system.
fn operators_files_become_roots(tree: &mut crate::input::tree::Tree) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me == 0 {
        return;
    }
    for entry in &mut tree.entries {
        if entry.uid == me {
            entry.uid = 0;
            entry.gid = 0;
        }
    }
}

fn public_line(key: &ssh_key::PrivateKey) -> Result<String> {
    key.public_key()
        .to_openssh()
        .map_err(|e| anyhow!("{e}"))
        .context("encoding a host public key")
}

/// The `ssh_host_<type>_key` files in `dir`, as `run --host-keys` reads them.
fn given_host_keys(dir: &Path, archive: &mut Archive) -> Result<(Vec<String>, Vec<String>)> {
    let (mut public, mut fingerprints) = (Vec::new(), Vec::new());
    for given in crate::rescue::run::host_keys_in(dir)? {
        public.push(public_line(&given.key)?);
        fingerprints.push(keys::fingerprint_line(&given.key));
        archive.file(&format!("host-keys/{}", given.name), 0o600, given.data, true);
    }
    Ok((public, fingerprints))
}

/// A new ed25519 host key, made here rather than by `run`, so that it is known before the
/// kexec, when `deploy` must pin it.
fn new_host_key(hostname: Option<&str>, archive: &mut Archive) -> Result<(Vec<String>, Vec<String>)> {
    let hostname = hostname.unwrap_or(crate::input::config::DEFAULT_HOSTNAME);
    let (private, fingerprint) = keys::new_ed25519(&format!("root@{hostname}"))?;
    let key = ssh_key::PrivateKey::from_openssh(private.as_bytes())
        .map_err(|e| anyhow!("{e}"))
        .context("reading the new host key")?;
    let public = public_line(&key)?;
    archive.file(
        "host-keys/ssh_host_ed25519_key",
        0o600,
        Secret::new(private.as_bytes().to_vec()),
        true,
    );
    Ok((vec![public], vec![fingerprint]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunOptions,
    }

    fn options(args: &[&str]) -> RunOptions {
        let mut all = vec!["run"];
        all.extend(args);
        Cli::parse_from(all).run
    }

    /// Every option reaches the remote `run`, files by their place there; the remote command
    /// parses back into the same options, with the laptop's paths replaced.
    #[test]
    fn the_remote_run_has_every_option_with_files_moved() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id.pub");
        std::fs::write(
            &key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD me@laptop\n",
        )
        .unwrap();
        let passphrase = dir.path().join("pass");
        std::fs::write(&passphrase, "correct horse").unwrap();
        let flake = dir.path().join("cfg");
        std::fs::create_dir(&flake).unwrap();
        std::fs::write(flake.join("flake.nix"), "{ outputs = _: { }; }").unwrap();
        let given = options(&[
            "--bundle",
            "/laptop/bundle",
            "--disk",
            "serial:TARGET",
            "--hostname",
            "web1",
            "--ssh-key-file",
            key.to_str().unwrap(),
            "--disk-key-file",
            passphrase.to_str().unwrap(),
            "--flake",
            &format!("{}#web1", flake.display()),
            "--param",
            "layout=luks-ext4",
            "--param",
            "after=poweroff",
        ]);
        let upload = prepare(&given).unwrap();
        let remote = options(&upload.run_args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(remote.bundle, Path::new(REMOTE_BUNDLE));
        assert_eq!(remote.disk.as_deref(), Some("serial:TARGET"));
        assert_eq!(remote.hostname.as_deref(), Some("web1"));
        assert_eq!(
            remote.ssh_key_files,
            [Path::new("/run/nixos-kexec-deploy/files/ssh-keys/0.pub")]
        );
        assert_eq!(
            remote.disk_key_file.as_deref(),
            Some(Path::new("/run/nixos-kexec-deploy/files/disk-passphrase"))
        );
        assert_eq!(
            remote.host_keys.as_deref(),
            Some(Path::new("/run/nixos-kexec-deploy/files/host-keys"))
        );
        assert_eq!(
            remote.flake.unwrap().to_string(),
            "/run/nixos-kexec-deploy/files/flake#web1"
        );
        assert_eq!(remote.params, given.params);
        assert!(!remote.dry_run);
        assert!(upload.run_command(true).ends_with(" --dry-run"));

        let paths: Vec<&str> = upload.archive.entries().iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "ssh-keys/0.pub",
            "disk-passphrase",
            "host-keys/ssh_host_ed25519_key",
            "flake/flake.nix",
        ] {
            assert!(paths.contains(&expected), "{paths:?}");
        }
        let listing = upload.archive.listing().join("\n");
        assert!(!listing.contains("correct horse") && !listing.contains("PRIVATE KEY"));
        // The pinned key is the one that travels.
        assert_eq!(upload.host_keys.len(), 1);
        assert!(upload.host_keys[0].starts_with("ssh-ed25519 "));
        assert!(upload.fingerprints[0].ends_with("root@web1 (ED25519)"));
    }

    #[test]
    fn a_key_file_without_a_key_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pub");
        std::fs::write(&empty, "# nothing\n").unwrap();
        let error = prepare(&options(&[
            "--bundle",
            "/b",
            "--ssh-key-file",
            empty.to_str().unwrap(),
        ]))
        .err()
        .unwrap();
        assert!(
            format!("{error:#}").contains("holds no SSH public key"),
            "{error:#}"
        );
    }
}
