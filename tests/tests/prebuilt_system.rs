//! A prebuilt system installed from a binary cache, with real Nix in the installer: the dev
//! bundle built `--with-nix` (Debian's nix-bin) boots in a 256 MiB VM, the agent checks the
//! cache before the wipe, and Nix downloads the closure from an HTTP server on the host's
//! loopback into the target's store. From the host afterwards, Debian's `nix-store --verify
//! --check-contents` checks every path of the installed store, and the system profile must
//! point at the system.
//!
//! TEST DOUBLES, both for the one boundary this machine cannot cross (a NixOS closure needs
//! nixpkgs): the closure is the stand-in closure of `tests/stand-in/system-closure.nix` (342 MiB
//! of synthetic store paths built and signed here by Debian's Nix), and `nixos-install` is
//! `tests/stand-in/nixos-install`, which runs the real `nix-env --store /mnt … --set` that
//! nixos-install runs for `--system`, and stands in only for nixos-enter +
//! switch-to-configuration (Debian's grub-install in the target).

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::nix_cache::{nix_left_nothing_in_ram, system_profile, verify_store};
use nixos_kexec_tests::*;
use std::time::Duration;

const KEY: &str = "nixos_kexec.ssh_key=ssh-ed25519+AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD+operator@laptop";
const GIB: u64 = 1 << 30;

fn cache_params(vm: Vm, system: &StorePath, url: &str, key: &str) -> Vm {
    vm.param(KEY)
        .param("nixos_kexec.disk=/dev/vda")
        .param(format!("nixos_kexec.system={system}"))
        .param(format!("nixos_kexec.substituters={url}"))
        .param(format!("nixos_kexec.trusted_public_keys={key}"))
        .param("nixos_kexec.after=poweroff")
}

#[test]
fn a_prebuilt_system_installs_from_a_signed_http_cache_in_256_mib() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let cache = stand_in_cache()?;
    let server = cache.serve()?;
    let vm = Vm::new(&bundle)
        .name("prebuilt-256m")
        .memory_mib(256)
        .extra_initrd(bundle.stand_in()?)
        .nic("52:54:00:12:34:90")
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("TARGET"))
        .timeout(Duration::from_secs(900));
    let out = cache_params(vm, &cache.toplevel, &server.guest_url(), &cache.key.public).run()?;
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the VM should have powered off by itself");
    for line in [
        &format!(
            "install: {} has {}, signed by a trusted key",
            server.guest_url(),
            cache.toplevel
        ),
        "swap file on: ",
        "swap file off and removed",
        "verify: ok system profile: ",
    ] {
        ensure!(
            out.contains(line),
            "no `{line}` on the console:\n{}",
            out.tail(60)
        );
    }
    nix_left_nothing_in_ram(&out)?;
    // Every path of the closure was asked for and downloaded from the host.
    let requests = server.requests();
    for path in &cache.closure {
        let narinfo = narinfo_url_path(path);
        ensure!(
            requests.iter().any(|r| r.path == narinfo),
            "{narinfo} was never asked for"
        );
    }
    ensure!(
        requests.iter().filter(|r| r.path.starts_with("/nar/")).count() >= cache.closure.len(),
        "fewer NAR downloads than paths: {:?}",
        requests.iter().map(|r| &r.path).collect::<Vec<_>>()
    );

    let disk = &out.disks[0];
    sgdisk_verify(disk)?;
    let root = extract_partition(disk, 3)?;
    e2fsck(&root)?;
    let mounted = LoopMount::new(&root)?;
    let verified = verify_store(mounted.path())?;
    eprintln!("nix-store --verify --check-contents: {verified}");
    let profile = system_profile(mounted.path())?;
    ensure!(
        profile == cache.toplevel,
        "the system profile points at {profile}, not {}",
        cache.toplevel
    );
    for path in &cache.closure {
        ensure!(
            mounted
                .path()
                .join(path.as_str().trim_start_matches('/'))
                .exists(),
            "{path} is not on the disk"
        );
    }
    // The host flake is still there for later rebuilds, and no swap file was left behind.
    ensure!(
        mounted.path().join("etc/nixos/flake.nix").is_file(),
        "no host flake"
    );
    ensure!(
        !mounted.path().join(".nixos-kexec-swap").exists(),
        "the temporary swap file is still on the disk"
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(mounted.path().join("var/log/nixos-kexec/report.json")).context("report")?,
    )?;
    ensure!(report["result"] == "success", "report: {report}");
    Ok(())
}

/// The two failures the installer finds before the wipe, each in its own VM: the disk (a used
/// one, with an old partition) must be unchanged, and the error names the path and the cache.
#[test]
fn a_wrong_key_or_a_missing_path_is_refused_before_the_wipe() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    let cache = stand_in_cache()?;
    let server = cache.serve()?;
    let dir = tempfile::tempdir()?;
    for (name, system, key, expected) in [
        (
            "wrong-key",
            &cache.toplevel,
            &cache.wrong_key.public,
            "is signed only by stand-in-cache-1, which is not a trusted public key",
        ),
        (
            "missing-path",
            &cache.unpublished,
            &cache.key.public,
            "it does not have the path",
        ),
    ] {
        let image = used_disk(dir.path(), name, 2 * GIB)?;
        let before = sparse_digest(&image)?;
        let vm = Vm::new(&bundle)
            .name(name)
            .extra_initrd(bundle.stand_in()?)
            .nic("52:54:00:12:34:91")
            .disk_image(&image, DiskBus::Virtio, 512, "TARGET")
            .timeout(Duration::from_secs(300));
        let out = cache_params(vm, system, &server.guest_url(), key).run()?;
        let reason = out.expect_failure()?;
        for text in [expected, system.as_str(), "Nothing was written"] {
            ensure!(
                reason.contains(text),
                "{name}: `{text}` not in the reason: {reason}"
            );
        }
        ensure!(
            sparse_digest(&image)? == before,
            "{name}: the disk changed although the check failed before the wipe"
        );
    }
    Ok(())
}
