//! A GRUB console to boot the installer from, as a person at a serial console would: an ISO
//! whose GRUB stops at `grub>`, and the lines typed there.

use crate::vm::qemu_path;
use crate::{tool, Arch, Bundle, RunOutcome, Vm};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GRUB writes to COM1 itself. Under SeaBIOS it reads COM1 too; under OVMF the firmware's
/// own console driver polls the same UART on a timer and takes typed bytes before GRUB's
/// serial driver sees them (lines arrive with letters missing), so there GRUB reads the EFI
/// console, which is that UART through OVMF.
/// On arm64 there is no COM1: GRUB's console there is AAVMF's, which is the PL011 UART.
pub const GRUB_CFG: &str = "\
if [ \"$grub_cpu\" = arm64 ]; then
  terminal_input console
  terminal_output console
else
  serial --unit=0 --speed=115200
  terminal_output serial
  if [ \"$grub_platform\" = efi ]; then
    terminal_input console
  else
    terminal_input serial
  fi
fi
";

/// An ISO made with grub-mkrescue (hybrid: SeaBIOS boots its El Torito image, OVMF its EFI
/// system partition, and AAVMF the same partition's `BOOTAA64.EFI` when grub-efi-arm64-bin is
/// installed) holding the bundle's kernel (`/bzImage`, or `/Image` for aarch64) and initrd,
/// whose grub.cfg only sets up the serial terminal ([`GRUB_CFG`]), so GRUB stops at `grub>`.
pub fn grub_console_iso(bundle: &Bundle, dir: &Path) -> Result<PathBuf> {
    let iso_root = dir.join("iso");
    std::fs::create_dir_all(iso_root.join("boot/grub"))?;
    std::fs::copy(&bundle.bzimage, iso_root.join(bundle.arch.kernel_file()))?;
    std::fs::copy(&bundle.initrd, iso_root.join("initrd"))?;
    std::fs::write(iso_root.join("boot/grub/grub.cfg"), GRUB_CFG)?;
    let iso = dir.join("grub.iso");
    tool(
        "grub-mkrescue",
        [std::ffi::OsStr::new("-o"), iso.as_os_str(), iso_root.as_os_str()],
    )?;
    Ok(iso)
}

/// Boots `vm` from `iso` (see [`grub_console_iso`]) and types `linux_line`, `initrd /initrd`
/// and `boot` at `grub>` as a person would; fails if GRUB answers a line with an error.
/// The ISO is a CD: on x86 the machine's own (`-cdrom`, with `-boot d`), on the arm64 virt
/// machine, which has no IDE, a SCSI CD on virtio-scsi, booted as removable media by AAVMF.
pub fn boot_grub_console(vm: Vm, iso: &Path, linux_line: String) -> Result<RunOutcome> {
    let cd_args = match vm.arch() {
        Arch::X86_64 => vec![
            "-boot".to_string(),
            "d".into(),
            "-cdrom".into(),
            iso.to_string_lossy().into_owned(),
        ],
        Arch::Aarch64 => vec![
            "-drive".to_string(),
            format!(
                "if=none,id=grubcd,media=cdrom,readonly=on,file={}",
                qemu_path(iso)
            ),
            "-device".into(),
            "virtio-scsi-pci,id=cdscsi".into(),
            "-device".into(),
            "scsi-cd,drive=grubcd,bus=cdscsi.0,bootindex=0".into(),
        ],
    };
    vm.direct_boot(false).qemu_args(cd_args).run_with(move |console| {
        // GRUB polls the UART; one byte every few milliseconds is what a person manages.
        let delay = Duration::from_millis(5);
        // Under TCG, AAVMF takes a minute or two before GRUB starts.
        console.wait_for("grub> ", Duration::from_secs(240))?;
        for line in [linux_line.as_str(), "initrd /initrd"] {
            console.send_slowly(line, delay)?;
            // Enter only once GRUB has echoed the end of the line, so the prompt waited for
            // next is the one after the command, not a redraw of the line being edited.
            let tail: String = line
                .chars()
                .skip(line.chars().count().saturating_sub(8))
                .collect();
            console.wait_for(&tail, Duration::from_secs(30))?;
            console.send("\r")?;
            let seen = console.wait_for("grub> ", Duration::from_secs(120))?;
            if seen.contains("error:") {
                bail!("GRUB refused {line:?}:\n{seen}");
            }
        }
        console.send_slowly("boot", delay)?;
        console.send("\r")?;
        Ok(())
    })
}
