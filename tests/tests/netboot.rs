//! Boot paths without a rescue system: PXE (iPXE from QEMU's NIC ROM, files from QEMU's
//! built-in TFTP) and a GRUB console where the test types the `linux`/`initrd`/`boot` lines,
//! each under SeaBIOS and under OVMF.
//! The installer gets its network by DHCP (QEMU user networking) and its runtime info from an
//! HTTP server this test runs on the host's loopback, which the guest reaches as 10.0.2.2.
//!
//! cargo test -p nixos-kexec-tests --test netboot -- --nocapture

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
const GIB: u64 = 1 << 30;

// ------------------------------------------------------------------------- helpers

fn runtime_info(hostname: &str, serial: &str) -> String {
    json!({
        "version": 1,
        "hostname": hostname,
        "disk": {"serial": serial},
        "ssh_authorized_keys": [KEY],
    })
    .to_string()
}

/// The checks every prepared disk passes, with tools we did not write; returns the root
/// filesystem's copy of `/etc/nixos/configuration.nix`.
fn check_installed(out: &RunOutcome, disk: &Path, hostname: &str) -> Result<String> {
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the VM should have powered off by itself");
    sgdisk_verify(disk)?;
    let root = extract_partition(disk, 3)?;
    e2fsck(&root)?;
    fsck_fat(&extract_partition(disk, 2)?)?;
    let read = |path: &str| -> Result<String> { Ok(String::from_utf8(ext4_read_file(&root, path)?)?) };
    let flake = read("/etc/nixos/flake.nix")?;
    nix_parse_str(&flake)?;
    ensure!(
        flake.contains(&format!("nixosConfigurations.\"{hostname}\"")),
        "flake.nix is not for {hostname}:\n{flake}"
    );
    let configuration = read("/etc/nixos/configuration.nix")?;
    nix_parse_str(&configuration)?;
    ensure!(
        configuration.contains(KEY),
        "the SSH key is missing:\n{configuration}"
    );
    ensure!(
        configuration.contains(&format!("networking.hostName = \"{hostname}\"")),
        "{configuration}"
    );
    let report: Value = serde_json::from_str(&read("/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["result"] == "success", "report: {report}");
    Ok(configuration)
}

/// The report.json the installer left on the root filesystem (partition 3) of `disk`.
fn installed_report(disk: &Path) -> Result<Value> {
    let root = extract_partition(disk, 3)?;
    let text = String::from_utf8(ext4_read_file(&root, "/var/log/nixos-kexec/report.json")?)?;
    Ok(serde_json::from_str(&text)?)
}

/// The line the agent prints after the DHCP lease, and the IPv6 address from QEMU's router
/// advertisements (user networking announces fec0::/64).
fn check_dhcp_and_slaac(out: &RunOutcome, mac: &str) -> Result<()> {
    ensure!(
        out.lines_containing("got the DHCP lease 10.0.2.15/24")
            .any(|l| l.contains(mac)),
        "no DHCP lease line for {mac}"
    );
    ensure!(
        out.lines_containing("IPv6 from router advertisements: fec0::")
            .next()
            .is_some(),
        "no SLAAC address reported"
    );
    Ok(())
}

/// Parameters for a run that prepares the disk and powers off (the dev bundle has no Nix).
const PREPARE: &str = "nixos_kexec.stop_before=install nixos_kexec.after=poweroff";

fn with_params(mut vm: Vm, params: &str) -> Vm {
    for p in params.split_whitespace() {
        vm = vm.param(p);
    }
    vm
}

// ------------------------------------------------------------------------- scenarios

/// A TFTP root for QEMU's built-in server: the bundle's kernel, initrd and netboot.ipxe, and
/// boot.ipxe, which sets the installer parameters (iPXE expands `${mac}` in them itself) and
/// chains netboot.ipxe. Returns the `-nic user` options that serve it.
fn pxe_tftp_root(bundle: &Bundle, dir: &Path, server: &ConfigServer) -> Result<String> {
    let tftp = dir.join("tftp");
    std::fs::create_dir_all(&tftp)?;
    for file in ["bzImage", "initrd", "netboot.ipxe"] {
        std::fs::copy(bundle.dir.join(file), tftp.join(file))
            .with_context(|| format!("copying {file} (does build-dev write it?)"))?;
    }
    std::fs::write(
        tftp.join("boot.ipxe"),
        format!(
            "#!ipxe\nset cmdline panic=-1 loglevel=4 nixos_kexec.config_url={}/${{mac}}.json {PREPARE}\nchain netboot.ipxe\n",
            server.guest_url()
        ),
    )?;
    Ok(format!("tftp={},bootfile=boot.ipxe", tftp.display()))
}

/// What a PXE boot through [`pxe_tftp_root`] shows: iPXE put the MAC into the URL, the kernel
/// line came from netboot.ipxe, the installer got its own lease, and the server saw exactly
/// one request, for this MAC.
fn check_pxe_boot(out: &RunOutcome, server: &ConfigServer, mac: &str) -> Result<()> {
    ensure!(
        out.contains(&format!("config_url: fetching {}/{mac}.json", server.guest_url())),
        "iPXE did not put the MAC into the URL"
    );
    ensure!(
        out.contains("console=ttyS0,115200") && out.contains("initrd=initrd"),
        "the kernel line did not come from the bundle's netboot.ipxe"
    );
    check_dhcp_and_slaac(out, mac)?;
    ensure!(
        server.requests() == [format!("/{mac}.json")],
        "requests: {:?}",
        server.requests()
    );
    Ok(())
}

/// PXE under SeaBIOS: QEMU's iPXE ROM gets DHCP and boot.ipxe from QEMU's TFTP server (see
/// [`pxe_tftp_root`]). The installer gets its own DHCP lease, fetches its runtime info and
/// prepares the disk the runtime info names, leaving the other disk alone.
#[test]
fn pxe_boot_fetches_runtime_info_per_mac_and_installs() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:34:01";
    let server = ConfigServer::start(
        vec![(
            format!("/{mac}.json"),
            vec![(200, runtime_info("pxe-web1", "PXE-TARGET"))],
        )],
        10,
    )?;
    let scratch = tempfile::tempdir()?;
    let tftp = pxe_tftp_root(&bundle, scratch.path(), &server)?;
    let other = used_disk(scratch.path(), "other.img", 3 * GIB)?;
    let other_before = sparse_digest(&other)?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let out = Vm::new(&bundle)
        .direct_boot(false)
        .qemu_args(["-boot", "n"])
        .nic_with(mac, &tftp)
        .disk_image(&other, DiskBus::Virtio, 512, "PXE-OTHER")
        .disk_image(&target, DiskBus::Virtio, 512, "PXE-TARGET")
        .run()?;
    let configuration = check_installed(&out, &target, "pxe-web1")?;
    ensure!(
        !configuration.contains("./network.nix"),
        "a DHCP install leaves the network to NixOS's default DHCP:\n{configuration}"
    );
    check_pxe_boot(&out, &server, mac)?;
    ensure!(
        sparse_digest(&other)? == other_before,
        "the disk the runtime info did not name changed"
    );
    eprintln!(
        "pxe: result after {:.1}s",
        out.time_to_result.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}

/// PXE under OVMF: QEMU's virtio-net ROM holds iPXE's EFI driver too, and OVMF's boot entry
/// for the NIC runs iPXE itself (not OVMF's own PXE client, which would only load EFI
/// binaries), so the same boot.ipxe and netboot.ipxe work unchanged; iPXE then starts the
/// kernel through its EFI stub.
#[test]
fn uefi_pxe_boot_fetches_runtime_info_per_mac_and_installs() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:34:08";
    let server = ConfigServer::start(
        vec![(
            format!("/{mac}.json"),
            vec![(200, runtime_info("uefi-pxe8", "UEFI-PXE-TARGET"))],
        )],
        10,
    )?;
    let scratch = tempfile::tempdir()?;
    let tftp = pxe_tftp_root(&bundle, scratch.path(), &server)?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let out = Vm::new(&bundle)
        .firmware(Firmware::Uefi)
        .direct_boot(false)
        .qemu_args(["-boot", "n"])
        .nic_with(mac, &tftp)
        .disk_image(&target, DiskBus::Virtio, 512, "UEFI-PXE-TARGET")
        .run()?;
    check_installed(&out, &target, "uefi-pxe8")?;
    let firmware = installed_report(&target)?["firmware"].clone();
    ensure!(
        firmware == "uefi",
        "the installer saw firmware {firmware}, not UEFI"
    );
    ensure!(
        out.contains("EFI stub: "),
        "iPXE did not start the kernel through its EFI stub"
    );
    check_pxe_boot(&out, &server, mac)?;
    eprintln!(
        "uefi pxe: result after {:.1}s",
        out.time_to_result.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}

/// A GRUB console under SeaBIOS: the test types the lines a person would, with `${mac}`
/// single-quoted so GRUB passes it on and the installer substitutes it.
#[test]
fn grub_console_typed_lines_install_with_agent_side_mac() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:34:02";
    let server = ConfigServer::start(
        vec![(
            format!("/{mac}.json"),
            vec![(200, runtime_info("grub-web2", "GRUB-TARGET"))],
        )],
        10,
    )?;
    let scratch = tempfile::tempdir()?;
    let iso = grub_console_iso(&bundle, scratch.path())?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let linux = format!(
        "linux /bzImage console=ttyS0 panic=-1 loglevel=4 'nixos_kexec.config_url={}/${{mac}}.json' {PREPARE}",
        server.guest_url()
    );
    let vm = Vm::new(&bundle)
        .nic(mac)
        .disk_image(&target, DiskBus::Virtio, 512, "GRUB-TARGET");
    let out = boot_grub_console(vm, &iso, linux)?;
    check_installed(&out, &target, "grub-web2")?;
    ensure!(
        out.contains(&format!(
            "nixos_kexec.config_url={}/${{mac}}.json",
            server.guest_url()
        )),
        "GRUB did not pass ${{mac}} on to the kernel unexpanded"
    );
    ensure!(
        out.contains(&format!(
            "config_url: {url}/${{mac}}.json is {url}/{mac}.json on this machine",
            url = server.guest_url()
        )),
        "the installer did not substitute ${{mac}}"
    );
    check_dhcp_and_slaac(&out, mac)?;
    ensure!(
        server.requests() == [format!("/{mac}.json")],
        "requests: {:?}",
        server.requests()
    );
    eprintln!(
        "grub: result after {:.1}s (typing included)",
        out.time_to_result.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}

/// The same ISO and typed lines under OVMF (GRUB's EFI build, which boots the kernel through
/// its EFI stub). The URL names the machine by the SMBIOS serial and UUID QEMU is given; the
/// installer reads them from /sys/class/dmi/id and substitutes them, percent-encoding the
/// space in the serial.
#[test]
fn uefi_grub_console_installs_with_smbios_serial_and_uuid() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:34:07";
    let serial = "UEFI GRUB-0042";
    let uuid = "6f1c2d3e-4b5a-4c7d-8e9f-a0b1c2d3e4f5";
    let path = format!("/hosts/{serial}/{uuid}.json");
    let server = ConfigServer::start(
        vec![(
            path.clone(),
            vec![(200, runtime_info("uefi-grub7", "UEFI-TARGET"))],
        )],
        10,
    )?;
    let scratch = tempfile::tempdir()?;
    let iso = grub_console_iso(&bundle, scratch.path())?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let template = format!("{}/hosts/${{serial}}/${{uuid}}.json", server.guest_url());
    let linux = format!(
        "linux /bzImage console=ttyS0 panic=-1 loglevel=4 'nixos_kexec.config_url={template}' {PREPARE}"
    );
    let vm = Vm::new(&bundle)
        .firmware(Firmware::Uefi)
        .qemu_args(["-smbios", &format!("type=1,serial={serial},uuid={uuid}")])
        .nic(mac)
        .disk_image(&target, DiskBus::Virtio, 512, "UEFI-TARGET");
    let out = boot_grub_console(vm, &iso, linux)?;
    check_installed(&out, &target, "uefi-grub7")?;
    let firmware = installed_report(&target)?["firmware"].clone();
    ensure!(
        firmware == "uefi",
        "the installer saw firmware {firmware}, not UEFI"
    );
    let url = format!(
        "{}/hosts/{}/{uuid}.json",
        server.guest_url(),
        serial.replace(' ', "%20")
    );
    ensure!(
        out.contains(&format!("config_url: {template} is {url} on this machine")),
        "the installer did not substitute ${{serial}} and ${{uuid}} into {url}"
    );
    ensure!(
        out.contains(&format!("config_url: fetching {url}")),
        "the installer did not fetch {url}"
    );
    check_dhcp_and_slaac(&out, mac)?;
    ensure!(
        server.requests() == [path.clone()],
        "requests: {:?}, expected [{path:?}]",
        server.requests()
    );
    eprintln!(
        "uefi grub: result after {:.1}s (typing included)",
        out.time_to_result.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}

/// A network boot where nothing names a disk must not write anything: it refuses, prints the
/// plan that confirming with `auto` would run on the one eligible disk, and says how to confirm.
/// One VM for the class; what it says with two candidates (both listed, each named by its by-id
/// path, no plan for `auto`) is checked in agent/tests/refusals.rs.
#[test]
fn no_disk_named_writes_nothing_and_says_how_to_confirm() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let single = used_disk(scratch.path(), "single.img", 3 * GIB)?;
    let single_before = sparse_digest(&single)?;
    let out = with_params(Vm::new(&bundle), "nixos_kexec.after=poweroff")
        .name("no_disk_named_single")
        .disk_image(&single, DiskBus::Virtio, 512, "ONLY-ONE")
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("No target disk was chosen") && reason.contains("/dev/vda"),
        "{reason}"
    );
    ensure!(
        out.contains("plan with nixos_kexec.disk=auto: install nixos on /dev/vda"),
        "the plan for auto is not printed"
    );
    ensure!(
        out.contains("nixos_kexec.disk=/dev/disk/by-id/virtio-ONLY-ONE or nixos_kexec.disk=auto"),
        "how to confirm is not printed"
    );
    ensure!(!out.exited_by_itself, "a refusal must not power off");
    ensure!(sparse_digest(&single)? == single_before, "the only disk changed");
    Ok(())
}

/// The config server fails twice (500) and then answers: the installer retries with backoff.
/// The URL names the machine by the host name the DHCP server gave it.
#[test]
fn config_url_retries_server_errors() -> Result<()> {
    let bundle = dev_bundle()?;
    let mac = "52:54:00:12:34:04";
    // ${hostname} from the DHCP server's host-name option (QEMU's `hostname=`).
    let dhcp_name = "rack7-node3";
    let path = format!("/retry/{dhcp_name}/{mac}.json");
    let server = ConfigServer::start(
        vec![(
            path.clone(),
            vec![
                (500, "{}".into()),
                (500, "{}".into()),
                (200, runtime_info("retried", "RETRY-TARGET")),
            ],
        )],
        10,
    )?;
    let scratch = tempfile::tempdir()?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let out = with_params(Vm::new(&bundle), PREPARE)
        .param(format!(
            "nixos_kexec.config_url={}/retry/${{hostname}}/${{mac}}.json",
            server.guest_url()
        ))
        .nic_with(mac, &format!("hostname={dhcp_name}"))
        .disk_image(&target, DiskBus::Virtio, 512, "RETRY-TARGET")
        .run()?;
    check_installed(&out, &target, "retried")?;
    ensure!(
        out.contains(&format!(
            "got the DHCP lease 10.0.2.15/24 with host name {dhcp_name}"
        )),
        "the DHCP host name was not recorded"
    );
    for attempt in [
        "attempt 1/5 failed: 500 Internal Server Error; retrying in 1 s",
        "attempt 2/5 failed: 500 Internal Server Error; retrying in 2 s",
    ] {
        ensure!(out.contains(attempt), "no line with {attempt:?}");
    }
    ensure!(
        server.requests() == vec![path.clone(), path.clone(), path],
        "requests: {:?}",
        server.requests()
    );
    Ok(())
}

/// Boots the installer with `config_url` onto a used disk and expects the fetch to fail: a
/// reason, no power-off, the disk unchanged. `nic` adds the network. Returns the run and the
/// reason.
fn config_url_fails_cleanly(
    config_url: &str,
    nic: impl FnOnce(Vm) -> Vm,
    serial: &str,
) -> Result<(RunOutcome, String)> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let before = sparse_digest(&disk)?;
    let out = nic(with_params(Vm::new(&bundle), PREPARE))
        .param(format!("nixos_kexec.config_url={config_url}"))
        .disk_image(&disk, DiskBus::Virtio, 512, serial)
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(!out.exited_by_itself, "a failed run must not power off");
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    Ok((out, reason))
}

/// A NIC with a link but nobody answering DHCP or sending router advertisements (QEMU's hub
/// with no other port): the installer gives up after its timeout and says what config_url
/// needed and what to do, instead of hanging or fetching from nowhere.
#[test]
fn config_url_without_a_dhcp_server_says_so() -> Result<()> {
    let mac = "52:54:00:12:34:0c";
    let started = Instant::now();
    let (out, reason) = config_url_fails_cleanly(
        "http://10.0.0.1/${mac}.json",
        |vm| {
            vm.qemu_args(["-netdev", "hubport,id=lonely,hubid=7", "-device"])
                .qemu_args([format!("virtio-net-pci,netdev=lonely,mac={mac}")])
        },
        "NOLEASE01",
    )?;
    ensure!(
        reason.contains(&format!(
            "nixos_kexec.config_url=http://10.0.0.1/${{mac}}.json needs the network, but no DHCP lease and no router advertisement on eth0 {mac}."
        )),
        "the reason does not say what is missing: {reason}"
    );
    ensure!(reason.contains("DHCP server"), "no fix in: {reason}");
    ensure!(out.contains("running: udhcpc -i eth0"), "DHCP was not tried");
    eprintln!("no lease: gave up after {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

// ------------------------------------------------------------------------- HTTPS

/// An HTTPS config server that is not ours: `openssl s_server -WWW` on 127.0.0.1 serving the
/// files in its directory, with a server certificate for 10.0.2.2 from a CA made here.
struct OpensslServer {
    child: std::process::Child,
    port: u16,
    ca_pem: String,
    dir: tempfile::TempDir,
}

impl OpensslServer {
    /// Serves `files` (path under the root, content).
    fn start(files: &[(String, String)]) -> Result<OpensslServer> {
        let dir = tempfile::tempdir()?;
        let ca = nixos_kexec_tests::tls::TestCa::new()?;
        let cert = ca.server_cert("10.0.2.2", &["IP:10.0.2.2"])?;
        let www = dir.path().join("www");
        for (path, content) in files {
            let file = www.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(file.parent().context("a file path")?)?;
            std::fs::write(&file, content)?;
        }
        let port = nixos_kexec_tests::tls::free_port()?;
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-WWW", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert.cert)
            .arg("-key")
            .arg(&cert.key)
            .current_dir(&www)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting openssl s_server (apt-get install openssl)")?;
        let server = OpensslServer {
            child,
            port,
            ca_pem: ca.pem()?,
            dir,
        };
        nixos_kexec_tests::tls::wait_for_listener(port, "openssl s_server")?;
        Ok(server)
    }

    fn guest_url(&self) -> String {
        format!("https://10.0.2.2:{}", self.port)
    }

    /// `bundle` with the test CA added to what the installer trusts, the way the README says:
    /// a gzipped cpio appended with plain `cat` (no alignment padding).
    fn bundle_trusting_the_ca(&self, bundle: &Bundle) -> Result<Bundle> {
        let cpio = self.dir.path().join("ca.cpio");
        Cpio::new()
            .file("etc/nixos-kexec/ca/test-ca.pem", 0o644, &self.ca_pem)
            .write_to(&cpio)?;
        tool("gzip", [cpio.as_os_str()])?;
        let mut initrd = std::fs::read(&bundle.initrd)?;
        initrd.extend(std::fs::read(cpio.with_extension("cpio.gz"))?);
        let path = self.dir.path().join("initrd-with-ca");
        std::fs::write(&path, initrd)?;
        Ok(Bundle {
            initrd: path,
            ..bundle.clone()
        })
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `https://` config URL against OpenSSL's server, trusting a private CA from an appended
/// initrd (added to, not replacing, the bundle's public CAs): the runtime info arrives and the
/// named disk is prepared. The URL names the machine by its DMI serial (s_server refuses the
/// colons of a MAC in paths), set through QEMU's SMBIOS tables.
#[test]
fn config_url_over_https_trusts_an_appended_ca_and_installs() -> Result<()> {
    let bundle = dev_bundle()?;
    let serial = "TLSBOX-0042";
    let server = OpensslServer::start(&[(
        format!("/hosts/{serial}.json"),
        runtime_info("tls-box", "TLS-TARGET"),
    )])?;
    let scratch = tempfile::tempdir()?;
    let target = blank_disk(scratch.path(), "target.img", 3 * GIB)?;
    let template = format!("{}/hosts/${{serial}}.json", server.guest_url());
    let out = with_params(Vm::new(&server.bundle_trusting_the_ca(&bundle)?), PREPARE)
        .param(format!("nixos_kexec.config_url={template}"))
        .qemu_args(["-smbios".to_string(), format!("type=1,serial={serial}")])
        .nic("52:54:00:12:34:0a")
        .disk_image(&target, DiskBus::Virtio, 512, "TLS-TARGET")
        .run()?;
    check_installed(&out, &target, "tls-box")?;
    let url = format!("{}/hosts/{serial}.json", server.guest_url());
    ensure!(
        out.contains(&format!("config_url: {template} is {url} on this machine")),
        "the installer did not substitute ${{serial}} from the DMI tables"
    );
    ensure!(
        out.contains(&format!("runtime info from {url}")),
        "no line saying the runtime info came over HTTPS"
    );
    Ok(())
}

/// Without the private CA the installer trusts only the bundle's public CAs: one clear error
/// naming what it trusts and how to add a CA, no retries, no power-off, the disk untouched.
#[test]
fn config_url_over_https_refuses_an_unknown_ca() -> Result<()> {
    let mac = "52:54:00:12:34:0b";
    let server = OpensslServer::start(&[(format!("/{mac}.json"), runtime_info("x", "TLS-UNTRUSTED"))])?;
    let (out, reason) = config_url_fails_cleanly(
        &format!("{}/${{mac}}.json", server.guest_url()),
        |vm| vm.nic(mac),
        "TLS-UNTRUSTED",
    )?;
    ensure!(
        reason.contains("The certificate of 10.0.2.2 is not signed by a CA this installer trusts (")
            && reason.contains(" from /etc/ssl/certs/ca-certificates.crt).")
            && reason.contains("/etc/nixos-kexec/ca/"),
        "the reason does not name the trust problem and the fix: {reason}"
    );
    ensure!(
        !out.contains("retrying in"),
        "a certificate rejection was retried"
    );
    Ok(())
}

/// Hand-typable parameters alone (disk, hostname, layout, ssh_key, nixpkgs) install; booting the
/// installer again onto the finished disk refuses without touching it, and
/// `nixos_kexec.reinstall` lets it go ahead.
#[test]
fn short_parameters_install_and_a_second_boot_does_not_reinstall() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = blank_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let mac = "52:54:00:12:34:06";
    let short = |hostname: &str| {
        format!(
            "nixos_kexec.disk=/dev/vda nixos_kexec.hostname={hostname} nixos_kexec.layout=ext4 \
             nixos_kexec.ssh_key={} nixos_kexec.nixpkgs=github:NixOS/nixpkgs/nixos-25.05 {PREPARE}",
            KEY.replace(' ', "+")
        )
    };
    let boot = |name: &str, params: &str| {
        with_params(Vm::new(&bundle).name(name), params)
            .nic(mac)
            .disk_image(&disk, DiskBus::Virtio, 512, "REINSTALL1")
            .grace(Duration::from_secs(3))
            .run()
    };

    let first = boot("first_install", &short("first"))?;
    check_installed(&first, &disk, "first")?;
    let flake = String::from_utf8(ext4_read_file(
        &extract_partition(&disk, 3)?,
        "/etc/nixos/flake.nix",
    )?)?;
    ensure!(
        flake.contains("github:NixOS/nixpkgs/nixos-25.05"),
        "nixos_kexec.nixpkgs did not reach the flake:\n{flake}"
    );
    let installed = sparse_digest(&disk)?;

    let second = boot("second_boot", &short("second"))?;
    let reason = second.expect_failure()?;
    ensure!(
        reason.contains("Refusing to install over /dev/vda")
            && reason.contains("for host first")
            && reason.contains("nixos_kexec.reinstall"),
        "{reason}"
    );
    ensure!(!second.exited_by_itself, "a refusal must not power off");
    ensure!(
        sparse_digest(&disk)? == installed,
        "the refused run changed the disk"
    );

    let third = boot("reinstall", &format!("{} nixos_kexec.reinstall", short("second")))?;
    ensure!(
        third.contains("nixos_kexec.reinstall: replacing what is there: /dev/vda holds a NixOS prepared (stopped before install) by nixos-kexec"),
        "the replaced install is not named"
    );
    check_installed(&third, &disk, "second")?;
    Ok(())
}

/// A second boot sees btrfs and LUKS installs too: a `btrfs` install keeps its report in
/// subvolume @log, a `luks-btrfs` install has it encrypted and marks its LUKS2 header instead.
/// With both disks in one machine, the installer names both and refuses the one it is told to
/// install on, without touching either.
#[test]
fn a_second_boot_recognises_btrfs_and_luks_installs() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let secrets = scratch.path().join("secrets.cpio");
    Cpio::new()
        .file(
            "etc/nixos-kexec/secrets/disk-passphrase",
            0o600,
            "Guard-Test-Passphrase",
        )
        .write_to(&secrets)?;
    let btrfs = blank_disk(scratch.path(), "btrfs.img", 3 * GIB)?;
    let luks = blank_disk(scratch.path(), "luks.img", 3 * GIB)?;
    let params = |disk: &str, hostname: &str, layout: &str| {
        format!(
            "nixos_kexec.disk={disk} nixos_kexec.hostname={hostname} nixos_kexec.layout={layout} \
             nixos_kexec.ssh_key={} {PREPARE}",
            KEY.replace(' ', "+")
        )
    };
    let vm = |name: &str, params: &str| {
        with_params(Vm::new(&bundle).name(name), params)
            .nic("52:54:00:12:34:07")
            .grace(Duration::from_secs(3))
    };

    vm("btrfs_install", &params("/dev/vda", "cellar", "btrfs"))
        .disk_image(&btrfs, DiskBus::Virtio, 512, "GUARDBTRFS")
        .run()?
        .expect_success()?;
    let first = vm("luks_install", &params("/dev/vda", "vault", "luks-btrfs"))
        .extra_initrd(&secrets)
        .disk_image(&luks, DiskBus::Virtio, 512, "GUARDLUKS")
        .timeout(Duration::from_secs(420))
        .run()?;
    first.expect_success()?;
    ensure!(
        first.contains("LUKS2 header of /dev/vda3 marked as a finished install: nixos-kexec "),
        "the LUKS install left no marker"
    );
    let installed = (sparse_digest(&btrfs)?, sparse_digest(&luks)?);

    let second = vm("second_boot", &params("/dev/vdb", "second", "ext4"))
        .disk_image(&btrfs, DiskBus::Virtio, 512, "GUARDBTRFS")
        .disk_image(&luks, DiskBus::Virtio, 512, "GUARDLUKS")
        .run()?;
    let reason = second.expect_failure()?;
    ensure!(
        second.contains(
            "earlier install found: /dev/vda holds a NixOS prepared (stopped before install) by nixos-kexec"
        ) && second.contains("for host cellar; its report is /@log/nixos-kexec/report.json on /dev/vda3"),
        "the btrfs install is not named"
    );
    ensure!(
        second.contains(
            "earlier install found: /dev/vdb holds a NixOS prepared (stopped before install) by nixos-kexec"
        ) && second.contains("; the LUKS2 header of /dev/vdb3 says so (the report is inside, encrypted)"),
        "the LUKS install is not named"
    );
    ensure!(
        reason.contains("Refusing to install over /dev/vdb")
            && reason.contains("for host vault on ")
            && reason.contains("nixos_kexec.reinstall"),
        "{reason}"
    );
    ensure!(
        (sparse_digest(&btrfs)?, sparse_digest(&luks)?) == installed,
        "the refused run changed a disk"
    );
    Ok(())
}

/// Without any network the installer stops before writing when something needs one: the
/// fetch of config_url, or (before the wipe) the install step. The disk stays as it was.
#[test]
fn without_network_nothing_that_needs_it_starts() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = used_disk(scratch.path(), "disk.img", 3 * GIB)?;
    let before = sparse_digest(&disk)?;

    let out = with_params(Vm::new(&bundle).name("config_url_without_network"), PREPARE)
        .param("nixos_kexec.config_url=http://10.0.2.2:9/${mac}.json")
        .disk_image(&disk, DiskBus::Virtio, 512, "NONET0001")
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("needs the network") && reason.contains("no network interface"),
        "{reason}"
    );
    ensure!(sparse_digest(&disk)? == before, "the disk changed");

    // A stand-in nixos-install (a test double: the real one needs a Nix binary cache) makes
    // the install step runnable; without a network it must not start wiping.
    let stand_in = scratch.path().join("stand-in.cpio");
    Cpio::new()
        .file(
            "bin/nixos-install",
            0o755,
            b"#!/bin/sh\n# TEST DOUBLE for nixos-install.\necho stand-in called\n",
        )
        .write_to(&stand_in)?;
    let out = Vm::new(&bundle)
        .name("install_without_network")
        .extra_initrd(&stand_in)
        .param("nixos_kexec.disk=/dev/vda")
        .param(format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+")))
        .param("nixos_kexec.after=poweroff")
        .disk_image(&disk, DiskBus::Virtio, 512, "NONET0001")
        .grace(Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("The install step needs the network") && reason.contains("Nothing was written"),
        "{reason}"
    );
    ensure!(!out.contains("stand-in called"), "the install step ran");
    ensure!(!out.exited_by_itself, "a failed run must not power off");
    ensure!(sparse_digest(&disk)? == before, "the disk changed");
    Ok(())
}

/// The fingerprint the scenarios compare sees a write anywhere, also of zeros into a hole.
#[test]
fn sparse_digest_sees_every_write() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let scratch = tempfile::tempdir()?;
    let path = used_disk(scratch.path(), "d.img", 3 * GIB)?;
    let first = sparse_digest(&path)?;
    ensure!(sparse_digest(&path)? == first, "not stable");
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.write_all_at(&[0u8; 4096], 2 * GIB)?;
    let zeros = sparse_digest(&path)?;
    ensure!(zeros != first, "zeros written into a hole went unseen: {zeros}");
    file.write_all_at(b"x", 1 << 20)?;
    ensure!(sparse_digest(&path)? != zeros, "a changed byte went unseen");

    // copy_range_sparse reads only data extents too; the copy must still be exact.
    file.write_all_at(b"tail of the range", (1 << 20) + 3 * 4096 - 5)?;
    let (offset, len) = ((1u64 << 20) - 4096, 3u64 << 20);
    let copy = scratch.path().join("range");
    copy_range_sparse(&path, offset, len, &copy)?;
    let mut expected = vec![0u8; len as usize];
    std::fs::File::open(&path)?.read_exact_at(&mut expected, offset)?;
    ensure!(
        std::fs::read(&copy)? == expected,
        "copy_range_sparse changed the data"
    );
    Ok(())
}

/// What build-dev writes for people booting by hand: an iPXE script and the GRUB lines.
#[test]
fn bundle_has_netboot_script_and_grub_lines() -> Result<()> {
    let bundle = dev_bundle()?;
    let ipxe = std::fs::read_to_string(bundle.dir.join("netboot.ipxe"))?;
    ensure!(ipxe.starts_with("#!ipxe\n"), "{ipxe}");
    for line in [
        "kernel bzImage initrd=initrd rootfstype=ramfs console=tty0 console=ttyS0,115200 ${cmdline}",
        "initrd initrd",
        "boot",
    ] {
        ensure!(
            ipxe.lines().any(|l| l == line),
            "netboot.ipxe lacks {line:?}:\n{ipxe}"
        );
    }
    let grub = std::fs::read_to_string(bundle.dir.join("grub.txt"))?;
    let commands: Vec<&str> = grub.lines().filter(|l| !l.starts_with('#')).collect();
    ensure!(
        commands
            == [
                "linux (hd0,gpt2)/nixos-kexec/bzImage rootfstype=ramfs console=tty0 console=ttyS0,115200 nixos_kexec.disk=/dev/sda",
                "initrd (hd0,gpt2)/nixos-kexec/initrd",
                "boot"
            ],
        "grub.txt commands: {commands:?}"
    );
    ensure!(grub.contains("'nixos_kexec.config_url=http://"), "{grub}");
    Ok(())
}
