//! Faults the installer must survive without harming a disk or leaving the operator with a
//! machine that rebooted before its console could be read (issue #14).

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const GIB: u64 = 1 << 30;

/// The root moves from the initramfs to a tmpfs before anything else. When that fails the root
/// may be half gone, so the installer must stop there: no disk touched, and no reboot before
/// the way back's grace period (the default 10 minutes; no parameter has been read).
#[test]
fn a_failed_root_move_stops_before_any_disk() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "old.img", 2 * GIB)?;
    let before = sparse_digest(&disk)?;
    // A file where the installer mounts its tmpfs makes the move fail at its first step.
    let blocker = scratch.path().join("blocker.cpio");
    Cpio::new()
        .file(".nixos-kexec-root", 0o644, "in the way")
        .write_to(&blocker)?;
    let out = Vm::new(&bundle)
        .name("root-move-fails")
        .disk_image(&disk, DiskBus::Virtio, 512, "OLDDISK1")
        .extra_initrd(&blocker)
        .param("nixos_kexec.disk=serial:OLDDISK1")
        .param("nixos_kexec.after=poweroff")
        .grace(std::time::Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("could not move the root from the initramfs to a tmpfs"),
        "reason: {reason}"
    );
    ensure!(
        !out.contains("starting as init"),
        "the installer went on after the failed move:\n{}",
        out.tail(30)
    );
    ensure!(
        !out.exited_by_itself,
        "a failed run must not power off, nor reboot before its grace period"
    );
    ensure!(
        out.contains("reboot: no disk was written, so this machine reboots in 10 min"),
        "{}",
        out.tail(5)
    );
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    Ok(())
}

// ------------------------------------------------------------------------- faults (item 10)

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
const PASSPHRASE: &str = "correct horse battery staple";
const REPORT: &str = "/var/log/nixos-kexec/report.json";

/// Boots `vm` and cuts its power as soon as `line` is on the console: QEMU is killed, so what
/// the guest had not yet written never reaches the image, as when the plug is pulled.
fn cut_power_at(vm: Vm, line: &str) -> Result<RunOutcome> {
    let wanted = line.to_string();
    // boot_from_disk() is what makes the harness kill QEMU once the console interaction
    // succeeds; direct_boot(true) still boots the installer's kernel.
    let out = vm.boot_from_disk().direct_boot(true).run_with(move |console| {
        let (seen, text) = console.wait_for_any(&[&wanted, RESULT_PREFIX], Duration::from_secs(400))?;
        ensure!(seen == 0, "the run ended before {wanted:?}:\n{text}");
        Ok(())
    })?;
    eprintln!("[{}] power cut at {line:?}", out.name);
    Ok(out)
}

/// What the power cut while the table was written left: a GPT, or none yet. The next boot
/// starts over whatever it is, so this is only reported.
fn describe_table(disk: &Path) -> Result<String> {
    Ok(match gpt_sector_size(disk)? {
        None => "no GPT yet".to_string(),
        Some(_) => match sgdisk_verify(disk) {
            Ok(_) => "a GPT that sgdisk accepts".to_string(),
            Err(e) => format!("a GPT that sgdisk rejects: {e:#}"),
        },
    })
}

/// The report on the LUKS root (partition 3) of `disk`, as the installed system would find it
/// at its next boot (the journal replayed), read in a guest: the host cannot open LUKS.
fn luks_root_report(disk: &Path) -> Result<Value> {
    let script = format!(
        r#"cryptsetup open --key-file /pass /dev/vda3 root
mkdir -p /m
mount -o ro /dev/mapper/root /m
echo '=== report ==='; cat /m{REPORT}; echo; echo '=== end report ==='
umount /m
cryptsetup close root
"#
    );
    let out = guest_shell(&[(disk, 512)], &[("pass", 0o600, PASSPHRASE.as_bytes())], &script)?;
    let text = section(&out, "report")?;
    serde_json::from_str(text).with_context(|| format!("the report inside the LUKS root: {text:?}"))
}

fn ext4_report(disk: &Path, partition: u32) -> Result<Value> {
    let root = extract_partition(disk, partition)?;
    Ok(serde_json::from_slice(&ext4_read_file(&root, REPORT)?)?)
}

/// An installer run with the nixos-install test double on `disk`, with `params`. The install
/// step needs a default route, hence the NIC.
fn installer(bundle: &Bundle, name: &str, disk: &Path, serial: &str, params: &[&str]) -> Result<Vm> {
    let mut vm = Vm::new(bundle)
        .name(name)
        .extra_initrd(bundle.stand_in()?)
        .nic("52:54:00:12:34:71")
        .disk_image(disk, DiskBus::Virtio, 512, serial)
        .param("nixos_kexec.disk=/dev/vda")
        .param(format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+")))
        .param("nixos_kexec.after=poweroff")
        .timeout(Duration::from_secs(420));
    for param in params {
        vm = vm.param(*param);
    }
    Ok(vm)
}

/// On luks-ext4 (the ESP is /boot), with the nixos-install test double: power is cut while the
/// partition table is written, while the root is LUKS-formatted, and at the very end of a run,
/// once the finish step has marked the LUKS header as a finished install but before the run
/// unmounted and synced. Each next boot, with the same parameters, gets past the point where
/// the last one died. The last cut leaves our own finished install: what the marker vouches
/// for is on the disk (the boot loader's menu on the ESP), and the next boot refuses to
/// install over it, naming it, and changes nothing.
#[test]
fn power_cuts_while_partitioning_encrypting_and_finishing() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let scratch = tempfile::tempdir()?;
    let disk = blank_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let secrets = scratch.path().join("secrets.cpio");
    Cpio::new()
        .file("etc/nixos-kexec/secrets/disk-passphrase", 0o600, PASSPHRASE)
        .write_to(&secrets)?;
    let boot = |name: &str| -> Result<Vm> {
        Ok(installer(
            &bundle,
            name,
            &disk,
            "POWERCUT1",
            &["nixos_kexec.layout=luks-ext4"],
        )?
        .extra_initrd(&secrets))
    };

    cut_power_at(boot("cut-while-partitioning")?, "] partition ...")?;
    eprintln!("after the cut while partitioning: {}", describe_table(&disk)?);

    cut_power_at(boot("cut-while-encrypting")?, "running: cryptsetup luksFormat")?;
    sgdisk_verify(&disk).context("the table after the cut while encrypting")?;

    cut_power_at(boot("cut-while-finishing")?, "marked as a finished install")?;
    sgdisk_verify(&disk).context("the table after the cut while finishing")?;
    // The ESP was mounted when the power went, so its dirty bit is set: fsck.fat would say so.
    let menu = String::from_utf8(fat_read_file(&extract_partition(&disk, 2)?, "/grub/grub.cfg")?)?;
    ensure!(
        menu.contains("NixOS - Default"),
        "the boot loader's menu on the ESP is not whole:\n{menu}"
    );
    let report = luks_root_report(&disk)?;
    ensure!(
        report["result"] == "success",
        "the marker says finished, the report inside does not: {report}"
    );

    let installed = sparse_digest(&disk)?;
    let again = boot("boot-after-the-cuts")?.grace(Duration::from_secs(3)).run()?;
    let reason = again.expect_failure()?;
    ensure!(
        reason.contains("Refusing to install over /dev/vda")
            && reason.contains("holds a NixOS installed by nixos-kexec")
            && reason.contains("nixos_kexec.reinstall"),
        "the refusal does not name our own install: {reason}"
    );
    ensure!(!again.exited_by_itself, "a refusal must not power off");
    ensure!(
        sparse_digest(&disk)? == installed,
        "the refused run changed the disk"
    );
    Ok(())
}

/// On the ext4 layout, with the nixos-install test double: power is cut while the root is
/// formatted; the next boot's nixos-install fails; power is cut after the next install step
/// succeeded, before the run's end; and the boot after that finishes.
///
/// - A failed nixos-install ends in a failure result, a failure report on the target and no
///   reboot (the operator reads the console).
/// - After the cut following the install step no report exists yet (the finish step writes it),
///   so that disk is not "our own finished install": the reinstall guard lets the next boot
///   install again, and it does.
#[test]
fn a_failed_install_and_power_cuts_then_a_boot_finishes() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let scratch = tempfile::tempdir()?;
    let disk = blank_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let fail = scratch.path().join("fail.cpio");
    Cpio::new()
        .file("etc/nixos-kexec-stand-in.fail-install", 0o644, "")
        .write_to(&fail)?;
    let boot = |name: &str| installer(&bundle, name, &disk, "POWERCUT2", &[]);

    cut_power_at(boot("cut-while-formatting")?, "running: mkfs.ext4")?;
    sgdisk_verify(&disk).context("the table after the cut while formatting")?;

    let failed = boot("install-fails")?
        .extra_initrd(&fail)
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = failed.expect_failure()?;
    ensure!(
        reason.contains("step install") && reason.contains("nixos-install"),
        "the reason does not name the install step: {reason}"
    );
    ensure!(
        failed.contains("install: error: builder for"),
        "nixos-install's own error is not on the console:\n{}",
        failed.tail(30)
    );
    ensure!(!failed.exited_by_itself, "a failed install must not reboot");
    let report = ext4_report(&disk, 3)?;
    ensure!(report["result"] == "failure", "report: {report}");
    ensure!(
        report["steps"]
            .as_array()
            .and_then(|steps| steps.last())
            .is_some_and(|last| last["step"] == "install" && last["ok"] == false),
        "the report does not end with the failed install step: {report}"
    );

    cut_power_at(boot("cut-after-install")?, "] install done in")?;
    sgdisk_verify(&disk).context("the table after the cut after the install step")?;

    let out = boot("after-the-cuts")?.run()?;
    ensure!(
        !out.contains("earlier install found"),
        "a run cut off before its end counted as a finished install:\n{}",
        out.tail(60)
    );
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the finished run should have powered off");
    sgdisk_verify(&disk)?;
    e2fsck(&extract_partition(&disk, 3)?)?;
    let report = ext4_report(&disk, 3)?;
    ensure!(report["result"] == "success", "report: {report}");
    Ok(())
}

/// A config server that breaks off its answer in the middle of the body, and one that answers
/// with bytes that are not HTTP, by turns: every attempt fails, each is retried, and then the
/// run fails naming the URL and the last failure. The disk stays as it was and the machine up.
#[test]
fn a_config_server_that_breaks_off_or_sends_garbage_is_retried_then_named() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "old.img", 2 * GIB)?;
    let before = sparse_digest(&disk)?;
    let body = r#"{"version": 1, "hostname": "cut-short", "disk": {"serial": "OLDDISK2"}}"#;
    let cut = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        &body[..body.len() / 2]
    )
    .into_bytes();
    // Binary noise without a line break, as from a server that speaks something else.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 | 0x80
        })
        .collect();
    let server = ConfigServer::start_raw(
        vec![garbage.clone(), cut.clone(), garbage.clone(), cut, garbage],
        10,
    )?;
    let mac = "52:54:00:12:34:72";
    let url = format!("{}/hosts/{mac}.json", server.guest_url());
    let out = Vm::new(&bundle)
        .name("broken-config-server")
        .nic(mac)
        .disk_image(&disk, DiskBus::Virtio, 512, "OLDDISK2")
        .param(format!(
            "nixos_kexec.config_url={}/hosts/${{mac}}.json",
            server.guest_url()
        ))
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains(&format!(
            "Could not fetch {url}: 5 attempts failed, the last with: not an HTTP/1.x status line"
        )),
        "the reason does not name the URL and the last failure: {reason}"
    );
    // The noise is quoted only as far as it helps: 4 KiB of it would bury the rest.
    ensure!(
        reason.len() < 600,
        "the reason is {} bytes long: {reason}",
        reason.len()
    );
    for (attempt, why) in [
        (1, "not an HTTP/1.x status line"),
        (2, "the body ended early"),
        (3, "not an HTTP/1.x status line"),
        (4, "the body ended early"),
    ] {
        ensure!(
            out.lines_containing(&format!("GET {url}: attempt {attempt}/5 failed: {why}"))
                .any(|l| l.contains("retrying in")),
            "attempt {attempt} was not reported as failed with {why:?} and retried"
        );
    }
    ensure!(server.requests().len() == 5, "requests: {:?}", server.requests());
    ensure!(!out.exited_by_itself, "a failed run must not power off");
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    Ok(())
}
