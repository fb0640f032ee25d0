//! Boot scenarios of the installer core: a real kernel boots the dev bundle in QEMU, the agent
//! reads its instructions from the kernel command line and prepares the disk; the results are
//! checked from outside with sgdisk/sfdisk, fsck.fat, e2fsck, debugfs, blkid, ssh-keygen and
//! nix-instantiate.
//!
//! The dev bundle carries no Nix, so these stop before `install` (nixos_kexec.stop_before); the
//! install step itself, with a test double for nixos-install, is in `boot.rs`.

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::Path;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn key_param() -> String {
    format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+"))
}

/// Parameters every preparing scenario uses: stop before the Nix install, power off after.
fn prepare_params(vm: Vm) -> Vm {
    vm.param(key_param())
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
}

/// Everything a prepared disk must satisfy, checked by tools we did not write.
fn check_prepared(out: &RunOutcome, disk: &Path, firmware: &str, hostname: &str) -> Result<Value> {
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the VM should have powered off by itself");
    sgdisk_verify(disk)?;
    let parts = partitions(disk)?;
    let layout: Vec<(u32, u64, u64)> = parts.iter().map(|(n, s, l, _)| (*n, *s, *l)).collect();
    ensure!(layout.len() == 3, "expected 3 partitions, got {layout:?}");
    ensure!(layout[0] == (1, MIB, MIB), "BIOS boot partition: {:?}", layout[0]);
    ensure!(layout[1] == (2, 2 * MIB, 512 * MIB), "ESP: {:?}", layout[1]);
    ensure!(
        layout[2].1 == 514 * MIB && layout[2].2.is_multiple_of(MIB),
        "root: {:?}",
        layout[2]
    );
    let types: Vec<String> = parts
        .iter()
        .map(|p| p.3["type"].as_str().unwrap_or("").to_uppercase())
        .collect();
    ensure!(
        types
            == [
                "21686148-6449-6E6F-744E-656564454649",
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
            ],
        "partition types {types:?}"
    );

    let esp = extract_partition(disk, 2)?;
    fsck_fat(&esp)?;
    let root = extract_partition(disk, 3)?;
    e2fsck(&root)?;
    let esp_id = blkid(&esp)?;
    let root_id = blkid(&root)?;
    ensure!(
        esp_id.get("TYPE").map(String::as_str) == Some("vfat"),
        "ESP blkid {esp_id:?}"
    );
    ensure!(
        root_id.get("TYPE").map(String::as_str) == Some("ext4"),
        "root blkid {root_id:?}"
    );

    let read = |path: &str| -> Result<String> { Ok(String::from_utf8(ext4_read_file(&root, path)?)?) };
    let flake = read("/etc/nixos/flake.nix")?;
    let configuration = read("/etc/nixos/configuration.nix")?;
    let hardware = read("/etc/nixos/hardware-configuration.nix")?;
    for (name, text) in [
        ("flake.nix", &flake),
        ("configuration.nix", &configuration),
        ("hardware-configuration.nix", &hardware),
    ] {
        nix_parse_str(text).with_context(|| format!("parsing the generated {name}"))?;
    }
    ensure!(
        flake.contains(&format!("nixosConfigurations.\"{hostname}\"")),
        "flake.nix:\n{flake}"
    );
    ensure!(
        hardware.contains(&format!("firmware = \"{firmware}\"")),
        "hardware-configuration.nix:\n{hardware}"
    );
    ensure!(
        configuration.contains(KEY),
        "authorized key missing:\n{configuration}"
    );
    ensure!(
        configuration.contains(&format!("networking.hostName = \"{hostname}\"")),
        "{configuration}"
    );
    for id in [&esp_id, &root_id] {
        let uuid = id.get("UUID").context("no UUID from blkid")?;
        ensure!(
            hardware.contains(&format!("/dev/disk/by-uuid/{uuid}")),
            "UUID {uuid} not in hardware-configuration.nix:\n{hardware}"
        );
    }
    ensure!(
        hardware.contains("virtio_pci") || hardware.contains("nvme"),
        "no disk driver in initrd modules:\n{hardware}"
    );
    // Every scenario is an x86_64 QEMU guest (DMI says QEMU) booted with console=ttyS0.
    for needle in [
        "(modulesPath + \"/profiles/qemu-guest.nix\")",
        "nixpkgs.hostPlatform = lib.mkDefault \"x86_64-linux\";",
    ] {
        ensure!(hardware.contains(needle), "no {needle} in:\n{hardware}");
    }
    ensure!(
        !hardware.contains("updateMicrocode"),
        "microcode in a VM:\n{hardware}"
    );
    for needle in [
        "boot.kernelParams = [ \"console=tty0\" \"console=ttyS0,115200\" ];",
        "serial --unit=0 --speed=115200",
    ] {
        ensure!(hardware.contains(needle), "no {needle} in:\n{hardware}");
    }
    let info: Value = serde_json::from_str(&read("/etc/nixos/runtime-info.json")?)?;
    ensure!(info["version"] == 1, "runtime-info.json: {info}");

    let key_stat = ext4_stat(&root, "/etc/ssh/ssh_host_ed25519_key")?;
    ensure!(
        key_stat.mode & 0o777 == 0o600,
        "host key mode {:o}",
        key_stat.mode
    );
    let key_file = out.dir.join("host_key");
    std::fs::write(&key_file, ext4_read_file(&root, "/etc/ssh/ssh_host_ed25519_key")?)?;
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let fingerprint = ssh_keygen_fingerprint(&key_file)?;
    ensure!(
        out.contains(&format!("host key: {}", fingerprint.trim())),
        "fingerprint `{}` not printed on the console",
        fingerprint.trim()
    );
    // Booted without a host key: the installer's SSH server made the one the system got.
    ensure!(
        out.contains(&format!("never a password; host key {}\n", fingerprint.trim())),
        "the installer's SSH server had another host key than the installed `{}`:\n{}",
        fingerprint.trim(),
        out.tail(60)
    );

    let report: Value = serde_json::from_str(&read("/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["result"] == "success", "report: {report}");
    ensure!(report["stopped_before"] == "install", "report: {report}");
    let log = read("/var/log/nixos-kexec/install.log")?;
    ensure!(
        log.contains("partition done in"),
        "install.log lacks step lines:\n{log}"
    );
    Ok(report)
}

#[test]
fn bios_virtio_512_in_256_mib() -> Result<()> {
    let bundle = dev_bundle()?;
    let out = prepare_params(Vm::new(&bundle))
        .memory_mib(256)
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("SYSDISK1"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.hostname=web1")
        .run()?;
    check_prepared(&out, &out.disks[0], "bios", "web1")?;
    Ok(())
}

#[test]
fn uefi_nvme_4096_chosen_by_id() -> Result<()> {
    let bundle = dev_bundle()?;
    let out = prepare_params(Vm::new(&bundle))
        .firmware(Firmware::Uefi)
        .disk(
            DiskSpec::new(4 * GIB, DiskBus::Nvme)
                .sector(4096)
                .serial("NV4K0001"),
        )
        .param("nixos_kexec.disk=/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_NV4K0001")
        .run()?;
    ensure!(
        gpt_sector_size(&out.disks[0])? == Some(4096),
        "the GPT was not written with 4096-byte sectors"
    );
    let report = check_prepared(&out, &out.disks[0], "uefi", "nixos")?;
    ensure!(report["disk"]["logical_sector"] == 4096, "report: {report}");
    Ok(())
}

#[test]
fn two_disks_target_by_serial_other_untouched() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let other = used_disk(scratch.path(), "other.img", 3 * GIB)?;
    let before = sparse_digest(&other)?;
    let info = serde_json::json!({
        "version": 1,
        "hostname": "db1",
        "disk": {"serial": "TARGET02", "size_bytes": 3 * GIB},
        "ssh_authorized_keys": [KEY],
    });
    let encoded = base64_std(info.to_string().as_bytes());
    let out = Vm::new(&bundle)
        .disk_image(&other, DiskBus::Virtio, 512, "OTHER001")
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("TARGET02"))
        .param(format!("nixos_kexec.info={encoded}"))
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
        .run()?;
    check_prepared(&out, &out.disks[1], "bios", "db1")?;
    ensure!(
        sparse_digest(&other)? == before,
        "the disk that was not chosen changed"
    );
    Ok(())
}

/// Bad input stops the run with one clear error, before any disk is touched, and the machine
/// stays up for the way back's grace period: one VM for the class (invalid runtime info, with a disk named). What each bad input
/// says (this one, an unknown parameter, an absent disk) is checked in agent/tests/refusals.rs.
#[test]
fn bad_input_touches_no_disk() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let before = sparse_digest(&disk)?;
    let out = Vm::new(&bundle)
        .name("bad_base64")
        .disk_image(&disk, DiskBus::Virtio, 512, "VICTIM01")
        .param("nixos_kexec.info=%%%not-base64%%%")
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.after=poweroff")
        .grace(std::time::Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("not valid base64"),
        "reason `{reason}` lacks `not valid base64`"
    );
    ensure!(out.contains("nixos-kexec: fix: "), "no fix was printed");
    ensure!(
        !out.exited_by_itself,
        "a failed run must not power off, nor reboot before its grace period"
    );
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    Ok(())
}

/// The way back: a refusal before the wipe (no disk named) reboots once the grace period is
/// over, so a kexec'd machine returns to the system it came from. Under `-no-reboot` QEMU exits
/// by itself, and the disk is as it was.
#[test]
fn a_refusal_before_the_wipe_reboots_after_the_grace_period() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let before = sparse_digest(&disk)?;
    let out = Vm::new(&bundle)
        .disk_image(&disk, DiskBus::Virtio, 512, "WAYBACK1")
        .param(key_param())
        .param("nixos_kexec.failure_reboot_after=5s")
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(reason.contains("No target disk was chosen"), "{reason}");
    ensure!(
        out.contains("nixos-kexec: reboot: no disk was written, so this machine reboots in 5 s")
            && out.contains("failure_reboot_after=never"),
        "the reboot is not announced:\n{}",
        out.tail(10)
    );
    ensure!(out.contains("nixos-kexec: reboot: now"), "{}", out.tail(10));
    ensure!(out.exited_by_itself, "QEMU should have exited at the reboot");
    let waited = out.duration - out.time_to_result.context("no result line")?;
    ensure!(
        waited >= std::time::Duration::from_secs(5),
        "rebooted {waited:?} after the result line, before the grace period was over"
    );
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    Ok(())
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "disk.img", 5 * GIB)?;
    let before = sparse_digest(&disk)?;
    let out = Vm::new(&bundle)
        .disk_image(&disk, DiskBus::Virtio, 512, "DRYRUN01")
        .param("nixos_kexec.disk=serial:DRYRUN01")
        .param("nixos_kexec.dry_run")
        .param("nixos_kexec.after=poweroff")
        .run()?;
    out.expect_success()?;
    let json = out
        .lines_containing("nixos-kexec: plan-json: ")
        .next()
        .and_then(|l| l.split_once("plan-json: "))
        .map(|(_, j)| j.to_string())
        .context("no plan-json line")?;
    let plan: Value = serde_json::from_str(&json)?;
    ensure!(plan["disk"]["dev_path"] == "/dev/vda", "plan: {plan}");
    ensure!(
        plan["partitions"].as_array().map(Vec::len) == Some(3),
        "plan: {plan}"
    );
    ensure!(plan["partitions"][2]["start_bytes"] == 514 * MIB, "plan: {plan}");
    ensure!(sparse_digest(&disk)? == before, "a dry run changed the disk");
    Ok(())
}

/// Without Nix in the bundle and without stop_before, the run fails plainly, keeps its log and
/// report on the target, and does not reboot.
#[test]
fn missing_nixos_install_fails_without_reboot() -> Result<()> {
    let bundle = dev_bundle()?;
    let out = Vm::new(&bundle)
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("NONIX001"))
        .param("nixos_kexec.disk=/dev/vda")
        .param(key_param())
        .grace(std::time::Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("nixos-install is not in this installer bundle"),
        "{reason}"
    );
    ensure!(
        reason.contains("stop_before=install"),
        "the fix is not named: {reason}"
    );
    ensure!(!out.exited_by_itself, "a failed install must not reboot");
    ensure!(
        out.contains("nixos-kexec: no reboot: /dev/vda may be half-written"),
        "the console does not say why it stays:\n{}",
        out.tail(10)
    );
    let root = extract_partition(&out.disks[0], 3)?;
    let report: Value = serde_json::from_slice(&ext4_read_file(&root, "/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["result"] == "failure", "report: {report}");
    let log = String::from_utf8(ext4_read_file(&root, "/var/log/nixos-kexec/install.log")?)?;
    ensure!(
        log.contains("nixos-install is not in this installer bundle"),
        "{log}"
    );
    Ok(())
}

fn base64_std(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}
