//! The last mile: after the install, the disk boots. Each scenario installs in one VM and then
//! boots the same disk in a second VM from the firmware alone (no `-kernel`), until the boot
//! loader's menu is on the serial console.
//!
//! TEST DOUBLE: `nixos-install` is `tests/stand-in/nixos-install` (appended by the harness as
//! `boot-stand-in.cpio.gz`, which `kexec-bundle/build-dev --with-nix` makes). It stands for the
//! one boundary this machine cannot cross, a NixOS closure from nixpkgs: the real Nix of the
//! bundle (Debian's nix-bin) builds a stand-in system (a busybox derivation) in its sandbox into
//! the target's store and sets the system profile to it, and that system's
//! switch-to-configuration runs Debian's boot-loader tools. Everything around it is real: the
//! nixos-enter-style chroot with the installer's /dev and /sys, Debian's grub-install onto
//! exactly the `bootDisk` the generated configuration.nix names, Debian's bootctl writing
//! systemd-boot and a Boot#### entry through the installer's efivarfs, the agent's post-install
//! verification, and SeaBIOS/OVMF booting the disk afterwards.

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::nix_cache::{
    nix_command, nix_left_nothing_in_ram, root_store, system_profile, verify_store,
};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
const GIB: u64 = 1 << 30;
const PASSPHRASE: &str = "correct horse battery staple";

fn key_param() -> String {
    format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+"))
}

/// An install VM: the stand-in appended, a NIC (the install step needs a default route), an
/// SSH key, power off when done.
fn installer(bundle: &Bundle, name: &str) -> Result<Vm> {
    Ok(Vm::new(bundle)
        .name(name)
        .extra_initrd(bundle.stand_in()?)
        .nic("52:54:00:12:34:70")
        .param(key_param())
        .param("nixos_kexec.after=poweroff")
        .timeout(Duration::from_secs(420)))
}

/// The install succeeded, every verification passed, and the machine powered off by itself.
fn installed(out: &RunOutcome, checks: &[&str]) -> Result<()> {
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the VM should have powered off by itself");
    for check in checks {
        ensure!(
            out.contains(&format!("verify: ok {check}: ")),
            "verification `{check}` did not pass:\n{}",
            out.tail(40)
        );
    }
    ensure!(!out.contains("verify: FAILED"), "a verification failed");
    ensure!(
        out.contains("stand-in: configuration says firmware="),
        "the stand-in did not read the generated configuration"
    );
    Ok(())
}

/// What the installer's real Nix did, checked with the host's Nix on partition `part` of `disk`
/// (the target's root, a copy mounted): it built the stand-in system in its sandbox (PID 1 in its
/// own PID namespace, a nixbld build user mapped to uid 1000 in its own user namespace, a root
/// of its own with the /bin/sh of extra-sandbox-paths), registered it in the target's store with
/// contents that match, and nix-env set the system profile to it. Nothing of it stayed in the
/// installer's RAM.
fn installed_by_real_nix(out: &RunOutcome, disk: &Path, part: u32) -> Result<()> {
    const SANDBOX: &str = "stand-in build in Nix's sandbox: pid 1, uid 1000 (nixbld), uid_map 1000 30001 1, / holds bin build dev etc nix proc tmp";
    ensure!(
        out.contains(&format!("install: build log: {SANDBOX}")),
        "the stand-in system was not built in Nix's sandbox by a build user:\n{}",
        out.tail(40)
    );
    let mounted = LoopMount::new(&extract_partition(disk, part)?)?;
    let root = mounted.path();
    let system = system_profile(root)?;
    ensure!(
        system.as_str().ends_with("-nixos-system-web1-stand-in"),
        "the system profile leads to {system}"
    );
    ensure!(
        out.contains(&format!("install: stand-in: system profile set to {system}")),
        "nix-env did not set the profile to {system}"
    );
    verify_store(root)?;
    let query = |args: &[&str]| -> Result<String> {
        let store = root_store(root);
        Ok(run_tool(nix_command("nix-store").args(["--store", &store]).args(args))?.stdout_str())
    };
    let hash = query(&["-q", "--hash", system.as_str()])?;
    ensure!(
        hash.starts_with("sha256:"),
        "{system} is not registered: {hash:?}"
    );
    let log = query(&["--read-log", system.as_str()])?;
    ensure!(
        log.contains(SANDBOX),
        "the build log in the target's store: {log}"
    );
    let closure = query(&["-qR", system.as_str()])?;
    ensure!(
        closure.lines().count() == 2 && closure.contains("-stand-in-builder"),
        "the system's closure should be itself and its builder:\n{closure}"
    );
    nix_left_nothing_in_ram(out)?;
    Ok(())
}

/// Boots `disk` with the firmware alone and waits for every one of `expected` on the console.
fn boot_installed_disk(
    bundle: &Bundle,
    name: &str,
    install: &RunOutcome,
    firmware: Firmware,
    expected: &[&str],
) -> Result<String> {
    let disk = install.attached.first().context("the install VM had no disk")?;
    let mut vm = Vm::new(bundle)
        .name(&format!("{name}-boot"))
        .firmware(firmware)
        .disk_image(&disk.path, disk.bus, disk.logical_sector, &disk.serial)
        .boot_from_disk()
        .timeout(Duration::from_secs(180));
    if let Some(vars) = &install.uefi_vars {
        // The same NVRAM: the Boot#### entry bootctl wrote during the install.
        vm = vm.uefi_vars(vars);
    }
    let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    let out = vm.run_with(move |console| {
        for text in &expected {
            console.wait_for(text, Duration::from_secs(150))?;
        }
        Ok(())
    })?;
    ensure!(
        !out.contains("nixos-kexec"),
        "the installer booted again instead of the installed disk"
    );
    Ok(out.log)
}

/// The report on an ext4 root (partition `part`) lists the verification.
fn report_lists_verification(disk: &Path, part: u32, names: &[&str]) -> Result<Value> {
    let root = extract_partition(disk, part)?;
    e2fsck(&root)?;
    let report: Value = serde_json::from_slice(&ext4_read_file(&root, "/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["result"] == "success", "report: {report}");
    let checks = report["verification"]
        .as_array()
        .context("no verification in the report")?;
    for name in names {
        ensure!(
            checks.iter().any(|c| c["name"] == *name && c["ok"] == true),
            "report lacks a passed `{name}`: {report}"
        );
    }
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    ensure!(
        steps
            == [
                "wipe",
                "partition",
                "format",
                "mount",
                "keys",
                "flake",
                "install",
                "verify",
                "finish"
            ],
        "steps {steps:?}"
    );
    Ok(report)
}

const GRUB_MENU: &str = "NixOS - Default";
const BIOS_GPT_CHECKS: [&str; 5] = [
    "system profile",
    "host keys",
    "host flake",
    "GRUB boot code in the MBR",
    "GRUB core.img in the BIOS boot partition",
];

#[test]
fn bios_virtio_grub_boots() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let out = installer(&bundle, "bios_virtio")?
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("BOOTVIRT1"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.hostname=web1")
        .run()?;
    installed(&out, &BIOS_GPT_CHECKS)?;
    ensure!(
        out.contains("install: stand-in nixos-install called with: --root /mnt --flake /mnt/etc/nixos#web1 --no-root-passwd"),
        "nixos-install was not called as expected"
    );
    ensure!(
        out.contains("grub device=/dev/disk/by-id/virtio-BOOTVIRT1"),
        "the configuration did not name the disk by id"
    );
    ensure!(
        out.contains("root moved from the initramfs to a tmpfs"),
        "the root was not moved"
    );
    let report = report_lists_verification(&out.disks[0], 3, &BIOS_GPT_CHECKS)?;
    ensure!(report["stopped_before"].is_null(), "report: {report}");
    let root = extract_partition(&out.disks[0], 3)?;
    let log = String::from_utf8(ext4_read_file(&root, "/var/log/nixos-kexec/install.log")?)?;
    ensure!(
        log.contains("building the flake in"),
        "install.log lacks the install's streamed output:\n{log}"
    );
    installed_by_real_nix(&out, &out.disks[0], 3)?;
    // 1 GiB of RAM and no swap in the layout: nixos-install ran with a swap file on the target's
    // root (the stand-in printed /proc/swaps), which is gone from the disk afterwards.
    let swap_file = "/mnt/.nixos-kexec-swap";
    ensure!(
        out.lines_containing("swap file on: ")
            .any(|l| l.contains(&format!(" MiB at {swap_file} (ext4) for the install"))),
        "no swap file was announced:\n{}",
        out.tail(60)
    );
    let swapping = out
        .log
        .lines()
        .position(|l| l.contains(&format!("install: swaps: {swap_file} ")) && l.contains("file"))
        .context("the stand-in nixos-install did not see the swap file in /proc/swaps")?;
    let removed = out
        .log
        .lines()
        .position(|l| l.contains(&format!("swap file off and removed: {swap_file}")))
        .context("the swap file was not removed")?;
    ensure!(swapping < removed, "the swap file went before nixos-install ran");
    ensure!(
        !ext4_ls(&root, "/")?
            .iter()
            .any(|name| name == ".nixos-kexec-swap"),
        "the swap file is still on the disk"
    );
    boot_installed_disk(&bundle, "bios_virtio", &out, Firmware::Bios, &[GRUB_MENU])?;
    Ok(())
}

#[test]
fn bios_mbr_table_grub_boots() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let out = installer(&bundle, "bios_mbr")?
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("BOOTMBR1"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.table=mbr")
        .run()?;
    installed(
        &out,
        &["GRUB boot code in the MBR", "GRUB core.img after the MBR"],
    )?;
    boot_installed_disk(&bundle, "bios_mbr", &out, Firmware::Bios, &[GRUB_MENU])?;
    Ok(())
}

#[test]
fn bios_sata_chosen_by_id_grub_boots() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let out = installer(&bundle, "bios_sata")?
        .disk(DiskSpec::new(3 * GIB, DiskBus::Sata).serial("SATABOOT01"))
        .param("nixos_kexec.disk=/dev/disk/by-id/ata-QEMU_HARDDISK_SATABOOT01")
        .run()?;
    installed(&out, &BIOS_GPT_CHECKS)?;
    ensure!(
        out.contains("grub device=/dev/disk/by-id/ata-QEMU_HARDDISK_SATABOOT01"),
        "the configuration did not name the SATA disk by udev's id"
    );
    boot_installed_disk(&bundle, "bios_sata", &out, Firmware::Bios, &[GRUB_MENU])?;
    Ok(())
}

#[test]
fn uefi_nvme_4096_systemd_boot_boots() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let out = installer(&bundle, "uefi_nvme")?
        .firmware(Firmware::Uefi)
        .disk(
            DiskSpec::new(4 * GIB, DiskBus::Nvme)
                .sector(4096)
                .serial("NVBOOT4K"),
        )
        .param("nixos_kexec.disk=/dev/nvme0n1")
        .run()?;
    installed(
        &out,
        &[
            "system profile",
            "host keys",
            "host flake",
            "EFI boot entry for a loader on the ESP",
        ],
    )?;
    ensure!(
        out.contains("verify: ok EFI boot entry for a loader on the ESP: Boot")
            && out.contains(r"\EFI\systemd\systemd-bootx64.efi"),
        "bootctl's entry was not verified:
{}",
        out.tail(30)
    );
    // OVMF boots bootctl's entry, and systemd-boot shows NixOS's menu entry.
    boot_installed_disk(
        &bundle,
        "uefi_nvme",
        &out,
        Firmware::Uefi,
        &["Linux Boot Manager", "NixOS"],
    )?;
    Ok(())
}

/// Encrypted root on QEMU's default CPU, which has no AES-NI: dm-crypt's aes-xts needs the
/// generic ecb and xts modules, which only on-demand module loading brings in.
#[test]
fn luks_btrfs_on_default_cpu_boots() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let scratch = tempfile::tempdir()?;
    let secrets = scratch.path().join("secrets.cpio");
    Cpio::new()
        .file("etc/nixos-kexec/secrets/disk-passphrase", 0o600, PASSPHRASE)
        .write_to(&secrets)?;
    let out = installer(&bundle, "luks_default_cpu")?
        .default_cpu()
        .extra_initrd(&secrets)
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("LUKSCPU1"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.layout=luks-btrfs")
        .run()?;
    installed(&out, &BIOS_GPT_CHECKS)?;
    ensure!(
        !out.log.contains("Error allocating crypto tfm"),
        "dm-crypt could not find its cipher"
    );
    // btrfs takes the install's swap file (1 GiB of RAM, no swap) only NOCOW, in `@nix`.
    ensure!(
        out.lines_containing("install: swaps: /mnt/nix/.nixos-kexec-swap ")
            .any(|l| l.contains("file")),
        "nixos-install ran without the swap file on btrfs:\n{}",
        out.tail(60)
    );
    boot_installed_disk(&bundle, "luks_default_cpu", &out, Firmware::Bios, &[GRUB_MENU])?;
    Ok(())
}

/// Without a boot loader on the disk, nixos-install's success is not the run's: the agent
/// reports the failed verification and does not power off.
#[test]
fn missing_boot_loader_fails_verification() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let scratch = tempfile::tempdir()?;
    let skip = scratch.path().join("skip.cpio");
    Cpio::new()
        .file("etc/nixos-kexec-stand-in.skip-boot-loader", 0o644, "")
        .write_to(&skip)?;
    let out = installer(&bundle, "no_boot_loader")?
        .extra_initrd(&skip)
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("NOLOADER1"))
        .param("nixos_kexec.disk=/dev/vda")
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(reason.contains("the disk would not boot"), "{reason}");
    ensure!(
        out.contains("verify: FAILED GRUB boot code in the MBR: the MBR of /dev/vda holds no boot code"),
        "the failed check was not named:\n{}",
        out.tail(30)
    );
    ensure!(!out.exited_by_itself, "a failed verification must not reboot");
    let root = extract_partition(&out.disks[0], 3)?;
    let report: Value = serde_json::from_slice(&ext4_read_file(&root, "/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["result"] == "failure", "report: {report}");
    let failed: Vec<&str> = report["verification"]
        .as_array()
        .context("verification")?
        .iter()
        .filter(|c| c["ok"] == false)
        .filter_map(|c| c["name"].as_str())
        .collect();
    ensure!(
        failed
            == [
                "GRUB boot code in the MBR",
                "GRUB core.img in the BIOS boot partition"
            ],
        "failed checks {failed:?}"
    );
    Ok(())
}
