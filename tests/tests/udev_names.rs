//! The agent's /dev/disk links against Debian 12's real udev (issue #10 part 6).
//!
//! One VM with virtio-blk (with and without serial), SATA on ahci (with serial, and one with a
//! WWN and QEMU's default serial), virtio-scsi (with serial, without, with a WWN) and NVMe
//! disks, partitioned (GPT and MBR) and holding ext4, btrfs, FAT, swap, LUKS1 and LUKS2 made
//! on the host by the usual tools. Its /init (an appended cpio) prints what
//! `nixos-kexec devlinks --print` would make, then runs Debian's `systemd-udevd` (252, stock
//! rules, taken from the .deb without installing it) and prints the /dev/disk tree udev made.
//! The two must be equal.
//!
//! cargo test -p nixos-kexec-tests --test udev_names -- --nocapture

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nixos_kexec_tests::*;

/// Makes the disk images in the current directory with sgdisk, sfdisk, mkfs.*, mkswap and
/// cryptsetup, each filesystem in a file of its own, copied to its partition's offset.
const MAKE_IMAGES: &str = r#"set -euo pipefail
put() { dd if="$3" of="$1" bs=512 seek="$2" conv=notrunc,sparse status=none; }
truncate -s 64M virtio.img
sgdisk -o -n1:2048:+8M -t1:ef00 -c1:"EFI system" -n2:0:+24M -c2:"root part" -n3:0:+8M -t3:8200 virtio.img >/dev/null
truncate -s 8M fs.vfat; mkfs.vfat -F 32 -n "EFI BOOT" -i 1234abcd fs.vfat >/dev/null 2>&1; put virtio.img 2048 fs.vfat
truncate -s 24M fs.ext4; mkfs.ext4 -q -F -L "ro/ot fs" -U 11111111-2222-3333-4444-555555555555 fs.ext4; put virtio.img 18432 fs.ext4
truncate -s 8M fs.swap; mkswap -L sw -U 66666666-2222-3333-4444-555555555555 fs.swap >/dev/null 2>&1; put virtio.img 67584 fs.swap
truncate -s 300M mbr.img
printf 'label: dos\nlabel-id: 0xdeadbeef\nstart=2048,size=16384,type=83\nstart=18432,size=270336,type=83\n' | sfdisk -q mbr.img
truncate -s 8M fs.e2; mkfs.ext4 -q -F fs.e2; put mbr.img 2048 fs.e2
truncate -s 132M fs.btrfs; mkfs.btrfs -q -f -L data fs.btrfs >/dev/null 2>&1; put mbr.img 18432 fs.btrfs
truncate -s 64M sata.img; sgdisk -o -n1:2048:+24M -n2:0:+24M sata.img >/dev/null
truncate -s 24M fs.l2
echo -n pw | cryptsetup luksFormat -q --type luks2 --label cryptroot --pbkdf pbkdf2 --pbkdf-force-iterations 1000 fs.l2 -d -
put sata.img 2048 fs.l2
truncate -s 24M fs.l1
echo -n pw | cryptsetup luksFormat -q --type luks1 --pbkdf-force-iterations 1000 fs.l1 -d -
put sata.img 51200 fs.l1
truncate -s 32M sata-wwn.img
truncate -s 64M scsi.img; sgdisk -o -n1:2048:+16M scsi.img >/dev/null
truncate -s 16M fs.scsi; mkfs.ext4 -q -F -L scsi fs.scsi; put scsi.img 2048 fs.scsi
truncate -s 32M scsi-noserial.img; truncate -s 32M scsi-wwn.img
truncate -s 64M nvme.img; sgdisk -o -n1:2048:+16M -c1:"nvme data" nvme.img >/dev/null
truncate -s 16M fs.nvme; mkfs.ext4 -q -F -L nvme fs.nvme; put nvme.img 2048 fs.nvme
rm -f fs.*
"#;

/// The test's /init: the agent's links first (nothing has touched /dev/disk yet), then udev's.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
for m in virtio_pci virtio_blk virtio_scsi nvme ahci sd_mod; do modprobe "$m"; done
want=17
i=0
while [ $i -lt 200 ]; do
    n=$(ls /sys/class/block | grep -c -v -e '^loop' -e '^ram')
    [ "$n" -ge "$want" ] && break
    sleep 0.1; i=$((i+1))
done
echo "udev-names: block devices: $(ls /sys/class/block | tr '\n' ' ')"
echo "udev-names: agent-begin"
/bin/nixos-kexec devlinks --print
echo "udev-names: agent-end"
mkdir -p /run/udev
/lib/systemd/systemd-udevd --daemon
udevadm trigger --action=add --type=subsystems
udevadm trigger --action=add --type=devices
udevadm settle --timeout=60
echo "udev-names: udev-begin"
cd /dev/disk && find . -type l | sort | while read -r l; do echo "${l#./} -> $(readlink "$l")"; done
cd /
echo "udev-names: udev-end"
echo "nixos-kexec: result: success"
poweroff -f
"#;

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("NIXOS_KEXEC_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nixos-kexec"));
    base.join("udev-debs")
}

/// Debian's `udev` and `libsystemd-shared` packages of the same version, downloaded once
/// into the cache (never installed); offline, the newest cached pair.
fn udev_debs() -> Result<Vec<PathBuf>> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let version = run_tool(Command::new("apt-cache").args(["show", "--no-all-versions", "udev"]))
        .ok()
        .and_then(|o| {
            o.stdout_str()
                .lines()
                .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        });
    let mut debs = Vec::new();
    for package in ["udev", "libsystemd-shared"] {
        let cached =
            |version: &str| cache.join(format!("{package}_{}_amd64.deb", version.replace(':', "%3a")));
        let deb = match &version {
            Some(v) if cached(v).is_file() => cached(v),
            Some(v) => {
                run_tool(
                    Command::new("apt-get")
                        .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                        .arg(format!("{package}={v}"))
                        .current_dir(&cache),
                )
                .with_context(|| format!("apt-get download {package}={v}"))?;
                ensure!(
                    cached(v).is_file(),
                    "apt-get download left no {}",
                    cached(v).display()
                );
                cached(v)
            }
            None => {
                let mut found: Vec<PathBuf> = fs::read_dir(&cache)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
                    })
                    .collect();
                found.sort();
                found.pop().with_context(|| {
                    format!(
                        "apt-cache does not know udev and {} holds no {package} .deb",
                        cache.display()
                    )
                })?
            }
        };
        debs.push(deb);
    }
    Ok(debs)
}

/// The extra initrd: udevd (= udevadm), ata_id, scsi_id, the stock rules, their libraries
/// (found with ldd, as build-dev does), the agent as built for this test run and /init.
fn udev_cpio(dir: &Path, bundle: &Bundle) -> Result<PathBuf> {
    let unpacked = dir.join("debs");
    for deb in udev_debs()? {
        run_tool(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let root = dir.join("root");
    for sub in ["bin", "lib/udev", "lib/systemd", "lib/x86_64-linux-gnu"] {
        fs::create_dir_all(root.join(sub))?;
    }
    let udevadm = unpacked.join("bin/udevadm");
    fs::copy(&udevadm, root.join("bin/udevadm")).context("copying udevadm")?;
    std::os::unix::fs::symlink("/bin/udevadm", root.join("lib/systemd/systemd-udevd"))?;
    for helper in ["ata_id", "scsi_id"] {
        fs::copy(
            unpacked.join("lib/udev").join(helper),
            root.join("lib/udev").join(helper),
        )
        .with_context(|| format!("copying {helper}"))?;
    }
    run_tool(
        Command::new("cp")
            .arg("-a")
            .arg(unpacked.join("lib/udev/rules.d"))
            .arg(root.join("lib/udev/")),
    )?;
    let shared = unpacked.join("usr/lib/x86_64-linux-gnu/systemd");
    let ldd = run_tool(Command::new("ldd").arg(&udevadm).env("LD_LIBRARY_PATH", &shared))?.stdout_str();
    for line in ldd.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name, "=>", path, ..] = words[..] {
            ensure!(
                path.starts_with('/'),
                "ldd cannot find {name} for udevadm:\n{ldd}"
            );
            let dest = if Path::new(path).starts_with(&shared) {
                root.join("usr/lib/x86_64-linux-gnu/systemd")
            } else {
                root.join("lib/x86_64-linux-gnu")
            };
            fs::create_dir_all(&dest)?;
            fs::copy(path, dest.join(name)).with_context(|| format!("copying {path}"))?;
        }
    }
    // The bundle's agent is the one under test; nothing to add for it. The init replaces its
    // /init link.
    let _ = bundle;
    let init = root.join("init");
    fs::write(&init, INIT).context("writing init")?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let out = dir.join("udev.cpio");
    cpio_from_dir(&root, &out)?;
    Ok(out)
}

/// The lines between two markers of the serial log, sorted.
fn section(log: &str, begin: &str, end: &str) -> Result<Vec<String>> {
    let mut lines: Vec<String> = Vec::new();
    let mut inside = false;
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if line.contains(begin) {
            inside = true;
        } else if line.contains(end) {
            lines.sort();
            return Ok(lines);
        } else if inside && line.contains(" -> ") {
            lines.push(line.to_string());
        }
    }
    bail!("no {begin} ... {end} section in the log")
}

#[test]
fn agent_links_equal_real_udevs() -> Result<()> {
    let bundle = dev_bundle()?;
    let tmp = tempfile::tempdir()?;
    let images = tmp.path().join("images");
    fs::create_dir_all(&images)?;
    run_tool(
        Command::new("bash")
            .arg("-c")
            .arg(MAKE_IMAGES)
            .current_dir(&images),
    )
    .context("making the disk images")?;
    let extra = udev_cpio(tmp.path(), &bundle)?;
    let image = |name: &str| images.join(name);
    let drive = |name: &str| {
        format!(
            "file={},format=raw,if=none,id={name},cache=unsafe",
            image(&format!("{name}.img")).display()
        )
    };
    let start = std::time::Instant::now();
    let out = Vm::new(&bundle)
        .name("udev-names")
        .memory_mib(1024)
        .disk_image(image("virtio.img"), DiskBus::Virtio, 512, "VIRT-SER1")
        .disk_image(image("mbr.img"), DiskBus::Virtio, 512, "")
        .disk_image(image("sata.img"), DiskBus::Sata, 512, "SATA-SER2")
        .disk_image(image("scsi.img"), DiskBus::Scsi, 512, "SCSI-SER3")
        .disk_image(image("nvme.img"), DiskBus::Nvme, 512, "NVME-SER4")
        // What DiskSpec has no words for: a WWN, and a SCSI disk without a serial (its
        // designator is then the drive id).
        .qemu_args([
            "-drive",
            &drive("sata-wwn"),
            "-device",
            "ide-hd,drive=sata-wwn,bus=sata.1,wwn=0x5000c500a1b2c3d4",
            "-drive",
            &drive("scsi-noserial"),
            "-device",
            "scsi-hd,drive=scsi-noserial,bus=scsi.0",
            "-drive",
            &drive("scsi-wwn"),
            "-device",
            "scsi-hd,drive=scsi-wwn,bus=scsi.0,serial=WWNSER,wwn=0x5000c50015ea71ac",
        ])
        .extra_initrd(&extra)
        .timeout(Duration::from_secs(240))
        .run()?;
    eprintln!("udev_names: VM ran {:.1}s", start.elapsed().as_secs_f64());
    out.expect_success()?;
    let agent = section(&out.log, "udev-names: agent-begin", "udev-names: agent-end")?;
    let udev = section(&out.log, "udev-names: udev-begin", "udev-names: udev-end")?;
    for line in &udev {
        eprintln!("udev: {line}");
    }
    let only_udev: Vec<_> = udev.iter().filter(|l| !agent.contains(l)).collect();
    let only_agent: Vec<_> = agent.iter().filter(|l| !udev.contains(l)).collect();
    ensure!(
        only_udev.is_empty() && only_agent.is_empty(),
        "the agent's links differ from udev's\n--- only udev made:\n{}\n--- only the agent made:\n{}",
        only_udev
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        only_agent
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    // Equal and empty would prove nothing: spot-check one name of each kind.
    for wanted in [
        "by-id/virtio-VIRT-SER1-part2 -> ../../vda2",
        "by-id/ata-QEMU_HARDDISK_SATA-SER2 -> ",
        "by-id/wwn-0x5000c500a1b2c3d4 -> ",
        "by-id/scsi-0QEMU_QEMU_HARDDISK_SCSI-SER3 -> ",
        "by-id/scsi-0QEMU_QEMU_HARDDISK_scsi-noserial -> ",
        "by-id/scsi-35000c50015ea71ac -> ",
        "by-id/nvme-QEMU_NVMe_Ctrl_NVME-SER4_1-part1 -> ../../nvme0n1p1",
        "by-path/pci-",
        "by-uuid/1234-ABCD -> ../../vda1",
        "by-label/ro\\x2fot\\x20fs -> ../../vda2",
        "by-label/cryptroot -> ",
        "by-uuid/66666666-2222-3333-4444-555555555555 -> ../../vda3",
        "by-partuuid/deadbeef-02 -> ../../vdb2",
        "by-partlabel/nvme\\x20data -> ../../nvme0n1p1",
        "by-label/data -> ../../vdb2",
    ] {
        ensure!(
            udev.iter().any(|l| l.starts_with(wanted)),
            "udev made no {wanted}...; its tree:\n{}",
            udev.join("\n")
        );
    }
    eprintln!("udev_names: {} links, identical", udev.len());
    Ok(())
}
