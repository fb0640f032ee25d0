//! A throwaway rescue system for scenarios and the demo: the dev bundle's kernel and initrd with
//! a busybox script as `/init` that sets up a Hetzner-like static network (a /32 with an onlink
//! gateway, static IPv6 with `fe80::1`, a second NIC; the NICs renamed so the installer's kernel
//! names them differently) or another, then runs `nixos-kexec run` in /root from the bundle
//! copied into it.

use crate::{Bundle, Cpio, DiskBus, DiskSpec, Vm};
use anyhow::Result;
use std::path::{Path, PathBuf};

pub const WAN_MAC: &str = "52:54:00:aa:00:01";
pub const LAN_MAC: &str = "52:54:00:aa:00:02";
pub const TARGET_SERIAL: &str = "TARGET-DISK";
const GIB: u64 = 1 << 30;

/// The rescue system's network as a Hetzner rescue system has it: a /32 with an onlink
/// gateway, static IPv6 with `fe80::1`, a second NIC; the NICs renamed.
const HETZNER_LIKE_NETWORK: &str = r#"ip link set eth0 name wan0
ip link set eth1 name lan0
ip link set lo up; ip link set wan0 up; ip link set lan0 up
ip addr add 203.0.113.10/32 dev wan0
ip route add 172.31.1.1 dev wan0 scope link
ip route add default via 172.31.1.1 dev wan0 onlink
ip -6 addr add 2001:db8:c0de:1::1/64 dev wan0
ip -6 route add default via fe80::1 dev wan0
ip addr add 10.0.0.5/24 dev lan0
echo "nameserver 185.12.64.1" > /etc/resolv.conf
echo "nameserver 2a01:4ff:ff00::add:1" >> /etc/resolv.conf"#;

/// The network QEMU's user-mode NIC serves, set statically (as a cloud image's static
/// configuration would): the host's servers are reachable at 10.0.2.2, in the rescue system
/// and, restored, in the installer.
pub const QEMU_USER_NETWORK: &str = r#"ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2 dev eth0
echo "nameserver 10.0.2.3" > /etc/resolv.conf"#;

/// The `/init` of the rescue system; `run_args` follow `nixos-kexec run --bundle /bundle`.
pub fn rescue_init(run_args: &str) -> String {
    rescue_init_with_network(HETZNER_LIKE_NETWORK, run_args)
}

/// [`rescue_init`] with the rescue system's network set up by `network` (shell lines).
pub fn rescue_init_with_network(network: &str, run_args: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net virtio_blk nvme; do modprobe $m; done
sleep 1
{network}
echo rescue-box > /proc/sys/kernel/hostname
echo "rescue: network configured"
ip addr
echo "rescue: running nixos-kexec run"
cd /root
/bin/nixos-kexec run --bundle /bundle {run_args}
status=$?
echo "rescue: nixos-kexec run returned $status"
# Refused before the kexec: nothing more happens here.
[ "$status" = 0 ] || poweroff -f
sleep 3600
"#
    )
}

/// Writes the rescue system's extra initrd to `dir/rescue.cpio`: the init script, the bundle
/// under /bundle, root's authorized_keys, and any `extra` files.
pub fn rescue_cpio(
    bundle: &Bundle,
    dir: &Path,
    run_args: &str,
    authorized_key: &str,
    extra: &[(&str, u32, Vec<u8>)],
) -> Result<PathBuf> {
    rescue_cpio_with(bundle, &[], dir, &rescue_init(run_args), authorized_key, extra)
}

/// [`rescue_cpio`] with its own `/init`, and the bundle's initrd followed by `installer_extra`
/// archives (the kernel unpacks concatenated archives), e.g. the nixos-install test double.
pub fn rescue_cpio_with(
    bundle: &Bundle,
    installer_extra: &[PathBuf],
    dir: &Path,
    init: &str,
    authorized_key: &str,
    extra: &[(&str, u32, Vec<u8>)],
) -> Result<PathBuf> {
    let mut initrd = std::fs::read(&bundle.initrd)?;
    for archive in installer_extra {
        initrd.extend(std::fs::read(archive)?);
    }
    let mut cpio = Cpio::new()
        .file("init", 0o755, init)
        .file(
            &format!("bundle/{}", bundle.arch.kernel_file()),
            0o644,
            std::fs::read(&bundle.bzimage)?,
        )
        .file("bundle/initrd", 0o644, initrd)
        .file("root/.ssh/authorized_keys", 0o600, format!("{authorized_key}\n"));
    for (path, mode, data) in extra {
        cpio = cpio.file(path, *mode, data);
    }
    let path = dir.join("rescue.cpio");
    cpio.write_to(&path)?;
    Ok(path)
}

/// The rescue VM: two NICs with fixed MACs, an unrelated disk and the target disk (serial
/// [`TARGET_SERIAL`], the second disk).
pub fn rescue_vm(bundle: &Bundle, rescue_cpio: &Path) -> Vm {
    Vm::new(bundle)
        .memory_mib(1024)
        .extra_initrd(rescue_cpio)
        .nic(WAN_MAC)
        .nic(LAN_MAC)
        .disk(DiskSpec::new(2 * GIB, DiskBus::Virtio).serial("RESCUE-OTHER"))
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial(TARGET_SERIAL))
}
