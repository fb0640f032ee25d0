//! The rescue side end to end: a rescue VM (Debian kernel + the dev initrd with a busybox
//! "rescue system" script as /init) configures a Hetzner-like static network, runs
//! `nixos-kexec run`, and kexecs into the installer, which must bring the same network back on
//! the right NICs (matched by MAC: the rescue system renamed them) and prepare the disk chosen by
//! serial. The operator's `--extra-files` tree rides along in two of these runs (ext4, and
//! btrfs-impermanence where it lands under /persist) rather than in VMs of its own.

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::rescue::{rescue_cpio, rescue_vm, LAN_MAC, WAN_MAC};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const PASSPHRASE: &str = "Sup3r-Secret-Disk-Passphrase-7781";
const GIB: u64 = 1 << 30;
const OPERATOR_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";

struct Rescue {
    cpio: std::path::PathBuf,
    dir: tempfile::TempDir,
}

fn rescue(bundle: &Bundle, run_args: &str, extra: &[(&str, u32, Vec<u8>)]) -> Result<Rescue> {
    let dir = tempfile::tempdir()?;
    let mut files = vec![("root/disk-passphrase", 0o600, PASSPHRASE.as_bytes().to_vec())];
    files.extend(extra.iter().cloned());
    let cpio = rescue_cpio(bundle, dir.path(), run_args, OPERATOR_KEY, &files)?;
    Ok(Rescue { cpio, dir })
}

/// The passphrase must appear nowhere but where it was put: not on the console, not in the
/// installer's command line (the agent prints it), not on the target disk.
fn check_secret_absent(out: &RunOutcome) -> Result<()> {
    ensure!(
        !out.log.contains(PASSPHRASE),
        "the disk passphrase appeared on the console"
    );
    for disk in &out.disks {
        let found = run_tool_unchecked(
            std::process::Command::new("grep")
                .args(["-c", "-a", PASSPHRASE])
                .arg(disk),
        )?;
        ensure!(
            found.stdout_str().trim() == "0",
            "the disk passphrase is in {}",
            disk.display()
        );
    }
    Ok(())
}

/// A private key only its owner (uid 1000) reads, in the operator's `--extra-files` tree: it
/// must reach the target and never the console.
const EXTRA_KEY: &str = "EXTRA-FILES-KEY-9f3c1e77-only-alice-reads-this";
/// The operator's machine-id, which replaces the one the installer writes under /persist when
/// `/` is a tmpfs.
const EXTRA_MACHINE_ID: &str = "5c0ffee05c0ffee05c0ffee05c0ffee0\n";
/// What the tree holds, as (path under the destination, type as debugfs names it, mode, uid,
/// gid): nested directories, a secret, a script, a setuid helper, a relative link.
const EXTRA_EXPECTED: &[(&str, &str, u32, u32, u32)] = &[
    ("home/alice", "directory", 0o755, 1000, 100),
    ("home/alice/.ssh", "directory", 0o700, 1000, 100),
    ("home/alice/.ssh/id_ed25519", "regular", 0o600, 1000, 100),
    ("usr/local/bin/hello", "regular", 0o755, 0, 0),
    ("usr/local/bin/helper", "regular", 0o4755, 0, 50),
    ("srv/app/releases/v1", "directory", 0o750, 0, 0),
    ("srv/app/current", "symlink", 0o777, 1000, 100),
    ("etc/machine-id", "regular", 0o444, 0, 0),
];

/// The bytes of a regular file of [`EXTRA_EXPECTED`].
fn extra_content(relative: &str) -> Vec<u8> {
    match relative {
        "home/alice/.ssh/id_ed25519" => EXTRA_KEY.into(),
        "etc/machine-id" => EXTRA_MACHINE_ID.into(),
        _ => format!("#!/bin/sh\necho {relative}\n").into(),
    }
}

/// The tree at /root/extra on the rescue system, as a second archive for the rescue VM (the
/// kernel keeps each entry's mode and owner; the parents it adds are 0755, root's).
fn extra_files_cpio(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("extra-files.cpio");
    let mut cpio = Cpio::new();
    for (relative, kind, mode, uid, gid) in EXTRA_EXPECTED {
        let at = format!("root/extra/{relative}");
        cpio = match *kind {
            "directory" => cpio.dir(&at, *mode),
            "symlink" => cpio.symlink(&at, "releases/v1"),
            _ => cpio.file(&at, *mode, extra_content(relative)),
        }
        .owner(&at, *uid, *gid);
    }
    cpio.write_to(&path)?;
    Ok(path)
}

/// The tree arrived as it was: each entry's type, mode and owner by `stat` (path under the
/// destination -> type, mode, uid, gid), the key's bytes and the link's target by `read` and
/// `read_link`; the key's bytes never on the console, where the run printed what it copied.
fn check_extra_files(
    out: &RunOutcome,
    destination: &str,
    stat: impl Fn(&str) -> Result<(String, u32, u32, u32)>,
    read: impl Fn(&str) -> Result<Vec<u8>>,
    read_link: impl Fn(&str) -> Result<String>,
) -> Result<()> {
    for (relative, kind, mode, uid, gid) in EXTRA_EXPECTED {
        let found = stat(relative).with_context(|| format!("extra file {relative}"))?;
        ensure!(
            found == (kind.to_string(), *mode, *uid, *gid),
            "{relative}: {found:?}, expected {kind} {mode:o} {uid}:{gid}"
        );
    }
    ensure!(
        read("home/alice/.ssh/id_ed25519")? == EXTRA_KEY.as_bytes(),
        "the key's bytes"
    );
    ensure!(
        read("etc/machine-id")? == EXTRA_MACHINE_ID.as_bytes(),
        "the operator's machine-id"
    );
    ensure!(
        read_link("srv/app/current")? == "releases/v1",
        "the link's target"
    );
    ensure!(
        !out.log.contains(EXTRA_KEY),
        "the contents of a 0600 extra file appeared on the console"
    );
    ensure!(
        out.contains(&format!(
            "appended archive: file /etc/nixos-kexec/extra-files/home/alice/.ssh/id_ed25519 mode 600, owner 1000:100, {} bytes (secret, contents not shown)",
            EXTRA_KEY.len()
        )),
        "the secret extra file is not listed, masked"
    );
    let bytes: usize = EXTRA_EXPECTED
        .iter()
        .filter(|(_, kind, ..)| *kind == "regular")
        .map(|(relative, ..)| extra_content(relative).len())
        .sum();
    // Eleven directories: the three above and the parents etc, home, srv, srv/app,
    // srv/app/releases, usr, usr/local and usr/local/bin.
    let copied = format!(
        "nixos-kexec: extra files: 4 files (1 secret), 11 directories, 1 link; {bytes} bytes copied to {destination} on the target"
    );
    ensure!(out.contains(&copied), "the installer did not say `{copied}`");
    Ok(())
}

fn read_root_file(disk: &Path, path: &str) -> Result<String> {
    let root = extract_partition(disk, 3)?;
    Ok(String::from_utf8(ext4_read_file(&root, path)?)?)
}

#[test]
fn kexec_with_static_network_restored_by_mac() -> Result<()> {
    let bundle = dev_bundle()?;
    let rescue = rescue(
        &bundle,
        "--disk serial:TARGET-DISK --hostname web1 --disk-key-file /root/disk-passphrase \
         --extra-files /root/extra --param stop_before=install --param after=poweroff",
        &[],
    )?;
    let extra = extra_files_cpio(rescue.dir.path())?;
    let out = rescue_vm(&bundle, &rescue.cpio).extra_initrd(&extra).run()?;
    out.expect_success()?;
    ensure!(
        out.contains("runtime info travels on the kernel command line"),
        "carrier line missing"
    );
    ensure!(
        out.contains("appended archive: file /etc/nixos-kexec/secrets/disk-passphrase mode 600"),
        "secret not listed"
    );
    ensure!(
        out.contains("nixos-kexec: installer kernel command line: "),
        "the installer did not print its command line"
    );
    check_secret_absent(&out)?;

    // The installer's view, printed after the network step: addresses on the NICs found by MAC.
    let text = out.log.clone();
    let after_kexec = text
        .split("starting as init")
        .nth(1)
        .context("the installer never started")?;
    for expected in [
        "203.0.113.10/32",
        "2001:db8:c0de:1::1/64",
        "10.0.0.5/24",
        WAN_MAC,
        LAN_MAC,
    ] {
        ensure!(
            after_kexec.contains(expected),
            "installer output lacks {expected}"
        );
    }

    let disk = &out.disks[1];
    sgdisk_verify(disk)?;
    let network = read_root_file(disk, "/etc/nixos/network.nix")?;
    nix_parse_str(&network)?;
    for expected in [
        &format!("MACAddress = \"{WAN_MAC}\""),
        &format!("MACAddress = \"{LAN_MAC}\""),
        "\"203.0.113.10/32\"",
        "\"2001:db8:c0de:1::1/64\"",
        "\"10.0.0.5/24\"",
        "Gateway = \"172.31.1.1\"",
        "GatewayOnLink = true",
        "Gateway = \"fe80::1\"",
        "\"185.12.64.1\"",
    ] {
        ensure!(
            network.contains(expected),
            "network.nix lacks {expected}:\n{network}"
        );
    }
    ensure!(
        !network.contains("DHCP = \"ipv4\""),
        "static interfaces must not use DHCP:\n{network}"
    );
    let configuration = read_root_file(disk, "/etc/nixos/configuration.nix")?;
    ensure!(
        configuration.contains("./network.nix") && configuration.contains(OPERATOR_KEY),
        "{configuration}"
    );
    let info: Value = serde_json::from_str(&read_root_file(disk, "/etc/nixos/runtime-info.json")?)?;
    ensure!(info["disk"]["serial"] == "TARGET-DISK", "runtime-info: {info}");
    ensure!(info["hostname"] == "web1", "runtime-info: {info}");
    // The host key was made on the rescue side: the same fingerprint is printed before the
    // kexec, by the installer, and is what ssh-keygen reads from the installed key.
    let printed: Vec<&str> = out.lines_containing("nixos-kexec: host key: ").collect();
    ensure!(
        printed.len() == 2 && printed[0] == printed[1],
        "host key lines: {printed:?}"
    );
    let root = extract_partition(disk, 3)?;
    let key_file = out.dir.join("installed_host_key");
    std::fs::write(&key_file, ext4_read_file(&root, "/etc/ssh/ssh_host_ed25519_key")?)?;
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let fingerprint = ssh_keygen_fingerprint(&key_file)?;
    ensure!(
        printed[0].ends_with(fingerprint.trim()),
        "{} vs {fingerprint}",
        printed[0]
    );
    // The installer's SSH server answered with it too, the operator's pin.
    let made = printed[0].split_once("host key: ").map_or("", |(_, f)| f);
    ensure!(
        after_kexec.contains(&format!("never a password; host key {made}\n")),
        "the installer's SSH server had another host key than `{made}`"
    );
    let report = read_root_file(disk, "/var/log/nixos-kexec/report.json")?;
    ensure!(!report.contains(PASSPHRASE), "passphrase in report");

    // The extra files, on ext4 under `/`, read with debugfs.
    let at = |relative: &str| format!("/{relative}");
    check_extra_files(
        &out,
        "/",
        |relative| {
            let st = ext4_stat(&root, &at(relative))?;
            Ok((st.file_type, st.mode, st.uid, st.gid))
        },
        |relative| ext4_read_file(&root, &at(relative)),
        |relative| ext4_read_link(&root, &at(relative)),
    )?;
    e2fsck(&root)?;
    Ok(())
}

#[test]
fn large_runtime_info_travels_in_the_appended_cpio() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let mut keys = String::new();
    for i in 0..4 {
        let path = scratch.path().join(format!("k{i}"));
        ssh_keygen_new(&path, &["rsa", "-b", "4096"], &format!("rsa-key-{i}"))?;
        keys += &std::fs::read_to_string(path.with_extension("pub"))?;
    }
    // The operator's own host key (so secrets encrypted to it work at first boot).
    let host_key = scratch.path().join("ssh_host_ed25519_key");
    ssh_keygen_new(&host_key, &["ed25519"], "premade")?;
    let host_key_bytes = std::fs::read(&host_key)?;
    let rescue = rescue(
        &bundle,
        "--disk serial:TARGET-DISK --ssh-key-file /root/keys.pub --host-keys /root/hostkeys \
         --param stop_before=install --param after=poweroff",
        &[
            ("root/keys.pub", 0o644, keys.clone().into_bytes()),
            (
                "root/hostkeys/ssh_host_ed25519_key",
                0o600,
                host_key_bytes.clone(),
            ),
        ],
    )?;
    let out = rescue_vm(&bundle, &rescue.cpio).run()?;
    out.expect_success()?;
    ensure!(
        out.contains("it travels in the appended initrd archive"),
        "the cpio carrier was not used"
    );
    let root = extract_partition(&out.disks[1], 3)?;
    ensure!(
        ext4_read_file(&root, "/etc/ssh/ssh_host_ed25519_key")? == host_key_bytes,
        "the installed host key is not the operator's"
    );
    let fingerprint = ssh_keygen_fingerprint(&host_key)?;
    ensure!(
        out.lines_containing("nixos-kexec: host key: ")
            .filter(|l| l.ends_with(fingerprint.trim()))
            .count()
            == 2,
        "the operator's key fingerprint was not printed on both sides"
    );
    let configuration = read_root_file(&out.disks[1], "/etc/nixos/configuration.nix")?;
    for key in keys.lines() {
        ensure!(
            configuration.contains(key.trim()),
            "key {} missing",
            &key[..40.min(key.len())]
        );
    }
    Ok(())
}

/// Two namespaces of one NVMe controller share its serial, as namespaces of one drive do:
/// `run` names the chosen one by its namespace id (the kernel's `wwid`), which no other disk
/// shares, and the installer prepares that one and leaves its sibling alone. By serial, the
/// installer would have stopped at "ambiguous".
#[test]
fn nvme_namespaces_sharing_a_serial_are_told_apart() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let mut args = Vec::new();
    let mut images = Vec::new();
    for nsid in [1, 2] {
        let image = scratch.path().join(format!("ns{nsid}.img"));
        std::fs::File::create(&image)?.set_len(3 << 30)?;
        args.extend([
            "-drive".to_string(),
            format!("file={},if=none,id=ns{nsid},format=raw", image.display()),
            "-device".to_string(),
            format!("nvme-ns,drive=ns{nsid},bus=shared-nvme,nsid={nsid}"),
        ]);
        images.push(image);
    }
    args.splice(
        0..0,
        [
            "-device".to_string(),
            "nvme,id=shared-nvme,serial=SHARED-SERIAL".to_string(),
        ],
    );
    let rescue = rescue(
        &bundle,
        "--disk /dev/nvme0n2 --param stop_before=install --param after=poweroff",
        &[],
    )?;
    let out = rescue_vm(&bundle, &rescue.cpio).qemu_args(args).run()?;
    out.expect_success()?;
    let target = &images[1];
    sgdisk_verify(target)?;
    let info: Value = serde_json::from_str(&read_root_file(target, "/etc/nixos/runtime-info.json")?)?;
    let wwn = info["disk"]["wwn"].as_str().unwrap_or_default();
    ensure!(
        !wwn.is_empty() && info["disk"].get("serial").is_none(),
        "the disk did not travel by its namespace id: {info}"
    );
    ensure!(
        nonzero_blocks(&images[0])?.is_empty(),
        "the other namespace was written to"
    );
    Ok(())
}

/// Two disks alike in serial and size, and without a WWN: after the kexec the installer could
/// not tell which was chosen, so `run` refuses before anything is loaded, naming both.
#[test]
fn disks_alike_in_every_identity_are_refused_before_the_kexec() -> Result<()> {
    let bundle = dev_bundle()?;
    let rescue = rescue(&bundle, "--disk /dev/vdc --param after=poweroff", &[])?;
    let out = rescue_vm(&bundle, &rescue.cpio)
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("TWIN"))
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("TWIN"))
        .grace(std::time::Duration::from_secs(2))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("cannot be told apart") && reason.contains("/dev/vdc") && reason.contains("/dev/vdd"),
        "{reason}"
    );
    ensure!(!out.contains("starting as init"), "the installer was started");
    for twin in &out.disks[2..] {
        ensure!(
            nonzero_blocks(twin)?.is_empty(),
            "{} was written to",
            twin.display()
        );
    }
    Ok(())
}

/// A UEFI rescue system (OVMF) kexecs into the installer: the installer must still see UEFI
/// (the kexec passes the EFI state on), or it would plan a BIOS boot for a UEFI machine. The
/// installed configuration picks the UEFI boot loader and the report says `uefi`.
///
/// The same run installs btrfs-impermanence with `--extra-files` (one VM for both: the suite's
/// time counts): with `/` a tmpfs, the tree lands under /persist with its modes, owners and
/// link, and the operator's machine-id replaces the one the installer wrote there.
#[test]
fn kexec_from_a_uefi_rescue_system_stays_uefi() -> Result<()> {
    let bundle = dev_bundle()?;
    let rescue = rescue(
        &bundle,
        "--disk serial:TARGET-DISK --param layout=btrfs-impermanence --extra-files /root/extra \
         --param stop_before=install --param after=poweroff",
        &[],
    )?;
    let extra = extra_files_cpio(rescue.dir.path())?;
    let out = rescue_vm(&bundle, &rescue.cpio)
        .extra_initrd(&extra)
        .firmware(Firmware::Uefi)
        .run()?;
    out.expect_success()?;
    ensure!(
        out.contains("EFI stub"),
        "the rescue kernel did not start through its EFI stub"
    );
    let root = extract_partition(&out.disks[1], 3)?;
    btrfs_check(&root)?;
    let persist = rescue.dir.path().join("persist");
    btrfs_restore(&root, "@persist", &persist)?;
    let read = |relative: &str| -> Result<Vec<u8>> {
        let path = persist.join(relative);
        std::fs::read(&path).with_context(|| format!("reading {} from @persist", path.display()))
    };
    let report: Value = serde_json::from_slice(&read("var/log/nixos-kexec/report.json")?)?;
    ensure!(
        report["firmware"] == "uefi",
        "the installer lost UEFI across the kexec: {report}"
    );
    let hardware = String::from_utf8(read("etc/nixos/hardware-configuration.nix")?)?;
    ensure!(
        hardware.contains("firmware = \"uefi\"") && hardware.contains("systemd-boot"),
        "no UEFI boot loader in the hardware configuration:\n{hardware}"
    );

    ensure!(
        out.contains("the installer will copy the extra files to /persist on the target"),
        "run did not say where the extra files land"
    );
    check_extra_files(
        &out,
        "/persist",
        |relative| {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::symlink_metadata(persist.join(relative))?;
            let kind = if meta.is_dir() {
                "directory"
            } else if meta.file_type().is_symlink() {
                "symlink"
            } else {
                "regular"
            };
            Ok((kind.to_string(), meta.mode() & 0o7777, meta.uid(), meta.gid()))
        },
        read,
        |relative| Ok(std::fs::read_link(persist.join(relative))?.display().to_string()),
    )?;
    ensure!(
        out.contains("they replaced what the installer wrote at /persist/etc/machine-id"),
        "the console does not say the operator's machine-id replaced the installer's"
    );
    Ok(())
}
