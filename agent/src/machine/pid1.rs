//! Duties of the agent when the kernel starts it as `/init`: the filesystems a system needs,
//! a console, kernel modules, reaping orphans, and never exiting (an exiting PID 1 panics the
//! kernel, which would reboot a machine whose install just failed).

use crate::installer::status::RunResult;
use crate::machine::kmod::{self, ModuleIndex};
use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Set in the environment of the re-executed init so the move happens once.
const ROOT_MOVED: &str = "NIXOS_KEXEC_ROOT_MOVED";
const NEW_ROOT: &str = "/.nixos-kexec-root";

/// Moves the initramfs onto a tmpfs and re-executes `/init` there, as switch_root does.
/// Nix's build sandbox calls pivot_root(2), which the kernel refuses while `/` is the
/// initramfs (rootfs), so `nixos-install` could not build anything without this. Files are
/// deleted from the initramfs as they are copied, so RAM use does not double.
pub fn move_root_to_tmpfs() -> Result<()> {
    if std::env::var_os(ROOT_MOVED).is_some() {
        return Ok(());
    }
    std::fs::create_dir_all(NEW_ROOT).with_context(|| format!("creating {NEW_ROOT}"))?;
    // It takes all the initramfs holds (freed as it is copied), which may be more than tmpfs's
    // default of half the RAM: the dev bundle with Nix unpacks to ~100 MB, and boots in
    // 256 MiB with rootfstype=ramfs (the kernel's own tmpfs rootfs has that half-RAM limit).
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755,size=100%"),
    )
    .with_context(|| format!("mounting a tmpfs on {NEW_ROOT}"))?;
    move_tree(Path::new("/"), Path::new(NEW_ROOT), Path::new(NEW_ROOT))?;
    std::env::set_current_dir(NEW_ROOT).with_context(|| format!("entering {NEW_ROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the new root onto /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    std::env::set_current_dir("/").context("entering the new root")?;
    let init = std::ffi::CString::new("/init").unwrap_or_default();
    let env: Vec<std::ffi::CString> = std::env::vars()
        .chain([(ROOT_MOVED.to_string(), "1".to_string())])
        .filter_map(|(k, v)| std::ffi::CString::new(format!("{k}={v}")).ok())
        .collect();
    nix::unistd::execve(&init, std::slice::from_ref(&init), &env)
        .context("re-executing /init on the new root")?;
    Ok(())
}

/// Copies `from` into `to` (files, directories, symlinks, device nodes) with their modes and
/// owners (the operator's extra files keep theirs), removing each source entry once copied;
/// `skip` (the destination itself) is left alone.
pub fn move_tree(from: &Path, to: &Path, skip: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry.with_context(|| format!("listing {}", from.display()))?;
        let source = entry.path();
        if source == skip {
            continue;
        }
        let target = to.join(entry.file_name());
        let meta =
            std::fs::symlink_metadata(&source).with_context(|| format!("reading {}", source.display()))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
            move_tree(&source, &target, skip)?;
            keep_owner_and_mode(&target, &meta)?;
            let _ = std::fs::remove_dir(&source);
        } else if kind.is_symlink() {
            let link =
                std::fs::read_link(&source).with_context(|| format!("reading link {}", source.display()))?;
            std::os::unix::fs::symlink(&link, &target)
                .with_context(|| format!("creating link {}", target.display()))?;
            std::os::unix::fs::lchown(&target, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("setting the owner of {}", target.display()))?;
            let _ = std::fs::remove_file(&source);
        } else if kind.is_file() {
            std::fs::copy(&source, &target).with_context(|| format!("copying {}", source.display()))?;
            keep_owner_and_mode(&target, &meta)?;
            let _ = std::fs::remove_file(&source);
        } else if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            let mode = nix::sys::stat::Mode::from_bits_truncate(meta.mode());
            let sflag = nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
            nix::sys::stat::mknod(&target, sflag, mode, meta.rdev())
                .with_context(|| format!("creating node {}", target.display()))?;
            keep_owner_and_mode(&target, &meta)?;
            let _ = std::fs::remove_file(&source);
        }
    }
    Ok(())
}

/// Gives `target` the owner and mode `source` had: the owner first, since chown(2) clears the
/// setuid and setgid bits.
fn keep_owner_and_mode(target: &Path, source: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::os::unix::fs::lchown(target, Some(source.uid()), Some(source.gid()))
        .with_context(|| format!("setting the owner of {}", target.display()))?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(source.mode() & 0o7777))
        .with_context(|| format!("setting the mode of {}", target.display()))
}

/// Mounts proc, sys, dev (with pts and shm), run and tmp, and attaches stdin/stdout/stderr to /dev/console
/// (an initramfs without a /dev/console node starts init with none).
pub fn mount_basics() -> Result<()> {
    for (source, target, fstype, options) in [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", None),
        // What a booted system has and nixos-enter bind-mounts into the target (Nix's build
        // sandbox gives builds /dev/pts and /dev/shm when they exist).
        ("devpts", "/dev/pts", "devpts", Some("mode=0620,ptmxmode=0666")),
        ("tmpfs", "/dev/shm", "tmpfs", Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
    ] {
        std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
        match mount(Some(source), target, Some(fstype), MsFlags::MS_NOSUID, options) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(e).with_context(|| format!("mounting {fstype} on {target}")),
        }
    }
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; the console file stays open until then.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    std::env::set_var("PATH", "/bin:/sbin:/usr/bin:/usr/sbin:/run/current-system/sw/bin");
    std::env::set_var("HOME", "/root");
    Ok(())
}

/// Where the kernel finds its modprobe: a link named `modprobe` to this binary, which then acts
/// as one (see [`kmod::modprobe_main`]).
const MODPROBE_LINK: &str = "/run/nixos-kexec/modprobe";

/// Lets the kernel load modules on demand, as on a booted system: `xts(aes)` needs `ecb` on a
/// CPU without AES-NI, vfat needs its NLS tables, cryptsetup needs `af_alg`. Without this only
/// the fixed list loads and everything else fails with ENOENT.
pub fn enable_module_autoloading() -> Result<()> {
    let agent = std::env::current_exe().context("finding the agent's own path")?;
    let link = Path::new(MODPROBE_LINK);
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&agent, link)
        .with_context(|| format!("linking {MODPROBE_LINK} to {}", agent.display()))?;
    std::fs::write("/proc/sys/kernel/modprobe", format!("{MODPROBE_LINK}\n"))
        .context("setting /proc/sys/kernel/modprobe")?;
    Ok(())
}

/// What `nixos-install`, `nixos-enter` and the boot-loader installers expect of a booted system
/// beyond the basic mounts: efivarfs under UEFI (bootctl and GRUB write boot entries there) and
/// `/etc/mtab`.
pub fn mount_booted_system_extras() -> Result<()> {
    if Path::new("/sys/firmware/efi").is_dir() {
        let efivars = "/sys/firmware/efi/efivars";
        // Loaded explicitly too: autoloading may be off if setting it up failed.
        if let Ok(index) = ModuleIndex::for_running_kernel() {
            let _ = index.insert("efivarfs");
        }
        match mount(
            Some("efivarfs"),
            efivars,
            Some("efivarfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(e).with_context(|| format!("mounting efivarfs on {efivars}")),
        }
    }
    let mtab = Path::new("/etc/mtab");
    if mtab.symlink_metadata().is_err() {
        std::fs::create_dir_all("/etc").context("creating /etc")?;
        std::os::unix::fs::symlink("../proc/self/mounts", mtab).context("linking /etc/mtab")?;
    }
    Ok(())
}

/// Loads the modules listed in /etc/modules-load.d, then waits for disks to settle
/// (NVMe and SCSI probe asynchronously).
pub fn load_modules() -> Result<()> {
    let names = kmod::names_from_load_d(Path::new("/etc/modules-load.d"));
    if names.is_empty() {
        return Ok(());
    }
    let index = ModuleIndex::for_running_kernel()?;
    let mut failed = Vec::new();
    for name in &names {
        // A module for absent hardware refuses with ENODEV; that is expected, not a failure.
        if let Err(e) = index.insert(name) {
            if e.root_cause().downcast_ref::<nix::errno::Errno>() != Some(&nix::errno::Errno::ENODEV) {
                failed.push(format!("{name} ({e:#})"));
            }
        }
    }
    if !failed.is_empty() {
        log::warn!("modules not loaded: {}", failed.join("; "));
    }
    log::info!("loaded kernel modules: {}", names.join(" "));
    wait_for_block_devices_to_settle();
    Ok(())
}

fn wait_for_block_devices_to_settle() {
    let list = || {
        std::fs::read_dir("/sys/block")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let start = Instant::now();
    let mut last = list();
    let mut stable_since = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(250));
        let now = list();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(1500) {
            break;
        }
    }
}

/// Runs `work` in a child and reaps every process until the end of time. `work` ends the
/// machine itself (reboot/poweroff) when it succeeds; after a failure we stay up so the
/// operator can read the console.
pub fn supervise(work: impl FnOnce() -> i32) -> ! {
    // SAFETY: called before any thread exists, so the child's copy of the process is consistent.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => std::process::exit(work()),
        Ok(ForkResult::Parent { child }) => reap_forever(child),
        Err(e) => {
            crate::console::line(&format!("cannot fork ({e}); running in PID 1 itself"));
            work();
            reap_forever(Pid::from_raw(0))
        }
    }
}

/// Ends the run as PID 1 with `why`, then does `then` (the way back, which reboots or returns)
/// and stays: an exiting PID 1 would panic the kernel and reboot a machine whose console the
/// operator has not read yet.
pub fn stop(why: &str, then: impl FnOnce()) -> ! {
    crate::console::end_partial_line();
    crate::console::line(&RunResult::Failure(why.to_string()).line());
    then();
    reap_forever(Pid::from_raw(0))
}

fn reap_forever(agent: Pid) -> ! {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                let result = RunResult::Failure(format!("the agent was killed by {signal:?}"));
                crate::console::line(&result.line());
                crate::installer::status::record(crate::installer::status::Status::Finished {
                    result: result.text(),
                });
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_secs(3600)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_tree_moves_files_links_and_modes() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let f = from.path();
        std::fs::create_dir_all(f.join("bin")).unwrap();
        std::fs::write(f.join("bin/busybox"), b"elf").unwrap();
        std::fs::set_permissions(
            f.join("bin/busybox"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("busybox", f.join("bin/sh")).unwrap();
        std::fs::create_dir_all(f.join("tmp")).unwrap();
        std::fs::set_permissions(
            f.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        // The operator's extra files: a key of uid 1000 in its 0700 directory, a setuid helper.
        std::fs::create_dir_all(f.join("extra/.ssh")).unwrap();
        std::fs::write(f.join("extra/.ssh/key"), b"key").unwrap();
        std::os::unix::fs::chown(f.join("extra/.ssh/key"), Some(1000), Some(100)).unwrap();
        std::os::unix::fs::chown(f.join("extra/.ssh"), Some(1000), Some(100)).unwrap();
        std::fs::set_permissions(
            f.join("extra/.ssh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(f.join("extra/helper"), b"elf").unwrap();
        std::os::unix::fs::chown(f.join("extra/helper"), Some(0), Some(50)).unwrap();
        std::fs::set_permissions(
            f.join("extra/helper"),
            std::os::unix::fs::PermissionsExt::from_mode(0o6755),
        )
        .unwrap();
        std::os::unix::fs::symlink("key", f.join("extra/.ssh/link")).unwrap();
        std::os::unix::fs::lchown(f.join("extra/.ssh/link"), Some(1000), Some(100)).unwrap();
        move_tree(f, to.path(), to.path()).unwrap();
        let t = to.path();
        let owner = |p: &Path| {
            let meta = std::fs::symlink_metadata(p).unwrap();
            (
                std::os::unix::fs::MetadataExt::uid(&meta),
                std::os::unix::fs::MetadataExt::gid(&meta),
            )
        };
        assert_eq!(owner(&t.join("extra/.ssh/key")), (1000, 100));
        assert_eq!(owner(&t.join("extra/.ssh")), (1000, 100));
        assert_eq!(owner(&t.join("extra/.ssh/link")), (1000, 100));
        assert_eq!(owner(&t.join("extra/helper")), (0, 50));
        assert_eq!(std::fs::read(t.join("bin/busybox")).unwrap(), b"elf");
        assert_eq!(
            std::fs::read_link(t.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o7777
        };
        assert_eq!(mode(&t.join("bin/busybox")), 0o755);
        assert_eq!(mode(&t.join("tmp")), 0o1777);
        assert_eq!(mode(&t.join("extra/.ssh")), 0o700);
        assert_eq!(
            mode(&t.join("extra/helper")),
            0o6755,
            "chown must not clear setuid/setgid"
        );
        assert!(!f.join("bin").exists(), "sources are removed as they are copied");
    }
}
