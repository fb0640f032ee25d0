//! The rescue side end to end: a rescue VM (Debian kernel + the dev initrd with a busybox
//! "rescue system" script as /init) configures a Hetzner-like static network, runs
//! `nixos-kexec run`, and kexecs into the installer, which must bring the same network back on
//! the right NICs (matched by MAC: the rescue system renamed them) and prepare the disk chosen by
//! serial.

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::path::Path;

const GIB: u64 = 1 << 30;
const WAN_MAC: &str = "52:54:00:aa:00:01";
const LAN_MAC: &str = "52:54:00:aa:00:02";
const PASSPHRASE: &str = "Sup3r-Secret-Disk-Passphrase-7781";
const OPERATOR_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";

/// The rescue system: loads drivers, renames the NICs (the installer's kernel will call them
/// eth0/eth1), sets up static addressing like Hetzner's, then hands over to nixos-kexec.
fn rescue_init(run_args: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net virtio_blk; do modprobe $m; done
sleep 1
ip link set eth0 name wan0
ip link set eth1 name lan0
ip link set lo up; ip link set wan0 up; ip link set lan0 up
ip addr add 203.0.113.10/32 dev wan0
ip route add 172.31.1.1 dev wan0 scope link
ip route add default via 172.31.1.1 dev wan0 onlink
ip -6 addr add 2001:db8:c0de:1::1/64 dev wan0
ip -6 route add default via fe80::1 dev wan0
ip addr add 10.0.0.5/24 dev lan0
echo "nameserver 185.12.64.1" > /etc/resolv.conf
echo "nameserver 2a01:4ff:ff00::add:1" >> /etc/resolv.conf
echo rescue-box > /proc/sys/kernel/hostname
echo "rescue: network configured"
ip addr
echo "rescue: running nixos-kexec run"
/bin/nixos-kexec run --bundle /bundle {run_args}
echo "rescue: nixos-kexec run returned $?"
sleep 3600
"#
    )
}

struct Rescue {
    cpio: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn rescue_cpio(bundle: &Bundle, run_args: &str, extra: &[(&str, u32, Vec<u8>)]) -> Result<Rescue> {
    let dir = tempfile::tempdir()?;
    let mut cpio = Cpio::new()
        .file("init", 0o755, rescue_init(run_args))
        .file("bundle/bzImage", 0o644, std::fs::read(&bundle.bzimage)?)
        .file("bundle/initrd", 0o644, std::fs::read(&bundle.initrd)?)
        .file("root/.ssh/authorized_keys", 0o600, format!("{OPERATOR_KEY}\n"))
        .file("root/disk-passphrase", 0o600, PASSPHRASE);
    for (path, mode, data) in extra {
        cpio = cpio.file(path, *mode, data);
    }
    let path = dir.path().join("rescue.cpio");
    cpio.write_to(&path)?;
    Ok(Rescue {
        cpio: path,
        _dir: dir,
    })
}

fn rescue_vm(bundle: &Bundle, rescue: &Rescue) -> Vm {
    Vm::new(bundle)
        .memory_mib(1024)
        .extra_initrd(&rescue.cpio)
        .nic(WAN_MAC)
        .nic(LAN_MAC)
        .disk(DiskSpec::new(2 * GIB, DiskBus::Virtio).serial("RESCUE-OTHER"))
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("TARGET-DISK"))
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

fn read_root_file(disk: &Path, path: &str) -> Result<String> {
    let root = extract_partition(disk, 3)?;
    Ok(String::from_utf8(ext4_read_file(&root, path)?)?)
}

#[test]
fn kexec_with_static_network_restored_by_mac() -> Result<()> {
    let bundle = dev_bundle()?;
    let rescue = rescue_cpio(
        &bundle,
        "--disk serial:TARGET-DISK --hostname web1 --disk-key-file /root/disk-passphrase \
         --param stop_before=install --param after=poweroff",
        &[],
    )?;
    let out = rescue_vm(&bundle, &rescue).run()?;
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
    let report = read_root_file(disk, "/var/log/nixos-kexec/report.json")?;
    ensure!(!report.contains(PASSPHRASE), "passphrase in report");
    Ok(())
}

#[test]
fn large_runtime_info_travels_in_the_appended_cpio() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let mut keys = String::new();
    for i in 0..4 {
        let path = scratch.path().join(format!("k{i}"));
        tool(
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "rsa",
                "-b",
                "4096",
                "-N",
                "",
                "-C",
                &format!("rsa-key-{i}"),
                "-f",
                path.to_str().context("path")?,
            ],
        )?;
        keys += &std::fs::read_to_string(path.with_extension("pub"))?;
    }
    let rescue = rescue_cpio(
        &bundle,
        "--disk serial:TARGET-DISK --ssh-key-file /root/keys.pub --param stop_before=install --param after=poweroff",
        &[("root/keys.pub", 0o644, keys.clone().into_bytes())],
    )?;
    let out = rescue_vm(&bundle, &rescue).run()?;
    out.expect_success()?;
    ensure!(
        out.contains("it travels in the appended initrd archive"),
        "the cpio carrier was not used"
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
