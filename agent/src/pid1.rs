//! Duties of the agent when the kernel starts it as `/init`: the filesystems a system needs,
//! a console, kernel modules, reaping orphans, and never exiting (an exiting PID 1 panics the
//! kernel, which would reboot a machine whose install just failed).

use crate::kmod::{self, ModuleIndex};
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

/// Mounts proc, sys, dev, run and tmp, and attaches stdin/stdout/stderr to /dev/console
/// (an initramfs without a /dev/console node starts init with none).
pub fn mount_basics() -> Result<()> {
    for (source, target, fstype, options) in [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", None),
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

/// Loads the modules listed in /etc/modules-load.d, then waits for disks to settle
/// (NVMe and SCSI probe asynchronously).
pub fn load_modules() -> Result<()> {
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = Path::new("/lib/modules").join(&release);
    let names = kmod::names_from_load_d(Path::new("/etc/modules-load.d"));
    if names.is_empty() {
        return Ok(());
    }
    let index = ModuleIndex::load(&dir)?;
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
            eprintln!("nixos-kexec: cannot fork ({e}); running in PID 1 itself");
            work();
            reap_forever(Pid::from_raw(0))
        }
    }
}

fn reap_forever(agent: Pid) -> ! {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                eprintln!("nixos-kexec: result: failure: the agent was killed by {signal:?}");
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_secs(3600)),
        }
    }
}
