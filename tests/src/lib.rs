//! Whole-system test harness for nixos-kexec: builds the development bundle
//! (`kexec-bundle/build-dev`), boots it in QEMU under TCG with disks of chosen buses, sector
//! sizes and serials, captures the serial console, and inspects the disk images afterwards
//! with independent tools.
//!
//! ```no_run
//! use nixos_kexec_tests::*;
//! # fn main() -> anyhow::Result<()> {
//! let bundle = dev_bundle()?;
//! let out = Vm::new(&bundle)
//!     .disk(DiskSpec::new(2 << 30, DiskBus::Virtio).sector(4096).serial("ROOTDISK"))
//!     .param("nixos_kexec.disk=/dev/vda")
//!     .param("nixos_kexec.after=poweroff")
//!     .run()?;
//! out.expect_success()?;
//! sgdisk_verify(&out.disks[0])?;
//! let root = extract_partition(&out.disks[0], 2)?;
//! e2fsck(&root)?;
//! let flake = ext4_read_file(&root, "/etc/nixos/flake.nix")?;
//! # Ok(()) }
//! ```
//!
//! Environment:
//! - `NIXOS_KEXEC_BUNDLE=DIR`: use the bzImage/initrd in DIR as they are (no build).
//! - `NIXOS_KEXEC_BUNDLE_NIX=DIR`: the same for the bundle with Nix ([`dev_bundle_with_nix`]).
//! - `NIXOS_KEXEC_BUNDLE_AARCH64=DIR`: the same for the aarch64 bundle ([`dev_bundle_aarch64`]).
//! - `NIXOS_KEXEC_KEEP_VM=1`: keep each VM's temp dir (disk images, `serial.log`,
//!   `qemu-command`) instead of deleting it.
//! - `NIXOS_KEXEC_ECHO_INSPECT=1`: echo the console of the helper VM used to inspect
//!   4096-byte-sector images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

pub mod config_server;
pub mod cpio;
pub mod fake_github;
pub mod grub_console;
pub mod http_server;
pub mod images;
pub mod inspect;
pub mod loop_mount;
pub mod nix_cache;
pub mod rescue;
pub mod sshd;
pub mod tls;
pub mod tool;
pub mod user_flake;
pub mod vm;

pub use config_server::{ConfigServer, Routes};
pub use cpio::{cpio_from_dir, Cpio};
pub use grub_console::{boot_grub_console, grub_console_iso};
pub use http_server::{FileServer, HttpRequest};
pub use images::{blank_disk, used_disk};
pub use inspect::*;
pub use loop_mount::LoopMount;
pub use nix_cache::{narinfo_url_path, stand_in_cache, StandInCache, StorePath};
pub use tool::{run_tool, run_tool_unchecked, run_tool_with_input, tool, ToolOutput};
pub use vm::{
    AttachedDisk, Console, DiskBus, DiskSpec, Firmware, RunOutcome, Vm, BASE_CMDLINE, RESULT_PREFIX,
};

/// The architecture a bundle is for: it picks QEMU, its machine, firmware and serial console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The bundle's kernel file, as `nixos-kexec run` looks for it: kexec_file_load on arm64
    /// takes only an uncompressed `Image`.
    pub fn kernel_file(self) -> &'static str {
        match self {
            Arch::X86_64 => "bzImage",
            Arch::Aarch64 => "Image",
        }
    }

    /// The serial console the VM's kernel prints to: the 8250's ttyS0 on q35/pc, the PL011's
    /// ttyAMA0 on QEMU's virt machine.
    pub fn serial_console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// `uname -m`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

/// A kernel + initrd to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The kernel: `bzImage` on x86_64, `Image` on aarch64 ([`Arch::kernel_file`]).
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
    /// The directory holding them (and `run-installer`, `inspect-tools.cpio` when present).
    pub dir: PathBuf,
    /// Which kernel file the directory holds.
    pub arch: Arch,
}

impl Bundle {
    /// The bundle in `dir` (`initrd` and a kernel, `bzImage` or arm64's `Image`, must exist).
    pub fn from_dir(dir: &Path) -> Result<Bundle> {
        let arch = [Arch::X86_64, Arch::Aarch64]
            .into_iter()
            .find(|a| dir.join(a.kernel_file()).is_file())
            .with_context(|| format!("no bundle kernel (bzImage or Image) in {}", dir.display()))?;
        let b = Bundle {
            bzimage: dir.join(arch.kernel_file()),
            initrd: dir.join("initrd"),
            dir: dir.to_path_buf(),
            arch,
        };
        if !b.initrd.is_file() {
            bail!("bundle file {} does not exist", b.initrd.display());
        }
        Ok(b)
    }

    /// The test double for nixos-install (`tests/stand-in/nixos-install` with Debian's
    /// boot-loader tools) as an initrd to append, which `kexec-bundle/build-dev --with-nix`
    /// makes beside the bundle: it runs the real Nix, so only the bundle of
    /// [`dev_bundle_with_nix`] has it.
    pub fn stand_in(&self) -> Result<PathBuf> {
        let path = self.dir.join("boot-stand-in.cpio.gz");
        if !path.is_file() {
            bail!(
                "{} is missing: the nixos-install stand-in runs the real Nix, so only the bundle with Nix has it (dev_bundle_with_nix(), kexec-bundle/build-dev --with-nix)",
                path.display()
            );
        }
        Ok(path)
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The development bundle: with `NIXOS_KEXEC_BUNDLE=DIR` that directory as is; otherwise
/// `kexec-bundle/build-dev <target>/dev-bundle`, run once per process and under an exclusive
/// `flock(1)` on `<target>/dev-bundle.lock`, so test binaries running at the same time build
/// it one after the other (a re-run with nothing changed takes a few seconds).
pub fn dev_bundle() -> Result<Bundle> {
    static BUNDLE: OnceLock<std::result::Result<Bundle, String>> = OnceLock::new();
    DevBundle::Plain.get(&BUNDLE)
}

/// The development bundle with Debian's Nix (`build-dev --with-nix`) and the nixos-install
/// test double ([`Bundle::stand_in`]), which runs that Nix: with `NIXOS_KEXEC_BUNDLE_NIX=DIR`
/// that directory as is; otherwise built into `<target>/dev-bundle-nix` as [`dev_bundle`]
/// builds its own, under the same lock.
pub fn dev_bundle_with_nix() -> Result<Bundle> {
    static BUNDLE: OnceLock<std::result::Result<Bundle, String>> = OnceLock::new();
    DevBundle::WithNix.get(&BUNDLE)
}

/// The development bundle for aarch64 (`build-dev --arch aarch64`: Debian's arm64 kernel and
/// tools, the agent cross-built for aarch64-unknown-linux-musl), for QEMU's virt machine: with
/// `NIXOS_KEXEC_BUNDLE_AARCH64=DIR` that directory as is; otherwise built into
/// `<target>/dev-bundle-aarch64` as [`dev_bundle`] builds its own, under the same lock.
pub fn dev_bundle_aarch64() -> Result<Bundle> {
    static BUNDLE: OnceLock<std::result::Result<Bundle, String>> = OnceLock::new();
    DevBundle::Aarch64.get(&BUNDLE)
}

/// The flavours of `kexec-bundle/build-dev`'s bundle.
#[derive(Debug, Clone, Copy)]
enum DevBundle {
    Plain,
    WithNix,
    Aarch64,
}

impl DevBundle {
    /// The environment variable naming a prebuilt bundle of this flavour.
    fn override_var(self) -> &'static str {
        match self {
            DevBundle::Plain => "NIXOS_KEXEC_BUNDLE",
            DevBundle::WithNix => "NIXOS_KEXEC_BUNDLE_NIX",
            DevBundle::Aarch64 => "NIXOS_KEXEC_BUNDLE_AARCH64",
        }
    }

    /// Where under the target directory it is built.
    fn dir_name(self) -> &'static str {
        match self {
            DevBundle::Plain => "dev-bundle",
            DevBundle::WithNix => "dev-bundle-nix",
            DevBundle::Aarch64 => "dev-bundle-aarch64",
        }
    }

    fn build_dev_args(self) -> &'static [&'static str] {
        match self {
            DevBundle::Plain => &[],
            DevBundle::WithNix => &["--with-nix"],
            DevBundle::Aarch64 => &["--arch", "aarch64"],
        }
    }

    /// The bundle, built at most once per process (a failure too is remembered).
    fn get(self, cell: &OnceLock<std::result::Result<Bundle, String>>) -> Result<Bundle> {
        cell.get_or_init(|| self.build().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn build(self) -> Result<Bundle> {
        let var = self.override_var();
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            return Bundle::from_dir(&dir).with_context(|| format!("{var}={}", dir.display()));
        }
        let root = workspace_root();
        let script = root.join("kexec-bundle/build-dev");
        let target = target_dir();
        let out = target.join(self.dir_name());
        // One lock for both flavours: they share build-dev's cache and the agent's build.
        let lock = target.join("dev-bundle.lock");
        std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        let mut command = Command::new("flock");
        command
            .arg(&lock)
            .arg(&script)
            .arg(&out)
            .args(self.build_dev_args())
            .current_dir(&root);
        let name = self.dir_name();
        eprintln!(
            "{name}: running {} (under flock {})",
            tool::command_line(&command),
            lock.display()
        );
        let start = std::time::Instant::now();
        let result =
            run_tool(&mut command).with_context(|| format!("building the development bundle {name}"))?;
        eprintln!("{name}: done in {:.1}s", start.elapsed().as_secs_f64());
        for line in result.stdout_str().lines() {
            eprintln!("{name}: {line}");
        }
        Bundle::from_dir(&out)
    }
}
