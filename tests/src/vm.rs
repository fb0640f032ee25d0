//! QEMU virtual machines under TCG: direct kernel boot of a bundle, disks, serial console.

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::tool::command_line;
use crate::{Arch, Bundle};

/// The line prefix the agent prints last.
pub const RESULT_PREFIX: &str = "nixos-kexec: result:";

/// Base kernel command line; `Vm::param` appends to it (the kernel takes the last
/// `loglevel=`, so `.param("loglevel=7")` brings back all kernel messages).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 rootfstype=ramfs";

/// x86 COMMAND_LINE_SIZE including the trailing NUL.
pub const COMMAND_LINE_SIZE: usize = 2048;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// EDK2 for QEMU's arm64 virt machine (Debian's qemu-efi-aarch64), 64 MiB pflash images.
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// The console log in the VM's temp dir.
const SERIAL_LOG: &str = "serial.log";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (x86_64 only).
    Bios,
    /// OVMF (`/usr/share/OVMF/OVMF_CODE_4M.fd` + a private copy of `OVMF_VARS_4M.fd`); on
    /// aarch64 AAVMF (`/usr/share/AAVMF/AAVMF_CODE.fd` + a copy of `AAVMF_VARS.fd`).
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-blk-pci` -> `/dev/vdX`, serial in `/sys/block/vdX/serial` (no trailing newline).
    Virtio,
    /// One `nvme` controller per disk -> `/dev/nvmeNn1`, serial in
    /// `/sys/block/nvmeNn1/device/serial` (space-padded to 20 characters).
    Nvme,
    /// `ide-hd` on an `ahci` controller -> `/dev/sdX`; 512-byte sectors only. The serial is in
    /// `/sys/block/sdX/device/vpd_pg80` and in `.../device/wwid`, not in a `serial` file.
    Sata,
    /// `scsi-hd` on a `virtio-scsi-pci` controller -> `/dev/sdX`; 512 or 4096-byte sectors.
    Scsi,
}

impl fmt::Display for DiskBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Nvme => "nvme",
            DiskBus::Sata => "sata",
            DiskBus::Scsi => "scsi",
        };
        f.write_str(s)
    }
}

/// A new, empty (sparse, raw) disk image made for one VM.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub size_bytes: u64,
    pub bus: DiskBus,
    /// 512 or 4096 (physical block size is set to the same).
    pub logical_sector: u32,
    /// Up to 20 printable ASCII characters, no commas. Empty: the harness makes one up
    /// (NVMe requires a serial).
    pub serial: String,
}

impl DiskSpec {
    /// `size_bytes` on `bus`, 512-byte sectors, no serial.
    pub fn new(size_bytes: u64, bus: DiskBus) -> Self {
        DiskSpec {
            size_bytes,
            bus,
            logical_sector: 512,
            serial: String::new(),
        }
    }
    pub fn sector(mut self, logical_sector: u32) -> Self {
        self.logical_sector = logical_sector;
        self
    }
    pub fn serial(mut self, serial: &str) -> Self {
        self.serial = serial.to_string();
        self
    }
}

/// A disk image attached to a VM (as it ended up: the serial actually used, the file).
#[derive(Debug, Clone)]
pub struct AttachedDisk {
    pub path: PathBuf,
    pub bus: DiskBus,
    pub logical_sector: u32,
    pub serial: String,
}

#[derive(Debug, Clone)]
enum DiskSource {
    New(DiskSpec),
    Existing(AttachedDisk),
}

/// A QEMU VM. Build it, then [`Vm::run`] or [`Vm::run_with`].
///
/// ```no_run
/// # use nixos_kexec_tests::*;
/// let bundle = dev_bundle()?;
/// let out = Vm::new(&bundle)
///     .firmware(Firmware::Uefi)
///     .disk(DiskSpec::new(4 << 30, DiskBus::Nvme).serial("S1"))
///     .param("nixos_kexec.disk=/dev/nvme0n1")
///     .run()?;
/// out.expect_success()?;
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Vm {
    name: String,
    arch: Arch,
    kernel: PathBuf,
    initrd: PathBuf,
    firmware: Firmware,
    memory_mib: u32,
    cpus: u32,
    machine: String,
    disks: Vec<DiskSource>,
    params: Vec<String>,
    base_cmdline: String,
    extra_initrds: Vec<PathBuf>,
    nics: Vec<(String, String)>,
    uefi_vars: Option<PathBuf>,
    qemu_args: Vec<String>,
    direct_boot: bool,
    /// `-cpu` model; `None`: QEMU's default (qemu64: no AES-NI, as on many cheap VPS hosts).
    cpu: Option<String>,
    /// Stop QEMU as soon as the console interaction succeeds (a boot that never ends by itself).
    stop_after_interaction: bool,
    timeout: Duration,
    grace: Duration,
    echo: bool,
}

impl Vm {
    /// A VM that boots `bundle`'s bzImage and initrd directly (`-kernel`/`-initrd`), BIOS,
    /// 1024 MiB, one vCPU, q35, no NIC, no disks, 300 s timeout. Its name (used as the
    /// prefix of echoed lines and of its temp dir) defaults to the current thread's name,
    /// which in `cargo test` is the test's name. An aarch64 bundle boots in
    /// `qemu-system-aarch64` on the `virt` machine with a Cortex-A57 under AAVMF (UEFI: arm64
    /// servers have no BIOS), its console on ttyAMA0.
    pub fn new(bundle: &Bundle) -> Self {
        let name = thread::current()
            .name()
            .map(|n| n.rsplit("::").next().unwrap_or(n).to_string())
            .filter(|n| n != "main")
            .unwrap_or_else(|| "vm".to_string());
        let (firmware, machine, cpu) = match bundle.arch {
            Arch::X86_64 => (Firmware::Bios, "q35", "max"),
            // Not `max`: under TCG its pointer authentication (QARMA) is emulated at a great
            // cost on every function return; the A57 has none.
            Arch::Aarch64 => (Firmware::Uefi, "virt", "cortex-a57"),
        };
        Vm {
            name,
            arch: bundle.arch,
            kernel: bundle.bzimage.clone(),
            initrd: bundle.initrd.clone(),
            firmware,
            memory_mib: 1024,
            cpus: 1,
            machine: machine.to_string(),
            disks: Vec::new(),
            params: Vec::new(),
            base_cmdline: BASE_CMDLINE.replace(
                "console=ttyS0",
                &format!("console={}", bundle.arch.serial_console()),
            ),
            extra_initrds: Vec::new(),
            nics: Vec::new(),
            uefi_vars: None,
            qemu_args: Vec::new(),
            direct_boot: true,
            cpu: Some(cpu.to_string()),
            stop_after_interaction: false,
            timeout: Duration::from_secs(300),
            grace: Duration::from_secs(20),
            echo: true,
        }
    }

    /// The architecture of the bundle it boots.
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// Name used in echoed lines (`[name +12.3s] ...`) and the temp dir.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    /// Number of vCPUs (default 1; the host has 2 cores).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }
    /// QEMU machine type, `q35` (default) or `pc`.
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = machine.to_string();
        self
    }
    /// Adds a new empty disk (repeatable; order = order on the command line).
    pub fn disk(mut self, spec: DiskSpec) -> Self {
        self.disks.push(DiskSource::New(spec));
        self
    }
    /// Attaches an existing raw image (used in place, it is not copied).
    pub fn disk_image(
        mut self,
        path: impl AsRef<Path>,
        bus: DiskBus,
        logical_sector: u32,
        serial: &str,
    ) -> Self {
        self.disks.push(DiskSource::Existing(AttachedDisk {
            path: path.as_ref().to_path_buf(),
            bus,
            logical_sector,
            serial: serial.to_string(),
        }));
        self
    }
    /// Appends one kernel parameter (repeatable), e.g. `nixos_kexec.disk=/dev/vda`.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.params.push(param.into());
        self
    }
    /// Replaces [`BASE_CMDLINE`].
    pub fn base_cmdline(mut self, cmdline: &str) -> Self {
        self.base_cmdline = cmdline.to_string();
        self
    }
    /// A cpio archive (compressed or not) appended after the bundle's initrd; files in it
    /// override the bundle's. Repeatable. Each part is padded to 4 bytes as the kernel needs.
    pub fn extra_initrd(mut self, path: impl AsRef<Path>) -> Self {
        self.extra_initrds.push(path.as_ref().to_path_buf());
        self
    }
    /// A user-mode virtio-net NIC with this MAC (repeatable). Without any: `-nic none`.
    pub fn nic(mut self, mac: &str) -> Self {
        self.nics.push((mac.to_string(), String::new()));
        self
    }
    /// A user-mode virtio-net NIC with more `-nic user,...` options, e.g.
    /// `tftp=DIR,bootfile=boot.ipxe` for PXE or `hostfwd=tcp:127.0.0.1:2222-:22`.
    pub fn nic_with(mut self, mac: &str, user_options: &str) -> Self {
        self.nics.push((mac.to_string(), user_options.to_string()));
        self
    }
    /// UEFI only: use this OVMF variable store in place (changes persist, e.g. boot entries
    /// written by an installer, for a second boot) instead of a fresh copy of OVMF_VARS.
    pub fn uefi_vars(mut self, path: impl AsRef<Path>) -> Self {
        self.uefi_vars = Some(path.as_ref().to_path_buf());
        self
    }
    /// Extra raw QEMU arguments (e.g. `-boot n`, `-netdev ...`).
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }
    /// `false`: no `-kernel/-initrd/-append`; the firmware boots from the disks (or network).
    pub fn direct_boot(mut self, direct: bool) -> Self {
        self.direct_boot = direct;
        self
    }
    /// QEMU's default CPU model instead of `max`: no AES-NI, no modern instruction sets.
    pub fn default_cpu(mut self) -> Self {
        self.cpu = None;
        self
    }

    /// Boots the firmware from the attached disks only (no `-kernel`), and stops QEMU once
    /// `f` in [`Vm::run_with`] succeeds: for checking what an installed disk boots into.
    pub fn boot_from_disk(mut self) -> Self {
        self.direct_boot = false;
        self.stop_after_interaction = true;
        self
    }

    /// Stops QEMU once `f` in [`Vm::run_with`] succeeds, for a VM that would run on (a server
    /// a test talked to).
    pub fn stop_after_interaction(mut self) -> Self {
        self.stop_after_interaction = true;
        self
    }

    /// Whole run limit (default 300 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// How long QEMU may take to exit on its own after the result line (default 20 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
    /// Echo console lines to stderr (default true).
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// The kernel command line this VM will get.
    pub fn cmdline(&self) -> String {
        let mut s = self.base_cmdline.clone();
        let has_nvme = self.disks.iter().any(|d| match d {
            DiskSource::New(spec) => spec.bus == DiskBus::Nvme,
            DiskSource::Existing(disk) => disk.bus == DiskBus::Nvme,
        });
        // Harness only, not the product: under TCG on a loaded 2-core CI machine QEMU's NVMe
        // can take longer than the kernel's 30 s I/O timeout to complete a write (seen once,
        // during mkfs.ext4), and the controller reset that follows fails the run. Real NVMe
        // answers in milliseconds; the installer's own command line is left as it is.
        if has_nvme {
            s.push_str(" nvme_core.io_timeout=600");
        }
        for p in &self.params {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(p);
        }
        s
    }

    /// Boots and waits: returns when QEMU exits, or [`Vm::grace`] after the result line if it
    /// does not exit by itself (then it is killed). Fails on timeout, with the log's tail.
    pub fn run(self) -> Result<RunOutcome> {
        self.run_with(|_| Ok(()))
    }

    /// Like [`Vm::run`], but first calls `f` with the serial console while the VM runs (to
    /// wait for prompts and type). When `f` fails, QEMU is killed and the error is returned
    /// with the log's tail.
    pub fn run_with<F>(self, f: F) -> Result<RunOutcome>
    where
        F: FnOnce(&mut Console) -> Result<()>,
    {
        let name = self.name.clone();
        self.run_inner(f).with_context(|| format!("VM `{name}`"))
    }

    fn run_inner<F>(self, f: F) -> Result<RunOutcome>
    where
        F: FnOnce(&mut Console) -> Result<()>,
    {
        let cmdline = self.checked_cmdline()?;
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("nixos-kexec-{}-", sanitize(&self.name)))
            .tempdir()
            .context("creating the VM's temp dir")?;
        let dir = tempdir.path().to_path_buf();
        let attached = self.attach_disks(&dir)?;
        let initrd = self.boot_initrd(&dir)?;
        let (cmd, uefi_vars) = self.qemu_command(&dir, &initrd, &cmdline, &attached)?;
        let mut running = self.start(cmd, &dir)?;
        // The console holds QEMU's stdin, which stays open until QEMU has ended.
        let console = self.interact(&mut running, f)?;
        let status = match self.wait_for_end(&mut running)? {
            Ending::Exited(status) => Some(status),
            Ending::Killed => None,
            Ending::TimedOut { result_seen } => {
                running.kill_and_join();
                return Err(self.timed_out(&running.shared, result_seen, tempdir));
            }
        };
        running.join();
        let duration = running.start.elapsed();
        drop(console);
        self.outcome(&running, status, duration, tempdir, attached, uefi_vars)
    }

    /// The kernel command line, checked against the kernel's limit.
    fn checked_cmdline(&self) -> Result<String> {
        let cmdline = self.cmdline();
        ensure!(
            cmdline.len() < COMMAND_LINE_SIZE,
            "kernel command line is {} bytes, the limit is {} including the NUL: {cmdline}",
            cmdline.len(),
            COMMAND_LINE_SIZE - 1
        );
        Ok(cmdline)
    }

    /// Makes the new disk images in `dir` and checks the existing ones; NVMe disks without a
    /// serial get one (QEMU requires it).
    fn attach_disks(&self, dir: &Path) -> Result<Vec<AttachedDisk>> {
        let mut attached = Vec::new();
        for (i, source) in self.disks.iter().enumerate() {
            let mut disk = match source {
                DiskSource::New(spec) => new_disk_image(i, spec, dir)?,
                DiskSource::Existing(d) => {
                    ensure!(
                        d.path.is_file(),
                        "disk {i}: image {} does not exist",
                        d.path.display()
                    );
                    d.clone()
                }
            };
            if disk.serial.is_empty() && disk.bus == DiskBus::Nvme {
                disk.serial = format!("NVME{i:04}");
            }
            validate_disk(i, &disk)?;
            attached.push(disk);
        }
        Ok(attached)
    }

    /// The initrd to boot: the bundle's, or the bundle's with the extra archives appended.
    fn boot_initrd(&self, dir: &Path) -> Result<PathBuf> {
        if self.extra_initrds.is_empty() {
            return Ok(self.initrd.clone());
        }
        let combined = dir.join("initrd.combined");
        let mut out = File::create(&combined).with_context(|| format!("creating {}", combined.display()))?;
        let mut len = 0u64;
        for part in std::iter::once(&self.initrd).chain(self.extra_initrds.iter()) {
            let pad = (4 - len % 4) % 4;
            out.write_all(&[0u8; 3][..pad as usize])
                .context("padding initrd")?;
            len += pad;
            let mut src =
                File::open(part).with_context(|| format!("opening initrd part {}", part.display()))?;
            len += std::io::copy(&mut src, &mut out)
                .with_context(|| format!("appending {} to {}", part.display(), combined.display()))?;
        }
        Ok(combined)
    }

    /// The QEMU command line for this VM, and the UEFI variable store it uses.
    fn qemu_command(
        &self,
        dir: &Path,
        initrd: &Path,
        cmdline: &str,
        attached: &[AttachedDisk],
    ) -> Result<(Command, Option<PathBuf>)> {
        let mut cmd = Command::new(self.qemu_binary());
        cmd.args(["-name", &sanitize(&self.name)])
            .args(["-accel", "tcg", "-machine", &self.machine])
            .args(["-smp", &self.cpus.to_string(), "-m", &self.memory_mib.to_string()])
            .args(["-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot"]);
        let uefi_vars = match (self.firmware, self.arch) {
            (Firmware::Uefi, _) => Some(self.add_uefi_firmware(&mut cmd, dir)?),
            (Firmware::Bios, Arch::X86_64) => None,
            (Firmware::Bios, Arch::Aarch64) => bail!("aarch64 VMs boot through UEFI (AAVMF) only"),
        };
        if let Some(cpu) = &self.cpu {
            cmd.args(["-cpu", cpu]);
        }
        if self.direct_boot {
            cmd.arg("-kernel")
                .arg(&self.kernel)
                .arg("-initrd")
                .arg(initrd)
                .arg("-append")
                .arg(cmdline);
        }
        self.add_nics(&mut cmd);
        add_disks(&mut cmd, attached);
        cmd.args(&self.qemu_args);
        Ok((cmd, uefi_vars))
    }

    /// `qemu-system-*` for the bundle's architecture.
    fn qemu_binary(&self) -> &'static str {
        match self.arch {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// OVMF's (AAVMF's) code and a variable store (a fresh copy in `dir` unless
    /// [`Vm::uefi_vars`] named one) as pflash drives; returns the variable store.
    fn add_uefi_firmware(&self, cmd: &mut Command, dir: &Path) -> Result<PathBuf> {
        let (code, vars_template, package) = match self.arch {
            Arch::X86_64 => (OVMF_CODE, OVMF_VARS, "ovmf"),
            Arch::Aarch64 => (AAVMF_CODE, AAVMF_VARS, "qemu-efi-aarch64"),
        };
        for f in [code, vars_template] {
            ensure!(
                Path::new(f).is_file(),
                "{f} not found (apt-get install {package})"
            );
        }
        let vars = match &self.uefi_vars {
            Some(v) => {
                ensure!(v.is_file(), "UEFI variable store {} does not exist", v.display());
                v.clone()
            }
            None => {
                let vars = dir.join("OVMF_VARS.fd");
                fs::copy(vars_template, &vars)
                    .with_context(|| format!("copying {vars_template} to {}", vars.display()))?;
                vars
            }
        };
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            qemu_path(Path::new(code))
        ));
        cmd.arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=1,file={}", qemu_path(&vars)));
        Ok(vars)
    }

    /// One user-mode virtio-net NIC per [`Vm::nic`], or `-nic none`.
    fn add_nics(&self, cmd: &mut Command) {
        if self.nics.is_empty() {
            cmd.args(["-nic", "none"]);
        }
        for (mac, opts) in &self.nics {
            let extra = if opts.is_empty() {
                String::new()
            } else {
                format!(",{opts}")
            };
            cmd.arg("-nic")
                .arg(format!("user,model=virtio-net-pci,mac={mac}{extra}"));
        }
    }

    /// Writes `qemu-command` into `dir`, starts QEMU there, and the threads that read its
    /// serial console (into `serial.log`) and its stderr.
    fn start(&self, mut cmd: Command, dir: &Path) -> Result<Running> {
        let command = command_line(&cmd);
        fs::write(dir.join("qemu-command"), format!("{command}\n")).context("writing qemu-command")?;
        if self.echo {
            eprintln!("[{}] starting: {command}", self.name);
        }
        cmd.current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let child = cmd.spawn().with_context(|| {
            let package = match self.arch {
                Arch::X86_64 => "qemu-system-x86",
                Arch::Aarch64 => "qemu-system-arm",
            };
            format!("cannot start `{command}` (apt-get install {package})")
        })?;
        // From here on, dropping `running` stops QEMU.
        let mut running = Running {
            child,
            reader: None,
            err_reader: None,
            shared: Arc::new(Shared::default()),
            start,
        };
        let log_path = dir.join(SERIAL_LOG);
        let log_file = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let stdout = running.child.stdout.take().context("qemu stdout")?;
        let stderr = running.child.stderr.take().context("qemu stderr")?;
        running.reader = Some({
            let shared = running.shared.clone();
            let name = self.name.clone();
            let echo = self.echo;
            thread::Builder::new()
                .name(format!("{}-serial", self.name))
                .spawn(move || serial_reader(stdout, log_file, shared, name, echo, start))
                .context("spawning serial reader")?
        });
        running.err_reader = Some({
            let shared = running.shared.clone();
            let name = self.name.clone();
            let echo = self.echo;
            thread::Builder::new()
                .name(format!("{}-stderr", self.name))
                .spawn(move || stderr_reader(stderr, shared, name, echo))
                .context("spawning stderr reader")?
        });
        Ok(running)
    }

    /// Hands the serial console to `f`. When `f` fails, QEMU is stopped and the error gets the
    /// log's tail.
    fn interact<F>(&self, running: &mut Running, f: F) -> Result<Console>
    where
        F: FnOnce(&mut Console) -> Result<()>,
    {
        let mut console = Console {
            shared: running.shared.clone(),
            stdin: running.child.stdin.take(),
            cursor: 0,
            deadline: running.start + self.timeout,
        };
        if let Err(e) = f(&mut console) {
            running.kill_and_join();
            // Console errors already carry the tail; other errors from `f` get it here.
            let tail = if format!("{e:#}").contains("console lines ---") {
                String::new()
            } else {
                format!("\n{}", running.shared.tail_report(60))
            };
            return Err(e.context(format!("console interaction failed{tail}")));
        }
        Ok(console)
    }

    /// Waits for QEMU to exit by itself; kills it right away after a [`Vm::boot_from_disk`]
    /// interaction, or [`Vm::grace`] after the result line; gives up at [`Vm::timeout`].
    fn wait_for_end(&self, running: &mut Running) -> Result<Ending> {
        if self.stop_after_interaction {
            running.kill_and_wait()?;
            return Ok(Ending::Killed);
        }
        let deadline = running.start + self.timeout;
        loop {
            if let Some(status) = running.child.try_wait().context("waiting for qemu")? {
                return Ok(Ending::Exited(status));
            }
            let now = Instant::now();
            let result_at = running
                .shared
                .state
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .result_at;
            if let Some(at) = result_at {
                if now >= at + self.grace {
                    if self.echo {
                        eprintln!(
                            "[{}] QEMU did not exit within {:?} after the result line; killing it",
                            self.name, self.grace
                        );
                    }
                    running.kill_and_wait()?;
                    return Ok(Ending::Killed);
                }
            }
            if now >= deadline {
                return Ok(Ending::TimedOut {
                    result_seen: result_at.is_some(),
                });
            }
            running.shared.wait_change(Duration::from_millis(100));
        }
    }

    /// The error for a run that reached [`Vm::timeout`], with the log's tail. The temp dir is
    /// kept for a look when `NIXOS_KEXEC_KEEP_VM` asks for it.
    fn timed_out(&self, shared: &Shared, result_seen: bool, tempdir: tempfile::TempDir) -> anyhow::Error {
        let kept = keep_if_asked(tempdir).err();
        anyhow!(
            "timed out after {:?} (no QEMU exit{})\n{}{}",
            self.timeout,
            if result_seen { "" } else { ", no result line" },
            shared.tail_report(60),
            kept.map(|p| format!("\ntemp dir kept at {}", p.display()))
                .unwrap_or_else(|| "\n(NIXOS_KEXEC_KEEP_VM=1 keeps the VM's disks and log)".to_string())
        )
    }

    /// What the run produced, once QEMU has ended; `status` is `None` when it was killed.
    /// QEMU exiting by itself with a failure is an error.
    fn outcome(
        self,
        running: &Running,
        status: Option<ExitStatus>,
        duration: Duration,
        tempdir: tempfile::TempDir,
        attached: Vec<AttachedDisk>,
        uefi_vars: Option<PathBuf>,
    ) -> Result<RunOutcome> {
        let st = running.shared.state.lock().map_err(|_| anyhow!("poisoned"))?;
        let log = st.lines.join("\n") + if st.lines.is_empty() { "" } else { "\n" };
        let result_line = st.result_line.clone();
        let time_to_result = st.result_at.map(|t| t - running.start);
        let qemu_stderr = st.stderr.clone();
        drop(st);

        if let Some(status) = status.filter(|s| !s.success()) {
            bail!(
                "QEMU exited with {status}\n--- qemu stderr ---\n{qemu_stderr}\n{}",
                running.shared.tail_report(60)
            );
        }
        if self.echo {
            eprintln!(
                "[{}] finished after {:.1}s ({}){}",
                self.name,
                duration.as_secs_f64(),
                if status.is_none() {
                    "killed after the result line"
                } else {
                    "QEMU exited by itself"
                },
                result_line.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
            );
        }
        let dir = tempdir.path().to_path_buf();
        let tempdir = keep_if_asked(tempdir).ok();
        Ok(RunOutcome {
            name: self.name,
            log,
            result_line,
            disks: attached.iter().map(|d| d.path.clone()).collect(),
            attached,
            uefi_vars,
            exited_by_itself: status.is_some(),
            exit_status: status,
            duration,
            time_to_result,
            qemu_stderr,
            log_path: dir.join(SERIAL_LOG),
            dir,
            _tempdir: tempdir,
        })
    }
}

/// How a run ended.
enum Ending {
    /// QEMU exited by itself.
    Exited(ExitStatus),
    /// QEMU was killed after the console interaction or the result line (see
    /// [`Vm::wait_for_end`]).
    Killed,
    /// [`Vm::timeout`] passed first.
    TimedOut { result_seen: bool },
}

/// A new sparse image for `spec` in `dir`.
fn new_disk_image(i: usize, spec: &DiskSpec, dir: &Path) -> Result<AttachedDisk> {
    let path = dir.join(format!("disk{i}-{}.img", spec.bus));
    ensure!(
        spec.size_bytes > 0
            && spec
                .size_bytes
                .is_multiple_of(spec.logical_sector.max(512) as u64),
        "disk {i}: size {} is not a positive multiple of the sector size {}",
        spec.size_bytes,
        spec.logical_sector
    );
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(spec.size_bytes)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok(AttachedDisk {
        path,
        bus: spec.bus,
        logical_sector: spec.logical_sector,
        serial: spec.serial.clone(),
    })
}

/// The controllers the disks' buses need, then one drive and device per disk, in order.
fn add_disks(cmd: &mut Command, attached: &[AttachedDisk]) {
    if attached.iter().any(|d| d.bus == DiskBus::Sata) {
        cmd.args(["-device", "ahci,id=sata"]);
    }
    if attached.iter().any(|d| d.bus == DiskBus::Scsi) {
        cmd.args(["-device", "virtio-scsi-pci,id=scsi"]);
    }
    let mut sata_port = 0;
    for (i, d) in attached.iter().enumerate() {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=none,id=disk{i},cache=unsafe,discard=unmap",
            qemu_path(&d.path)
        ));
        let serial = if d.serial.is_empty() {
            String::new()
        } else {
            format!(",serial={}", d.serial)
        };
        let ss = d.logical_sector;
        let blocks = format!(",logical_block_size={ss},physical_block_size={ss}");
        let dev = match d.bus {
            DiskBus::Virtio => format!("virtio-blk-pci,drive=disk{i}{serial}{blocks}"),
            DiskBus::Nvme => format!("nvme,drive=disk{i}{serial}{blocks}"),
            DiskBus::Scsi => format!("scsi-hd,drive=disk{i},bus=scsi.0{serial}{blocks}"),
            DiskBus::Sata => {
                let s = format!("ide-hd,drive=disk{i},bus=sata.{sata_port}{serial}");
                sata_port += 1;
                s
            }
        };
        cmd.arg("-device").arg(dev);
    }
}

/// With `NIXOS_KEXEC_KEEP_VM=1` the dir is kept on disk (`Err(path)`); otherwise the
/// `TempDir` is handed back (and deletes the dir when dropped).
fn keep_if_asked(tempdir: tempfile::TempDir) -> std::result::Result<tempfile::TempDir, PathBuf> {
    match std::env::var("NIXOS_KEXEC_KEEP_VM") {
        Ok(v) if !v.is_empty() && v != "0" => Err(tempdir.keep()),
        _ => Ok(tempdir),
    }
}

fn validate_disk(i: usize, d: &AttachedDisk) -> Result<()> {
    ensure!(
        d.logical_sector == 512 || d.logical_sector == 4096,
        "disk {i}: logical sector size must be 512 or 4096, not {}",
        d.logical_sector
    );
    ensure!(
        !(d.bus == DiskBus::Sata && d.logical_sector != 512),
        "disk {i}: QEMU's ide-hd (SATA) supports 512-byte sectors only; use DiskBus::Scsi for 4096"
    );
    ensure!(
        d.serial.len() <= 20 && d.serial.chars().all(|c| c.is_ascii_graphic() && c != ','),
        "disk {i}: serial {:?} must be at most 20 printable ASCII characters without commas or spaces",
        d.serial
    );
    Ok(())
}

/// QEMU option values separate on commas; a comma in a path is doubled.
pub(crate) fn qemu_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A started QEMU and the threads reading its output; dropping it stops QEMU.
struct Running {
    child: Child,
    reader: Option<JoinHandle<()>>,
    err_reader: Option<JoinHandle<()>>,
    /// What the readers have seen.
    shared: Arc<Shared>,
    /// When QEMU was started.
    start: Instant,
}

impl Running {
    fn kill_and_wait(&mut self) -> Result<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().context("waiting for killed qemu")
    }
    fn kill_and_join(&mut self) {
        let _ = self.kill_and_wait();
        self.join();
    }
    fn join(&mut self) {
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        if let Some(h) = self.err_reader.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Default)]
struct State {
    /// Everything printed so far, escape sequences and `\r` removed.
    text: Vec<u8>,
    /// Complete lines.
    lines: Vec<String>,
    result_line: Option<String>,
    result_at: Option<Instant>,
    stderr: String,
    /// The serial stream ended (QEMU exited or was killed).
    eof: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn wait_change(&self, max: Duration) {
        if let Ok(guard) = self.state.lock() {
            let _ = self.changed.wait_timeout(guard, max);
        }
    }

    fn tail_report(&self, n: usize) -> String {
        let Ok(st) = self.state.lock() else {
            return "(log unavailable)".into();
        };
        let mut lines: Vec<String> = st.lines.iter().rev().take(n).cloned().collect();
        lines.reverse();
        // An unfinished last line (a prompt) is worth showing too.
        let last_nl = st
            .text
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        let partial = String::from_utf8_lossy(&st.text[last_nl..]).into_owned();
        let mut s = format!("--- last {} console lines ---\n{}", lines.len(), lines.join("\n"));
        if !partial.is_empty() {
            s.push('\n');
            s.push_str(&partial);
        }
        if !st.stderr.trim().is_empty() {
            s.push_str(&format!("\n--- qemu stderr ---\n{}", st.stderr.trim_end()));
        }
        s
    }
}

/// Removes ANSI escape sequences and `\r` from a byte stream, across chunk boundaries.
#[derive(Default)]
struct EscapeStripper {
    state: u8, // 0 normal, 1 after ESC, 2 in CSI, 3 in OSC, 4 one more byte (ESC ( X)
}

impl EscapeStripper {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            match self.state {
                0 => match b {
                    0x1b => self.state = 1,
                    b'\r' | 0 => {}
                    _ => out.push(b),
                },
                1 => {
                    self.state = match b {
                        b'[' => 2,
                        b']' => 3,
                        b'(' | b')' | b'#' | b'%' => 4,
                        _ => 0,
                    }
                }
                2 => {
                    if (0x40..=0x7e).contains(&b) {
                        self.state = 0;
                    }
                }
                3 => {
                    if b == 0x07 || b == 0x1b {
                        self.state = 0;
                    }
                }
                _ => self.state = 0,
            }
        }
    }
}

fn serial_reader(
    mut stdout: impl Read,
    mut log: File,
    shared: Arc<Shared>,
    name: String,
    echo: bool,
    start: Instant,
) {
    let mut buf = [0u8; 8192];
    let mut stripper = EscapeStripper::default();
    let mut line_start = 0usize; // offset in state.text of the current unfinished line
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut clean = Vec::with_capacity(n);
        stripper.push(&buf[..n], &mut clean);
        let Ok(mut st) = shared.state.lock() else { break };
        st.text.extend_from_slice(&clean);
        while let Some(pos) = st.text[line_start..].iter().position(|&b| b == b'\n') {
            let end = line_start + pos;
            let line = String::from_utf8_lossy(&st.text[line_start..end]).into_owned();
            line_start = end + 1;
            let _ = writeln!(log, "{line}");
            if echo {
                eprintln!("[{name} +{:.1}s] {line}", start.elapsed().as_secs_f64());
            }
            if line.trim_start().starts_with(RESULT_PREFIX) {
                st.result_line = Some(line.trim().to_string());
                st.result_at = Some(Instant::now());
            }
            st.lines.push(line);
        }
        drop(st);
        shared.changed.notify_all();
    }
    if let Ok(mut st) = shared.state.lock() {
        if line_start < st.text.len() {
            let line = String::from_utf8_lossy(&st.text[line_start..]).into_owned();
            let _ = writeln!(log, "{line}");
            if echo {
                eprintln!("[{name} +{:.1}s] {line}", start.elapsed().as_secs_f64());
            }
            if line.trim_start().starts_with(RESULT_PREFIX) {
                st.result_line = Some(line.trim().to_string());
                st.result_at = Some(Instant::now());
            }
            st.lines.push(line);
        }
        st.eof = true;
    }
    shared.changed.notify_all();
}

fn stderr_reader(mut stderr: impl Read, shared: Arc<Shared>, name: String, echo: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let s = String::from_utf8_lossy(&buf[..n]).into_owned();
        if echo {
            for l in s.lines() {
                eprintln!("[{name} qemu-stderr] {l}");
            }
        }
        if let Ok(mut st) = shared.state.lock() {
            st.stderr.push_str(&s);
        }
    }
}

/// The serial console of a running VM (see [`Vm::run_with`]).
pub struct Console {
    shared: Arc<Shared>,
    stdin: Option<ChildStdin>,
    cursor: usize,
    deadline: Instant,
}

impl Console {
    /// Waits until `pattern` appears in the console output after the previous match (escape
    /// sequences and `\r` removed; partial lines such as `grub> ` count). Returns the output
    /// from the previous match up to and including this one. Fails on timeout, when QEMU
    /// exits first, or at the VM's own timeout.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_any(&[pattern], timeout).map(|(_, s)| s)
    }

    /// Like [`Console::wait_for`] with several patterns; returns the index of the one seen
    /// first (earliest in the output) and the output up to its end.
    pub fn wait_for_any(&mut self, patterns: &[&str], timeout: Duration) -> Result<(usize, String)> {
        ensure!(!patterns.is_empty(), "wait_for_any: no patterns");
        let deadline = (Instant::now() + timeout).min(self.deadline);
        let mut guard = self
            .shared
            .state
            .lock()
            .map_err(|_| anyhow!("console state poisoned"))?;
        loop {
            let hay = &guard.text[self.cursor..];
            let best = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.is_empty())
                .filter_map(|(i, p)| find(hay, p.as_bytes()).map(|pos| (pos, i, p.len())))
                .min();
            if let Some((pos, i, len)) = best {
                let end = self.cursor + pos + len;
                let seen = String::from_utf8_lossy(&guard.text[self.cursor..end]).into_owned();
                self.cursor = end;
                return Ok((i, seen));
            }
            if guard.eof {
                drop(guard);
                bail!(
                    "QEMU exited before {patterns:?} appeared\n{}",
                    self.shared.tail_report(60)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(guard);
                bail!(
                    "timed out after {timeout:?} waiting for {patterns:?}\n{}",
                    self.shared.tail_report(60)
                );
            }
            guard = self
                .shared
                .changed
                .wait_timeout(guard, deadline - now)
                .map_err(|_| anyhow!("console state poisoned"))?
                .0;
        }
    }

    /// Types `text` as is.
    pub fn send(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("console input is closed")?;
        stdin
            .write_all(text.as_bytes())
            .context("writing to the VM's serial console")?;
        stdin.flush().context("flushing the VM's serial console")
    }

    /// Types `text` one byte at a time with `delay` between bytes (for firmware and boot
    /// loaders that poll the UART and may drop fast input).
    pub fn send_slowly(&mut self, text: &str, delay: Duration) -> Result<()> {
        for b in text.as_bytes() {
            let stdin = self.stdin.as_mut().context("console input is closed")?;
            stdin
                .write_all(&[*b])
                .context("writing to the VM's serial console")?;
            stdin.flush().context("flushing the VM's serial console")?;
            thread::sleep(delay);
        }
        Ok(())
    }

    /// Types `line` followed by Enter (`\r`).
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        self.send(&format!("{line}\r"))
    }

    /// Everything printed so far (escape sequences removed).
    pub fn output(&self) -> String {
        self.shared
            .state
            .lock()
            .map(|st| String::from_utf8_lossy(&st.text).into_owned())
            .unwrap_or_default()
    }

    /// Closes the console input (the guest sees EOF on the serial line only as silence).
    pub fn close_input(&mut self) {
        self.stdin = None;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a VM run produced. Holds the VM's temp dir (disk images, `serial.log`,
/// `qemu-command`) until dropped; set `NIXOS_KEXEC_KEEP_VM=1` to keep it afterwards.
#[derive(Debug)]
pub struct RunOutcome {
    pub name: String,
    /// All console lines (escape sequences and `\r` removed), `\n`-terminated.
    pub log: String,
    /// The last line starting with `nixos-kexec: result:`, trimmed.
    pub result_line: Option<String>,
    /// The disk image files, in the order they were attached.
    pub disks: Vec<PathBuf>,
    /// The same disks with bus, sector size and serial.
    pub attached: Vec<AttachedDisk>,
    /// UEFI: the OVMF variable store the VM used (pass it to [`Vm::uefi_vars`] to boot again
    /// with the same NVRAM).
    pub uefi_vars: Option<PathBuf>,
    /// QEMU exited on its own (poweroff, reboot with `-no-reboot`, panic with `panic=-1`).
    pub exited_by_itself: bool,
    /// QEMU's exit status when it exited on its own.
    pub exit_status: Option<ExitStatus>,
    pub duration: Duration,
    /// From QEMU's start to the result line.
    pub time_to_result: Option<Duration>,
    pub qemu_stderr: String,
    /// `serial.log` in the temp dir.
    pub log_path: PathBuf,
    /// The VM's temp dir.
    pub dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
}

impl RunOutcome {
    /// The result line is `nixos-kexec: result: success`.
    pub fn succeeded(&self) -> bool {
        self.result_line
            .as_deref()
            .map(|l| l.trim_end() == format!("{RESULT_PREFIX} success"))
            .unwrap_or(false)
    }

    /// The reason after `nixos-kexec: result: failure: `, if the run failed that way.
    pub fn failure_reason(&self) -> Option<&str> {
        self.result_line
            .as_deref()?
            .strip_prefix(RESULT_PREFIX)?
            .trim_start()
            .strip_prefix("failure:")
            .map(str::trim)
    }

    /// Fails (with the log's tail) unless the result line says success.
    pub fn expect_success(&self) -> Result<()> {
        if self.succeeded() {
            return Ok(());
        }
        bail!(
            "VM `{}`: expected `{RESULT_PREFIX} success`, got {}\n--- last 60 console lines ---\n{}",
            self.name,
            self.result_line
                .as_deref()
                .map(|l| format!("`{l}`"))
                .unwrap_or_else(|| "no result line".into()),
            self.tail(60)
        )
    }

    /// Fails (with the log's tail) unless the result line is a failure; returns the reason.
    pub fn expect_failure(&self) -> Result<String> {
        match self.failure_reason() {
            Some(r) => Ok(r.to_string()),
            None => bail!(
                "VM `{}`: expected `{RESULT_PREFIX} failure: ...`, got {}\n--- last 60 console lines ---\n{}",
                self.name,
                self.result_line
                    .as_deref()
                    .map(|l| format!("`{l}`"))
                    .unwrap_or_else(|| "no result line".into()),
                self.tail(60)
            ),
        }
    }

    /// Whether any console output contains `s`.
    pub fn contains(&self, s: &str) -> bool {
        self.log.contains(s)
    }

    /// Console lines containing `s`.
    pub fn lines_containing<'a>(&'a self, s: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.log.lines().filter(move |l| l.contains(s))
    }

    /// The last `n` console lines.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Keeps the temp dir (disks, log) after this value is dropped; returns its path.
    pub fn keep(mut self) -> PathBuf {
        if let Some(t) = self._tempdir.take() {
            return t.keep();
        }
        self.dir.clone()
    }
}
