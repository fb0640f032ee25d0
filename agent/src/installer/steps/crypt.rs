//! Disk encryption with cryptsetup: LUKS2 containers opened with the disk passphrase, and
//! plain dm-crypt with a throwaway random key for swap that the system re-keys at every boot.
//!
//! The passphrase reaches cryptsetup on stdin (`--key-file -`), never in its arguments (which
//! /proc shows and the log keeps); the file it came in is wiped as soon as it has been read.

use crate::error::user_error;
use crate::installer::layout::{LuksVolume, SwapArea};
use crate::machine::runner;
use crate::secret::Secret;
use anyhow::Result;
use std::path::Path;
use std::process::Command;

/// The disk passphrase, locked in RAM and overwritten when dropped.
pub struct Passphrase(Secret);

impl Passphrase {
    pub fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// Reads the passphrase file and wipes it at once, whatever happens next. One trailing newline
/// is dropped (files written with `echo` have one; the passphrase typed at boot has none).
pub fn take_passphrase(path: &Path) -> Result<Passphrase> {
    let read = Secret::read(path);
    crate::installer::steps::keys::wipe_file(path);
    let mut data = Passphrase(read.map_err(|e| {
        user_error(
            format!("The disk passphrase file {} cannot be read ({e:#}).", path.display()),
            "append a cpio archive holding etc/nixos-kexec/secrets/disk-passphrase (mode 0600), e.g. with nixos-kexec run --disk-key-file FILE.",
        )
    })?);
    let kept = data
        .bytes()
        .strip_suffix(b"\r\n")
        .or_else(|| data.bytes().strip_suffix(b"\n"))
        .map_or(data.bytes().len(), <[u8]>::len);
    data.0.truncate(kept);
    if data.0.is_empty() {
        return Err(user_error(
            "The disk passphrase file is empty.",
            "put the passphrase in the file given with --disk-key-file.",
        ));
    }
    if data.bytes().contains(&b'\n') || data.bytes().contains(&0) {
        return Err(user_error(
            "The disk passphrase spans several lines (or holds a NUL byte), so it could not be typed at boot.",
            "use a passphrase on a single line.",
        ));
    }
    Ok(data)
}

/// cryptsetup without udev: libdevmapper would otherwise wait for udev to make the
/// /dev/mapper node, and the installer has no udev. Its positional arguments (devices,
/// mapping names) always follow `--`, so none can ever read as an option (the layout checks
/// refuse names starting with `-` too).
fn cryptsetup() -> Command {
    let mut command = Command::new("cryptsetup");
    command.env("DM_DISABLE_UDEV", "1");
    command
}

/// The `luksFormat` arguments for a volume (without the device).
pub fn format_args(volume: &LuksVolume) -> Vec<String> {
    let mut args: Vec<String> = [
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--uuid",
        &volume.uuid,
        "--sector-size",
        &volume.sector_size.to_string(),
        "--pbkdf",
        &volume.pbkdf.algorithm,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(kib) = volume.pbkdf.memory_kib {
        args.extend(["--pbkdf-memory".into(), kib.to_string()]);
    }
    if let Some(label) = &volume.label {
        args.extend(["--label".into(), label.clone()]);
    }
    args.extend(["--key-file".into(), "-".into()]);
    args
}

/// A device-mapper mapping this run opened; closed when dropped (also after a failure), so the
/// disk is not left held.
#[derive(Debug)]
pub struct Opened {
    name: String,
    active: bool,
}

impl Opened {
    pub fn close(mut self) -> Result<()> {
        self.active = false;
        runner::run(cryptsetup().args(["close", "--", &self.name]))?;
        Ok(())
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = runner::run(cryptsetup().args(["close", "--", &self.name])) {
                log::warn!("closing {}: {e:#}", self.name);
            }
        }
    }
}

/// Creates the LUKS2 container and opens it at `/dev/mapper/<name>`.
pub fn format_and_open(volume: &LuksVolume, passphrase: &Passphrase) -> Result<Opened> {
    crate::console::line(&format!(
        "encrypting {} as LUKS2 {} ({}{}, {}-byte sectors); deriving the key takes a while",
        volume.device,
        volume.name,
        volume.pbkdf.algorithm,
        volume
            .pbkdf
            .memory_kib
            .map(|k| format!(" up to {} MiB", k / 1024))
            .unwrap_or_default(),
        volume.sector_size
    ));
    runner::run_with_input(
        cryptsetup()
            .args(format_args(volume))
            .arg("--")
            .arg(&volume.device),
        passphrase.bytes(),
    )?;
    runner::run_with_input(
        cryptsetup().args([
            "open",
            "--type",
            "luks2",
            "--key-file",
            "-",
            "--",
            &volume.device,
            &volume.name,
        ]),
        passphrase.bytes(),
    )?;
    Ok(Opened {
        name: volume.name.clone(),
        active: true,
    })
}

/// Where the subsystem field lies in a LUKS2 binary header (`struct luks2_hdr_disk`): after
/// magic, version, header size, sequence id, label, checksum algorithm, salt and UUID.
const SUBSYSTEM_FIELD: std::ops::Range<usize> = 208..256;

/// Writes `text` (at most 47 bytes; empty clears it) into the subsystem field of the LUKS2
/// header on `device`. Only the header's metadata changes, so the container may be open.
pub fn set_subsystem(device: &str, text: &str) -> Result<()> {
    runner::run(cryptsetup().args(["config", "--subsystem", text, "--", device]))?;
    Ok(())
}

/// The subsystem field of the LUKS2 header at the start of `head` (a device's first bytes),
/// read without the passphrase or cryptsetup; none when empty, when `head` is no LUKS2 header
/// (LUKS1 has no such field) or when the field is not text.
pub fn subsystem(head: &[u8]) -> Option<String> {
    if head.get(0..6) != Some(b"LUKS\xba\xbe") || head.get(6..8) != Some(&[0, 2]) {
        return None;
    }
    let field = head.get(SUBSYSTEM_FIELD)?;
    let text = &field[..field.iter().position(|b| *b == 0).unwrap_or(field.len())];
    let text = std::str::from_utf8(text).ok()?;
    (!text.is_empty()).then(|| text.to_string())
}

/// Maps a swap partition through plain dm-crypt with a random key nobody keeps, as the
/// installed system will at every boot (`randomEncryption`), so no swapped page of the install
/// ever reaches the disk in plaintext.
pub fn open_random_swap(swap: &SwapArea) -> Result<Opened> {
    let name = swap
        .device
        .strip_prefix("/dev/mapper/")
        .unwrap_or(&swap.device)
        .to_string();
    runner::run(cryptsetup().args([
        "open",
        "--type",
        "plain",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--key-file",
        "/dev/urandom",
        "--sector-size",
        &swap.sector_size.to_string(),
        "--",
        &swap.partition,
        &name,
    ]))?;
    Ok(Opened { name, active: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::layout::Pbkdf;

    #[test]
    fn passphrase_file_is_wiped_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk-passphrase");
        std::fs::write(&path, "correct horse\n").unwrap();
        let pass = take_passphrase(&path).unwrap();
        assert_eq!(pass.bytes(), b"correct horse");
        assert!(!path.exists());
        assert_eq!(format!("{pass:?}"), "Passphrase(..)");
        for bad in ["\n", "two\nlines\n"] {
            std::fs::write(&path, bad).unwrap();
            assert!(crate::error::as_user_error(&take_passphrase(&path).unwrap_err()).is_some());
            assert!(!path.exists());
        }
        assert!(take_passphrase(&path).is_err());
    }

    #[test]
    fn format_arguments_carry_kdf_and_sector_size_but_no_secret() {
        let volume = LuksVolume {
            device: "/dev/vda4".into(),
            name: "cryptroot".into(),
            uuid: "bbbbbbbb-0000-0000-0000-000000000001".into(),
            label: None,
            sector_size: 4096,
            pbkdf: Pbkdf {
                algorithm: "argon2id".into(),
                memory_kib: Some(262144),
            },
            open_device: "/dev/mapper/cryptroot".into(),
        };
        let args = format_args(&volume).join(" ");
        assert_eq!(
            args,
            "luksFormat --batch-mode --type luks2 --uuid bbbbbbbb-0000-0000-0000-000000000001 --sector-size 4096 --pbkdf argon2id --pbkdf-memory 262144 --key-file -"
        );
    }
}
