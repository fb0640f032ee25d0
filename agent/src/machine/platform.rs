//! What the installed system's hardware configuration needs to know about the machine besides
//! its disks and NICs: the architecture, whether it is a virtual machine (and whose), and the
//! CPU vendor. nixos-generate-config decides its imports and microcode lines from the same
//! things (nixos/modules/installer/tools/nixos-generate-config.pl).
//!
//! Read from sysfs and procfs under a root directory, so unit tests can give a fake tree.

use crate::error::user_error;
use crate::machine::facts::read_trimmed;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The kernel's machine name (`uname -m`): `x86_64`, `aarch64`, ...
    pub arch: String,
    pub virtualisation: Virtualisation,
    /// From `vendor_id` in /proc/cpuinfo (x86 only).
    pub cpu_vendor: Option<CpuVendor>,
}

/// The kinds `systemd-detect-virt` names (and prints in these words), as far as they can be told
/// apart without systemd: nixos-generate-config runs that tool, and decides by its answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Virtualisation {
    /// Bare metal.
    #[default]
    None,
    Kvm,
    Qemu,
    Bochs,
    /// Hyper-V, Azure.
    Microsoft,
    /// VirtualBox.
    Oracle,
    Vmware,
    Xen,
    Amazon,
    Google,
    Parallels,
    Bhyve,
    /// A hypervisor that is none of the above.
    VmOther,
}

impl Virtualisation {
    pub fn is_vm(self) -> bool {
        self != Virtualisation::None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuVendor {
    Intel,
    Amd,
}

/// systemd's `dmi_vendor_table` (src/basic/virt.c, `detect_vm_dmi_vendor`): the first of these
/// files whose value starts with one of the prefixes decides. product_name comes first so that
/// KVM wins over the QEMU its sys_vendor names.
const DMI_FILES: [&str; 5] = [
    "product_name",
    "sys_vendor",
    "board_vendor",
    "bios_vendor",
    "product_version",
];
const DMI_VENDORS: [(&str, Virtualisation); 17] = [
    ("KVM", Virtualisation::Kvm),
    ("OpenStack", Virtualisation::Kvm),
    ("KubeVirt", Virtualisation::Kvm),
    ("Amazon EC2", Virtualisation::Amazon),
    ("QEMU", Virtualisation::Qemu),
    ("VMware", Virtualisation::Vmware),
    ("VMW", Virtualisation::Vmware),
    ("innotek GmbH", Virtualisation::Oracle),
    ("VirtualBox", Virtualisation::Oracle),
    ("Oracle Corporation", Virtualisation::Oracle),
    ("Xen", Virtualisation::Xen),
    ("Bochs", Virtualisation::Bochs),
    ("Parallels", Virtualisation::Parallels),
    ("BHYVE", Virtualisation::Bhyve),
    ("Hyper-V", Virtualisation::Microsoft),
    ("Apple Virtualization", Virtualisation::VmOther),
    ("Google Compute Engine", Virtualisation::Google),
];

impl Machine {
    /// Reads what sysfs and procfs under `root` tell. `arch` comes from
    /// /proc/sys/kernel/arch, which older kernels lack: on the running system,
    /// [`crate::machine::facts::Facts::gather`] replaces it with uname's.
    pub fn read_from(root: &Path) -> Machine {
        // Read by hand rather than through sysinfo: the `hypervisor` flag is here too, which
        // sysinfo does not offer, and its CPU refresh would also read every CPU's times from
        // /proc/stat to learn one vendor string.
        let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        Machine {
            arch: read_trimmed(&root.join("proc/sys/kernel/arch")).unwrap_or_default(),
            virtualisation: detect_virtualisation(root, &cpuinfo),
            cpu_vendor: cpu_vendor(&cpuinfo),
        }
    }

    /// The Nix system the installed NixOS is built for (`nixpkgs.hostPlatform`): the installer's
    /// own, since it runs on the machine it installs. Others are refused while planning, before
    /// anything is written.
    pub fn nix_system(&self) -> Result<String> {
        match self.arch.as_str() {
            "x86_64" => Ok("x86_64-linux".into()),
            "aarch64" => Ok("aarch64-linux".into()),
            other => Err(user_error(
                format!(
                    "This machine's architecture is {:?}; nixos-kexec installs NixOS on x86_64 and aarch64 machines only.",
                    if other.is_empty() { "unknown" } else { other }
                ),
                "install NixOS on this machine another way (https://nixos.org/manual/nixos/stable/#sec-installation).",
            )),
        }
    }
}

/// `vendor_id : GenuineIntel` / `AuthenticAMD`, as nixos-generate-config's `cpuManufacturer`
/// matches it.
fn cpu_vendor(cpuinfo: &str) -> Option<CpuVendor> {
    let line = cpuinfo.lines().find(|l| l.starts_with("vendor_id"))?;
    match line.split_once(':')?.1.trim() {
        "GenuineIntel" => Some(CpuVendor::Intel),
        "AuthenticAMD" => Some(CpuVendor::Amd),
        _ => None,
    }
}

fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// systemd-detect-virt without systemd: its DMI table first (as it does), then what a guest
/// sees of its hypervisor without CPUID: Hyper-V's VMBus, Xen's hypervisor node, virtio devices
/// (only hypervisors of the KVM/QEMU family offer those: QEMU, Firecracker, cloud-hypervisor),
/// and last the `hypervisor` CPU flag (the CPUID bit systemd tests before it reads the vendor).
fn detect_virtualisation(root: &Path, cpuinfo: &str) -> Virtualisation {
    let dmi = |name: &str| read_trimmed(&root.join("sys/class/dmi/id").join(name));
    for file in DMI_FILES {
        let Some(value) = dmi(file) else { continue };
        if let Some((_, kind)) = DMI_VENDORS.iter().find(|(prefix, _)| value.starts_with(prefix)) {
            // EC2 bare-metal instances carry the same vendor; systemd tells them by the
            // product name (`.metal`, `.metal-24xl`) when it cannot read the SMBIOS VM bit.
            let metal = dmi("product_name").is_some_and(|p| {
                p.split_once(".metal")
                    .is_some_and(|(_, rest)| rest.is_empty() || rest.starts_with('-'))
            });
            if *kind == Virtualisation::Amazon && metal {
                return Virtualisation::None;
            }
            return *kind;
        }
    }
    // Hyper-V and Azure VMs: "Microsoft Corporation" / "Virtual Machine" in DMI (systemd knows
    // them from CPUID), and the VMBus every synthetic device hangs off.
    if (dmi("sys_vendor").as_deref() == Some("Microsoft Corporation")
        && dmi("product_name").as_deref() == Some("Virtual Machine"))
        || has_entries(&root.join("sys/bus/vmbus/devices"))
    {
        return Virtualisation::Microsoft;
    }
    // Xen PV guests have no DMI. A dom0 runs on the hardware (systemd counts it as none too).
    if read_trimmed(&root.join("sys/hypervisor/type")).as_deref() == Some("xen") {
        let dom0 = read_trimmed(&root.join("proc/xen/capabilities"))
            .is_some_and(|caps| caps.split(',').any(|c| c.trim() == "control_d"));
        if !dom0 {
            return Virtualisation::Xen;
        }
    }
    if has_entries(&root.join("sys/bus/virtio/devices")) {
        return Virtualisation::Kvm;
    }
    let hypervisor_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|flag| flag == "hypervisor"));
    if hypervisor_flag {
        return Virtualisation::VmOther;
    }
    Virtualisation::None
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A fake root with the given files (path relative to the root, contents).
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme sse2 hypervisor\n";
    const AMD_METAL: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu svm sse2\n";

    pub fn qemu_vm() -> Machine {
        Machine {
            arch: "x86_64".into(),
            virtualisation: Virtualisation::Kvm,
            cpu_vendor: Some(CpuVendor::Intel),
        }
    }

    #[test]
    fn qemu_and_kvm_from_dmi() {
        // QEMU's PC machine: the vendor says QEMU, the product says nothing.
        let root = tree(&[
            ("sys/class/dmi/id/sys_vendor", "QEMU\n"),
            (
                "sys/class/dmi/id/product_name",
                "Standard PC (i440FX + PIIX, 1996)\n",
            ),
            ("sys/class/dmi/id/bios_vendor", "SeaBIOS\n"),
            ("proc/cpuinfo", INTEL),
            ("proc/sys/kernel/arch", "x86_64\n"),
        ]);
        let machine = Machine::read_from(root.path());
        assert_eq!(machine.virtualisation, Virtualisation::Qemu);
        assert_eq!(machine.cpu_vendor, Some(CpuVendor::Intel));
        assert_eq!(machine.arch, "x86_64");
        // OpenStack (and libvirt with KVM) name the product; it is read first.
        let root = tree(&[
            ("sys/class/dmi/id/sys_vendor", "QEMU"),
            ("sys/class/dmi/id/product_name", "OpenStack Nova"),
        ]);
        assert_eq!(
            Machine::read_from(root.path()).virtualisation,
            Virtualisation::Kvm
        );
    }

    #[test]
    fn hyperv_vmware_virtualbox_and_ec2() {
        for (files, expected) in [
            (
                vec![
                    ("sys/class/dmi/id/sys_vendor", "Microsoft Corporation"),
                    ("sys/class/dmi/id/product_name", "Virtual Machine"),
                ],
                Virtualisation::Microsoft,
            ),
            (
                vec![(
                    "sys/bus/vmbus/devices/f8b3781b-1e82-4818-a1c3-63d806ec15bb/uevent",
                    "",
                )],
                Virtualisation::Microsoft,
            ),
            (
                vec![("sys/class/dmi/id/sys_vendor", "VMware, Inc.")],
                Virtualisation::Vmware,
            ),
            (
                vec![("sys/class/dmi/id/product_name", "VirtualBox")],
                Virtualisation::Oracle,
            ),
            (
                vec![
                    ("sys/class/dmi/id/sys_vendor", "Amazon EC2"),
                    ("sys/class/dmi/id/product_name", "t3.micro"),
                ],
                Virtualisation::Amazon,
            ),
            (
                vec![
                    ("sys/class/dmi/id/sys_vendor", "Amazon EC2"),
                    ("sys/class/dmi/id/product_name", "c5.metal"),
                ],
                Virtualisation::None,
            ),
            (vec![("sys/hypervisor/type", "xen")], Virtualisation::Xen),
            (
                vec![
                    ("sys/hypervisor/type", "xen"),
                    ("proc/xen/capabilities", "control_d"),
                ],
                Virtualisation::None,
            ),
        ] {
            let root = tree(&files);
            assert_eq!(
                Machine::read_from(root.path()).virtualisation,
                expected,
                "{files:?}"
            );
        }
    }

    #[test]
    fn virtio_or_the_hypervisor_flag_without_dmi() {
        // aarch64 and microVMs often have no DMI at all.
        let root = tree(&[("sys/bus/virtio/devices/virtio0/uevent", "")]);
        assert_eq!(
            Machine::read_from(root.path()).virtualisation,
            Virtualisation::Kvm
        );
        let root = tree(&[("proc/cpuinfo", INTEL)]);
        assert_eq!(
            Machine::read_from(root.path()).virtualisation,
            Virtualisation::VmOther
        );
    }

    #[test]
    fn bare_metal_amd() {
        let root = tree(&[
            ("sys/class/dmi/id/sys_vendor", "Supermicro"),
            ("sys/class/dmi/id/product_name", "Super Server"),
            (
                "sys/class/dmi/id/bios_vendor",
                "American Megatrends International, LLC.",
            ),
            ("sys/bus/virtio/devices/.keep", ""),
            ("proc/cpuinfo", AMD_METAL),
        ]);
        std::fs::remove_file(root.path().join("sys/bus/virtio/devices/.keep")).unwrap();
        let machine = Machine::read_from(root.path());
        assert_eq!(machine.virtualisation, Virtualisation::None);
        assert!(!machine.virtualisation.is_vm());
        assert_eq!(machine.cpu_vendor, Some(CpuVendor::Amd));
        assert_eq!(cpu_vendor("vendor_id : CentaurHauls\n"), None);
        assert_eq!(cpu_vendor(""), None);
    }

    #[test]
    fn nix_system_of_the_architecture() {
        let mut machine = qemu_vm();
        assert_eq!(machine.nix_system().unwrap(), "x86_64-linux");
        machine.arch = "aarch64".into();
        assert_eq!(machine.nix_system().unwrap(), "aarch64-linux");
        for arch in ["riscv64", "i686", ""] {
            machine.arch = arch.into();
            let err = machine.nix_system().unwrap_err();
            let user = crate::error::as_user_error(&err).unwrap();
            assert!(user.problem.contains("x86_64 and aarch64"), "{user}");
        }
    }

    #[test]
    fn serialises_as_systemd_names() {
        assert_eq!(
            serde_json::to_string(&Virtualisation::VmOther).unwrap(),
            "\"vm-other\""
        );
        assert_eq!(
            serde_json::to_string(&Virtualisation::Microsoft).unwrap(),
            "\"microsoft\""
        );
    }
}
