//! Loading the installer kernel and rebooting into it, natively (no kexec-tools needed), with
//! a fallback to a `kexec` binary where the kernel only has the old kexec_load syscall.

use crate::error::user_error;
use crate::machine::runner;
use anyhow::{Context, Result};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

/// The combined initrd in anonymous memory, so the rescue system needs no writable disk space.
pub fn memfd_with(parts: &[&[u8]]) -> Result<File> {
    let fd = memfd_create(c"nixos-kexec-initrd", MemFdCreateFlag::MFD_CLOEXEC)
        .context("creating an in-memory file for the initrd")?;
    let mut file = File::from(fd);
    for part in parts {
        file.write_all(part).context("writing the initrd to memory")?;
    }
    Ok(file)
}

/// A path another program can open `file` by. Not `/proc/self/fd/N`: in the child that names
/// the child's own descriptors, and the memfd is close-on-exec there.
pub fn path_for_children(file: &File) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()))
}

/// Pads an initrd to a 4-byte boundary so an appended archive starts where the kernel looks.
pub fn pad4(mut initrd: Vec<u8>) -> Vec<u8> {
    while !initrd.len().is_multiple_of(4) {
        initrd.push(0);
    }
    initrd
}

/// The bundle's kernel file: what kexec_file_load takes on this architecture. x86_64 loads a
/// bzImage; arm64 loads only an uncompressed `Image` (arch/arm64/kernel/kexec_image.c checks
/// its header; so does [`crate::rescue::kexec_arm64`]), which some distributions ship gzipped,
/// so bundles carry it unpacked under this name (kexec-bundle/build-dev, nix/bundle.nix).
#[cfg(target_arch = "aarch64")]
pub const KERNEL_FILE: &str = "Image";
#[cfg(not(target_arch = "aarch64"))]
pub const KERNEL_FILE: &str = "bzImage";

/// The serial console this architecture's machines have when the running kernel names none:
/// the 8250 UART's ttyS0 on x86, the PL011's ttyAMA0 on arm64 (QEMU's virt machine, most
/// arm64 servers and clouds).
#[cfg(target_arch = "aarch64")]
pub const DEFAULT_SERIAL: &str = "ttyAMA0";
#[cfg(not(target_arch = "aarch64"))]
pub const DEFAULT_SERIAL: &str = "ttyS0";

/// kexec_file_load's number. The libc crate names it for x86_64 but not for musl on aarch64,
/// where it is 294 in the kernel's generic table (include/uapi/asm-generic/unistd.h).
#[cfg(target_arch = "aarch64")]
const SYS_KEXEC_FILE_LOAD: libc::c_long = 294;
#[cfg(not(target_arch = "aarch64"))]
const SYS_KEXEC_FILE_LOAD: libc::c_long = libc::SYS_kexec_file_load;

/// Loads kernel + initrd + command line with kexec_file_load. The kernel copies everything,
/// so the files can be closed afterwards.
pub fn load(kernel: &Path, initrd: &File, cmdline: &str) -> Result<()> {
    let kernel_file = File::open(kernel).with_context(|| format!("opening {}", kernel.display()))?;
    let cmdline_c = CString::new(cmdline).context("the kernel command line contains a NUL byte")?;
    // The length passed must include the trailing NUL.
    let len = cmdline_c.as_bytes_with_nul().len();
    // SAFETY: the syscall reads the two descriptors and `len` bytes of the NUL-terminated line.
    let rc = unsafe {
        libc::syscall(
            SYS_KEXEC_FILE_LOAD,
            kernel_file.as_raw_fd(),
            initrd.as_raw_fd(),
            len as libc::c_ulong,
            cmdline_c.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    let reason = match error.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no kexec_file_load (CONFIG_KEXEC_FILE is off)",
        Some(libc::EPERM) => "the kernel refused: not root, kexec disabled (kernel.kexec_load_disabled), or lockdown/Secure Boot",
        Some(libc::EKEYREJECTED) | Some(libc::EBADMSG) | Some(libc::ENOKEY) => {
            "the kernel requires a signed kernel image (Secure Boot / KEXEC_SIG)"
        }
        _ => "the kernel refused to load the installer",
    };
    Err(user_error(
        format!("kexec_file_load failed: {reason} ({error})."),
        fallback_hint(),
    ))
}

fn fallback_hint() -> &'static str {
    "install kexec-tools on the rescue system (a `kexec` binary is used automatically), disable Secure Boot, or boot the installer by PXE or GRUB instead (see the README)."
}

/// Loads with the `kexec` binary (kexec_load), for kernels without kexec_file_load.
pub fn load_with_binary(kernel: &Path, initrd_path: &Path, cmdline: &str) -> Result<()> {
    let kexec = ["/sbin/kexec", "/usr/sbin/kexec", "/bin/kexec", "/usr/bin/kexec"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            user_error(
                "No kexec_file_load and no kexec binary on this system.",
                fallback_hint(),
            )
        })?;
    let mut command = Command::new(kexec);
    command
        .arg("-l")
        .arg(kernel)
        .arg(format!("--initrd={}", initrd_path.display()))
        .arg(format!("--command-line={cmdline}"));
    runner::run(&mut command).map(|_| ())
}

/// Reboots into the loaded kernel. Does not return on success.
pub fn reboot_into_loaded() -> Result<()> {
    nix::unistd::sync();
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC).context("reboot(RB_KEXEC)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `kexec` binary gets the initrd by path: a child process must be able to read the
    /// close-on-exec memfd through it.
    #[test]
    fn a_child_process_reads_the_memfd_initrd_by_its_path() {
        let file = memfd_with(&[b"0707", b"01-initrd"]).unwrap();
        let path = path_for_children(&file);
        let output = runner::run(Command::new("cat").arg(&path)).unwrap();
        assert_eq!(output, "070701-initrd");
        let own = format!("/proc/self/fd/{}", file.as_raw_fd());
        assert!(
            runner::run(Command::new("cat").arg(&own)).is_err(),
            "{own} should not be readable by the child (close-on-exec)"
        );
    }

    #[test]
    fn pad4_aligns_for_an_appended_archive() {
        assert_eq!(pad4(vec![1, 2, 3, 4, 5]).len(), 8);
        assert_eq!(pad4(vec![1, 2, 3, 4]).len(), 4);
    }
}
