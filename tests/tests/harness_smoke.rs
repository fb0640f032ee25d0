//! Proves the QEMU harness without the agent: an appended cpio replaces `/init` with a
//! busybox script that reports what the guest sees (disks, sector sizes, serials, firmware)
//! and echoes a line typed on the serial console.
//!
//! cargo test -p nixos-kexec-tests --test harness_smoke -- --nocapture

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;

const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "smoke: cmdline: $(cat /proc/cmdline)"
for m in virtio_pci virtio_blk virtio_scsi nvme ahci sd_mod; do
    modprobe "$m" || echo "smoke: modprobe $m failed"
done
# expected disks come from the kernel command line: smoke.expect=vda,sda
expect=$(sed -n 's/.*smoke\.expect=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
i=0
while [ $i -lt 100 ]; do
    missing=""
    for d in $expect; do [ -e "/sys/block/$d" ] || missing="$missing $d"; done
    [ -z "$missing" ] && break
    sleep 0.1; i=$((i+1))
done
[ -n "$missing" ] && echo "smoke: missing disks:$missing"
echo "smoke: block: $(ls /sys/block | tr '\n' ' ')"
for d in /sys/block/*; do
    n=${d##*/}
    echo "smoke: lbs $n $(cat $d/queue/logical_block_size) pbs $(cat $d/queue/physical_block_size)"
    [ -f "$d/serial" ] && echo "smoke: serial-file $n [$(cat $d/serial)]"
    [ -f "$d/device/serial" ] && echo "smoke: device-serial $n [$(cat $d/device/serial)]"
    [ -f "$d/device/model" ] && echo "smoke: device-model $n [$(cat $d/device/model)]"
    [ -f "$d/device/wwid" ] && echo "smoke: wwid $n [$(cat $d/device/wwid)]"
    # VPD page 0x80 (unit serial number): 4-byte header, then the serial (ATA: space-padded)
    [ -f "$d/device/vpd_pg80" ] && echo "smoke: vpd_pg80 $n [$(tail -c +5 $d/device/vpd_pg80)]"
done
if [ -d /sys/firmware/efi ]; then echo "smoke: efi present"; else echo "smoke: efi absent"; fi
# the bundle's own pieces: every listed module loads, the agent copy survives /init's override
for m in $(cat /etc/modules-load.d/nixos-kexec.conf); do
    modprobe "$m" || echo "smoke: modprobe $m failed"
done
echo "smoke: modules loaded: $(wc -l < /proc/modules)"
[ "$(head -c 4 /bin/nixos-kexec | tail -c 3)" = "ELF" ] && echo "smoke: agent binary intact"
vfat=$(sed -n 's/.*smoke\.vfat=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$vfat" ]; then
    mkdir -p /mnt/v
    mkdosfs "$vfat" >/dev/null && mount -t vfat -o fmask=0077,dmask=0077 "$vfat" /mnt/v && echo "smoke: mounted vfat" && umount /mnt/v
fi
if grep -q smoke.tools /proc/cmdline; then
    mkfs.ext4 -q -F -L smoke /dev/nvme0n1; echo "smoke: tool mkfs.ext4 rc=$?"
    e2fsck -fn /dev/nvme0n1 >/dev/null 2>&1; echo "smoke: tool e2fsck rc=$?"
    tune2fs -l /dev/nvme0n1 | grep -i 'block size'
    mkfs.btrfs -q -f -L smoke /dev/sda; echo "smoke: tool mkfs.btrfs rc=$?"
    cryptsetup --version; echo "smoke: tool cryptsetup rc=$?"
    resize2fs -P /dev/nvme0n1 >/dev/null 2>&1; echo "smoke: tool resize2fs rc=$?"
    mkdir -p /mnt/t && mount -t ext4 /dev/nvme0n1 /mnt/t && echo "smoke: mounted ext4" && umount /mnt/t
    mount -t btrfs /dev/sda /mnt/t && echo "smoke: mounted btrfs" && umount /mnt/t
fi
if grep -q smoke.ask /proc/cmdline; then
    echo "smoke: type a line"
    read -r line
    echo "smoke: got [$line]"
fi
echo "nixos-kexec: result: success"
poweroff -f
"#;

/// The extra initrd: a temp dir with `init`, packed by cpio(1).
fn smoke_cpio(dir: &std::path::Path) -> Result<PathBuf> {
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    let init = root.join("init");
    fs::write(&init, INIT).context("writing init")?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let out = dir.join("smoke.cpio");
    cpio_from_dir(&root, &out)?;
    Ok(out)
}

/// The text between `[` and `]` on the line starting with `prefix`, trimmed.
fn bracketed<'a>(out: &'a RunOutcome, prefix: &str) -> Result<&'a str> {
    let line = line_with(out, prefix)?;
    let inner = line
        .split_once('[')
        .and_then(|(_, rest)| rest.rsplit_once(']'))
        .map(|(inner, _)| inner.trim())
        .with_context(|| format!("no [...] on {line:?}"))?;
    Ok(inner)
}

/// The first line containing `prefix`, from `prefix` on (firmware output without a final
/// newline can stick to the front of the first line the guest prints).
fn line_with<'a>(out: &'a RunOutcome, prefix: &str) -> Result<&'a str> {
    out.log
        .lines()
        .find_map(|l| l.find(prefix).map(|i| &l[i..]))
        .with_context(|| format!("no line with {prefix:?}\n{}", out.tail(60)))
}

#[test]
fn bios_virtio_4k_and_sata_with_console_input() -> Result<()> {
    let bundle = dev_bundle()?;
    let tmp = tempfile::tempdir()?;
    let extra = smoke_cpio(tmp.path())?;
    let out = Vm::new(&bundle)
        .firmware(Firmware::Bios)
        .memory_mib(512)
        .disk(
            DiskSpec::new(1 << 30, DiskBus::Virtio)
                .sector(4096)
                .serial("VIRTIO-4K-01"),
        )
        .disk(DiskSpec::new(256 << 20, DiskBus::Sata).serial("SATA-512-02"))
        .extra_initrd(&extra)
        .param("smoke.expect=vda,sda")
        .param("smoke.ask")
        .param("smoke.vfat=/dev/sda")
        .timeout(Duration::from_secs(120))
        .run_with(|console| {
            console.wait_for("smoke: type a line", Duration::from_secs(90))?;
            console.send_line("hello from the host")?;
            Ok(())
        })?;
    out.expect_success()?;
    ensure!(
        out.exited_by_itself,
        "QEMU should exit by itself after poweroff -f"
    );
    ensure!(line_with(&out, "smoke: block:")?.contains("vda"), "vda missing");
    ensure!(line_with(&out, "smoke: block:")?.contains("sda"), "sda missing");
    ensure!(
        out.contains("smoke: lbs vda 4096 pbs 4096"),
        "vda should have 4096-byte sectors\n{}",
        out.tail(60)
    );
    ensure!(
        out.contains("smoke: lbs sda 512 pbs 512"),
        "sda should have 512-byte sectors"
    );
    ensure!(
        out.contains("smoke: serial-file vda [VIRTIO-4K-01]"),
        "virtio serial\n{}",
        out.tail(60)
    );
    ensure!(
        line_with(&out, "smoke: wwid sda")?.contains("SATA-512-02"),
        "SATA serial in wwid"
    );
    ensure!(
        bracketed(&out, "smoke: vpd_pg80 sda")? == "SATA-512-02",
        "SATA serial in vpd_pg80\n{}",
        out.tail(60)
    );
    ensure!(
        out.contains("smoke: efi absent"),
        "BIOS boot must not have /sys/firmware/efi"
    );
    ensure!(
        out.contains("smoke: got [hello from the host]"),
        "console input did not arrive\n{}",
        out.tail(60)
    );
    ensure!(
        line_with(&out, "smoke: cmdline:")?.contains("console=ttyS0"),
        "base cmdline"
    );
    ensure!(
        !out.contains("failed"),
        "a module failed to load\n{}",
        out.tail(60)
    );
    ensure!(
        out.contains("smoke: agent binary intact"),
        "/bin/nixos-kexec was clobbered by the /init override"
    );
    eprintln!(
        "bios: result after {:.1}s, QEMU gone after {:.1}s",
        out.time_to_result.unwrap_or_default().as_secs_f64(),
        out.duration.as_secs_f64()
    );
    Ok(())
}

#[test]
fn uefi_nvme_4k_and_scsi() -> Result<()> {
    let bundle = dev_bundle()?;
    let tmp = tempfile::tempdir()?;
    let extra = smoke_cpio(tmp.path())?;
    let out = Vm::new(&bundle)
        .firmware(Firmware::Uefi)
        .disk(
            DiskSpec::new(1 << 30, DiskBus::Nvme)
                .sector(4096)
                .serial("NVME-4K-01"),
        )
        .disk(
            DiskSpec::new(256 << 20, DiskBus::Scsi)
                .sector(4096)
                .serial("SCSI-4K-02"),
        )
        .extra_initrd(&extra)
        .param("smoke.expect=nvme0n1,sda")
        .param("smoke.tools")
        .timeout(Duration::from_secs(120))
        .run()?;
    out.expect_success()?;
    ensure!(
        out.exited_by_itself,
        "QEMU should exit by itself after poweroff -f"
    );
    ensure!(
        line_with(&out, "smoke: block:")?.contains("nvme0n1"),
        "nvme0n1 missing"
    );
    ensure!(
        out.contains("smoke: lbs nvme0n1 4096 pbs 4096"),
        "nvme should have 4096-byte sectors\n{}",
        out.tail(60)
    );
    ensure!(
        out.contains("smoke: lbs sda 4096 pbs 4096"),
        "scsi should have 4096-byte sectors\n{}",
        out.tail(60)
    );
    // NVMe pads the serial to 20 characters.
    ensure!(
        bracketed(&out, "smoke: device-serial nvme0n1")? == "NVME-4K-01",
        "nvme serial\n{}",
        out.tail(60)
    );
    ensure!(
        bracketed(&out, "smoke: vpd_pg80 sda")? == "SCSI-4K-02",
        "scsi serial\n{}",
        out.tail(60)
    );
    ensure!(
        out.contains("smoke: efi present"),
        "UEFI boot must have /sys/firmware/efi\n{}",
        out.tail(60)
    );
    for tool in ["mkfs.ext4", "e2fsck", "mkfs.btrfs", "cryptsetup", "resize2fs"] {
        ensure!(
            out.contains(&format!("smoke: tool {tool} rc=0")),
            "{tool} in the bundle failed\n{}",
            out.tail(60)
        );
    }
    ensure!(
        out.contains("smoke: mounted ext4") && out.contains("smoke: mounted btrfs"),
        "mounts\n{}",
        out.tail(60)
    );
    eprintln!(
        "uefi: result after {:.1}s, QEMU gone after {:.1}s",
        out.time_to_result.unwrap_or_default().as_secs_f64(),
        out.duration.as_secs_f64()
    );
    Ok(())
}

/// A 4096-byte-sector GPT made on the host with `fdisk -b 4096` is read by the harness's
/// in-guest sfdisk/sgdisk, and a partition is extracted at the right byte offset.
#[test]
fn inspects_4k_gpt_in_guest() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("gpt4k.img");
    fs::File::create(&img)?.set_len(256 << 20)?;
    let mut child = Command::new("fdisk")
        .args(["-b", "4096"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting fdisk")?;
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().context("fdisk stdin")?;
        // GPT, partition 1 = 64 MiB from the default first sector (1 MiB), partition 2 = rest
        stdin.write_all(b"g\nn\n1\n\n+64M\nn\n2\n\n\nw\n")?;
    }
    ensure!(child.wait()?.success(), "fdisk -b 4096 failed");
    // Mark partition 2 so the extraction can be checked.
    let json = sfdisk_json(&img)?;
    let table = &json["partitiontable"];
    ensure!(table["sectorsize"] == 4096, "sector size from the guest: {json}");
    ensure!(
        table["partitions"].as_array().map(|a| a.len()) == Some(2),
        "two partitions: {json}"
    );
    let start2 = table["partitions"][1]["start"].as_u64().context("start")? * 4096;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(&img)?;
        f.seek(SeekFrom::Start(start2))?;
        f.write_all(b"PARTITION-TWO")?;
    }
    let verify = sgdisk_verify(&img)?;
    ensure!(verify.contains("No problems found"), "{verify}");
    let p2 = extract_partition(&img, 2)?;
    let data = fs::read(&p2)?;
    ensure!(
        data.starts_with(b"PARTITION-TWO"),
        "partition 2 extracted from the wrong offset"
    );
    Ok(())
}

/// A guest that prints its result line but never powers off is killed after the grace
/// period; a console wait that cannot succeed and a VM timeout both fail with the log's tail.
#[test]
fn grace_period_console_timeout_and_vm_timeout() -> Result<()> {
    let bundle = dev_bundle()?;
    let tmp = tempfile::tempdir()?;
    let hang = tmp.path().join("hang.cpio");
    Cpio::new()
        .file(
            "init",
            0o755,
            "#!/bin/busybox sh\necho 'smoke: about to hang'\necho 'nixos-kexec: result: failure: testing the grace period'\nexec /bin/busybox sleep 1000\n",
        )
        .write_to(&hang)?;

    let out = Vm::new(&bundle)
        .name("grace")
        .extra_initrd(&hang)
        .grace(Duration::from_secs(2))
        .timeout(Duration::from_secs(120))
        .run()?;
    ensure!(
        !out.exited_by_itself,
        "the guest never powers off; QEMU must have been killed"
    );
    ensure!(
        out.failure_reason() == Some("testing the grace period"),
        "{:?}",
        out.result_line
    );
    ensure!(out.expect_success().is_err());
    ensure!(out.expect_failure()? == "testing the grace period");

    let err = Vm::new(&bundle)
        .name("console-timeout")
        .extra_initrd(&hang)
        .timeout(Duration::from_secs(120))
        .run_with(|console| {
            console.wait_for("smoke: about to hang", Duration::from_secs(90))?;
            console.wait_for("this never appears", Duration::from_secs(3))?;
            Ok(())
        })
        .err()
        .context("waiting for a line that never appears must fail")?;
    let msg = format!("{err:#}");
    eprintln!("expected console error:\n{msg}");
    ensure!(
        msg.contains("this never appears") && msg.contains("smoke: about to hang"),
        "{msg}"
    );

    let err = Vm::new(&bundle)
        .name("vm-timeout")
        .extra_initrd(&hang)
        .timeout(Duration::from_secs(3))
        .run()
        .err()
        .context("a 3 s timeout must fail")?;
    let msg = format!("{err:#}");
    eprintln!("expected timeout error:\n{msg}");
    ensure!(
        msg.contains("timed out after 3s") && msg.contains("console lines"),
        "{msg}"
    );
    Ok(())
}
