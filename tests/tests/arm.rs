//! aarch64, end to end in `qemu-system-aarch64 -machine virt` (Cortex-A57, TCG) under AAVMF,
//! with the bundle `kexec-bundle/build-dev --arch aarch64` makes from Debian's arm64 kernel and
//! tools and the agent cross-built for aarch64-unknown-linux-musl. Two scenarios cover what
//! differs from x86_64: a rescue system kexecs the `Image` (with the agent's own kexec_load:
//! Debian's arm64 kernel has no kexec_file_load), the
//! installer restores the network by MAC and encrypts the disk (luks-ext4); and GRUB's arm64
//! EFI build boots the installer from lines typed at `grub>` (btrfs). Both plan an ESP and no
//! BIOS boot partition, and write `aarch64-linux`, systemd-boot and the PL011 console
//! (ttyAMA0) into the configuration. The disks are checked from outside: sgdisk, fsck.fat,
//! btrfs check and restore, cryptsetup, and an x86_64 guest that opens the LUKS container.
//!
//! cargo test -p nixos-kexec-tests --test arm -- --nocapture

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::rescue::{rescue_cpio, rescue_vm, LAN_MAC, WAN_MAC};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const PASSPHRASE: &str = "Arm-Disk-Passphrase-5521";
const GIB: u64 = 1 << 30;
const OPERATOR_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
/// GPT partition types as sfdisk prints them.
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// The table of an aarch64 preset: the ESP first and the root after it, nothing for a BIOS.
fn check_uefi_only_table(disk: &Path) -> Result<()> {
    sgdisk_verify(disk)?;
    let types: Vec<String> = partitions(disk)?
        .into_iter()
        .map(|(_, _, _, entry)| entry["type"].as_str().unwrap_or_default().to_uppercase())
        .collect();
    ensure!(
        types == [TYPE_ESP, TYPE_LINUX],
        "partition types {types:?}: expected the ESP and the root only (no BIOS boot partition on ARM)"
    );
    fsck_fat(&extract_partition(disk, 1)?)?;
    Ok(())
}

/// What the configuration says about the machine: aarch64-linux, UEFI with systemd-boot, the
/// PL011 serial console.
fn check_arm_configuration(hardware: &str) -> Result<()> {
    for needle in [
        "nixpkgs.hostPlatform = lib.mkDefault \"aarch64-linux\";",
        "firmware = \"uefi\";",
        "boot.loader.systemd-boot.enable = firmware == \"uefi\";",
        "\"console=ttyAMA0,115200\"",
    ] {
        ensure!(
            hardware.contains(needle),
            "hardware-configuration.nix lacks {needle}:\n{hardware}"
        );
    }
    ensure!(
        !hardware.contains("grub.extraConfig"),
        "GRUB serial lines for an x86 UART:\n{hardware}"
    );
    Ok(())
}

/// A rescue system on arm64 (UEFI, the kernel started through its EFI stub) with a Hetzner-like
/// static network on renamed NICs runs `nixos-kexec run`, which kexecs the bundle's `Image`;
/// the installer brings the same addresses up on the NICs with the same MACs and prepares the
/// disk chosen by serial with luks-ext4, the passphrase from `--disk-key-file`.
#[test]
fn aarch64_rescue_kexec_luks_ext4_with_network_by_mac() -> Result<()> {
    let bundle = dev_bundle_aarch64()?;
    let dir = tempfile::tempdir()?;
    let cpio = rescue_cpio(
        &bundle,
        dir.path(),
        "--disk serial:TARGET-DISK --hostname arm1 --param layout=luks-ext4 \
         --disk-key-file /root/disk-passphrase --param stop_before=install --param after=poweroff",
        OPERATOR_KEY,
        &[("root/disk-passphrase", 0o600, PASSPHRASE.as_bytes().to_vec())],
    )?;
    // Debian's arm64 kernel, which the rescue system runs, has no kexec_file_load
    // (CONFIG_KEXEC_FILE is off): `run` loads the installer with kexec_load itself. The rescue
    // system has no kexec-tools.
    let out = rescue_vm(&bundle, &cpio)
        .timeout(Duration::from_secs(600))
        .run()?;
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the installer should have powered off");
    let (rescue_part, after_kexec) = out
        .log
        .split_once("nixos-kexec: nixos-kexec 0.1.0 starting as init")
        .context("the installer never started")?;
    ensure!(
        rescue_part.contains("EFI stub: Booting Linux Kernel"),
        "the rescue kernel did not start through AAVMF and its EFI stub"
    );
    ensure!(
        rescue_part.contains("rescue: running nixos-kexec run"),
        "the installer started before the rescue system ran nixos-kexec run"
    );
    ensure!(
        rescue_part.contains("this kernel has no kexec_file_load")
            && rescue_part.contains("Loading it with kexec_load instead."),
        "the rescue system did not fall back to the agent's own kexec_load"
    );
    ensure!(
        !rescue_part.contains("trying a kexec binary"),
        "the agent's kexec_load failed and it looked for kexec-tools"
    );
    ensure!(
        !after_kexec.contains("EFI stub: Booting Linux Kernel"),
        "the installer kernel came through the firmware, not kexec"
    );
    ensure!(
        !out.log.contains(PASSPHRASE),
        "the passphrase appeared on the console"
    );
    // The installer's view after its network step: the rescue system's addresses on the NICs
    // with the same MACs (the rescue system had renamed them wan0 and lan0).
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
    ensure!(
        after_kexec.contains("nixos-kexec: firmware Uefi"),
        "the installer lost UEFI across the kexec"
    );

    let disk = &out.disks[1];
    check_uefi_only_table(disk)?;
    let luks = extract_partition(disk, 2)?;
    let dump = luks_dump(&luks)?;
    ensure!(
        dump.lines()
            .any(|l| l.starts_with("Version:") && l.trim_end().ends_with('2')),
        "not LUKS2:\n{dump}"
    );
    ensure!(
        luks_test_passphrase(&luks, PASSPHRASE.as_bytes())?,
        "the passphrase does not open the container"
    );
    ensure!(
        count_in_image(disk, PASSPHRASE.as_bytes())? == 0,
        "the passphrase is in plain bytes on the disk"
    );

    // Inside the container, from an x86_64 guest: nothing of the installer's runs there.
    let guest = guest_shell(
        &[(disk.as_path(), 512)],
        &[("pass", 0o600, PASSPHRASE.as_bytes())],
        r#"cryptsetup open --key-file /pass /dev/vda2 t
e2fsck -fn /dev/mapper/t
mkdir -p /m
mount -o ro /dev/mapper/t /m
for f in flake.nix configuration.nix hardware-configuration.nix network.nix initrd-ssh.nix; do
    echo "=== $f ==="; cat /m/etc/nixos/$f; echo "=== end $f ==="
done
echo '=== report ==='; cat /m/var/log/nixos-kexec/report.json; echo '=== end report ==='
umount /m
cryptsetup close t
"#,
    )?;
    for file in [
        "flake.nix",
        "configuration.nix",
        "hardware-configuration.nix",
        "network.nix",
        "initrd-ssh.nix",
    ] {
        nix_parse_str(section(&guest, file)?).with_context(|| format!("parsing {file}"))?;
    }
    check_arm_configuration(section(&guest, "hardware-configuration.nix")?)?;
    let network = section(&guest, "network.nix")?;
    for expected in [
        &format!("MACAddress = \"{WAN_MAC}\""),
        &format!("MACAddress = \"{LAN_MAC}\""),
        "\"203.0.113.10/32\"",
        "Gateway = \"172.31.1.1\"",
        "GatewayOnLink = true",
    ] {
        ensure!(
            network.contains(expected),
            "network.nix lacks {expected}:\n{network}"
        );
    }
    let report: Value = serde_json::from_str(section(&guest, "report")?)?;
    ensure!(report["result"] == "success", "report: {report}");
    ensure!(report["firmware"] == "uefi", "report: {report}");
    eprintln!(
        "arm rescue: result after {:.1}s, VM ended after {:.1}s",
        out.time_to_result.unwrap_or_default().as_secs_f64(),
        out.duration.as_secs_f64()
    );
    Ok(())
}

/// GRUB's arm64 EFI build, started by AAVMF from a grub-mkrescue ISO, stops at `grub>`; the
/// test types the `linux /Image ...`, `initrd` and `boot` lines with the installer's short
/// parameters, and the installer prepares the disk with btrfs.
#[test]
fn aarch64_grub_console_installs_btrfs() -> Result<()> {
    let bundle = dev_bundle_aarch64()?;
    let scratch = tempfile::tempdir()?;
    let iso = grub_console_iso(&bundle, scratch.path())?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let linux = format!(
        "linux /Image console=ttyAMA0 panic=-1 loglevel=4 nixos_kexec.disk=/dev/vda nixos_kexec.layout=btrfs nixos_kexec.hostname=armgrub nixos_kexec.ssh_key={} nixos_kexec.stop_before=install nixos_kexec.after=poweroff",
        OPERATOR_KEY.replace(' ', "+")
    );
    let vm = Vm::new(&bundle)
        .nic("52:54:00:12:34:a8")
        .disk_image(&target, DiskBus::Virtio, 512, "ARM-GRUB")
        .timeout(Duration::from_secs(600));
    let out = boot_grub_console(vm, &iso, linux)?;
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the installer should have powered off");
    ensure!(
        out.contains("got the DHCP lease 10.0.2.15/24"),
        "no DHCP lease in the installer"
    );

    check_uefi_only_table(&target)?;
    let root = extract_partition(&target, 2)?;
    btrfs_check(&root)?;
    let subvolumes: Vec<String> = btrfs_subvolumes(&root)?
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    for name in ["@", "@nix", "@home", "@log"] {
        ensure!(
            subvolumes.iter().any(|s| s == name),
            "no subvolume {name}: {subvolumes:?}"
        );
    }
    let files = scratch.path().join("root");
    btrfs_restore(&root, "@", &files)?;
    let read = |relative: &str| -> Result<String> {
        let path = files.join(relative);
        std::fs::read_to_string(&path).with_context(|| format!("reading {} from @", path.display()))
    };
    for file in ["flake.nix", "configuration.nix", "hardware-configuration.nix"] {
        nix_parse(&files.join("etc/nixos").join(file))?;
    }
    let hardware = read("etc/nixos/hardware-configuration.nix")?;
    check_arm_configuration(&hardware)?;
    ensure!(
        hardware.contains("fsType = \"btrfs\";") && hardware.contains("\"subvol=@\""),
        "no btrfs root in the configuration:\n{hardware}"
    );
    let configuration = read("etc/nixos/configuration.nix")?;
    ensure!(
        configuration.contains(OPERATOR_KEY) && configuration.contains("networking.hostName = \"armgrub\""),
        "{configuration}"
    );
    eprintln!(
        "arm grub: result after {:.1}s (firmware and typing included), VM ended after {:.1}s",
        out.time_to_result.unwrap_or_default().as_secs_f64(),
        out.duration.as_secs_f64()
    );
    Ok(())
}
