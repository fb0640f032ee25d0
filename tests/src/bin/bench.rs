//! The benchmark: sizes, the agent's peak RSS, time per step, the time from `nixos-kexec run`
//! to the installer's first line, and the smallest QEMU memory the install scenario passes with;
//! with the dev bundle with Nix, a whole closure install from a binary cache (time, peak RSS,
//! throughput against the raw write speed, RAM floor). Prints a Markdown table (pasted into the README). Times are under QEMU TCG on this machine.

use anyhow::{Context, Result};
use nixos_kexec_tests::rescue::{rescue_cpio, rescue_vm, TARGET_SERIAL};
use nixos_kexec_tests::*;
use std::time::{Duration, Instant};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD bench@operator";

fn size(path: &std::path::Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

/// One install scenario (BIOS, virtio, stop before install) with `memory` MiB of RAM.
fn install_run(bundle: &Bundle, memory: u32) -> Result<RunOutcome> {
    Vm::new(bundle)
        .name(&format!("bench-{memory}mib"))
        .echo(false)
        .memory_mib(memory)
        .timeout(Duration::from_secs(240))
        .grace(Duration::from_secs(5))
        .disk(DiskSpec::new(3 << 30, DiskBus::Virtio).serial("BENCH001"))
        .param("nixos_kexec.disk=/dev/vda")
        .param(format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+")))
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
        .run()
}

fn main() -> Result<()> {
    // `NIXOS_KEXEC_BENCH_ONLY=aarch64`: only the aarch64 rows (a few minutes, not ~20).
    if std::env::var("NIXOS_KEXEC_BENCH_ONLY").is_ok_and(|v| v == "aarch64") {
        return print_rows(aarch64_rows()?);
    }
    let bundle = dev_bundle()?;
    let mut rows = size_rows(&bundle, "", "bzImage (Debian 6.1)")?;
    rows.push((
        "`nixos-kexec run` to the installer's first line (TCG)".into(),
        seconds(run_to_installer(&bundle)?),
        String::new(),
    ));

    // Steps and peak RSS of a plain install run at 256 MiB.
    let out = install_run(&bundle, 256)?;
    out.expect_success()?;
    let rss = out
        .lines_containing("agent peak RSS: ")
        .next()
        .and_then(|l| l.split("agent peak RSS: ").nth(1))
        .map(|v| v.trim().to_string())
        .context("no peak RSS line")?;
    rows.push((
        "agent peak RSS during an install run".into(),
        rss,
        "<= 16 MiB".into(),
    ));
    for line in out.lines_containing(" done in ") {
        if let Some((step, time)) = line
            .split_once("] ")
            .and_then(|(_, rest)| rest.split_once(" done in "))
        {
            rows.push((
                format!("step `{step}` (3 GiB virtio disk, TCG)"),
                time.trim().to_string(),
                String::new(),
            ));
        }
    }
    let boot = out
        .time_to_result
        .map(|t| format!("{:.1} s", t.as_secs_f64()))
        .unwrap_or_default();
    rows.push(("boot to result line, whole run (TCG)".into(), boot, String::new()));

    // RAM floor: the smallest memory the install scenario still passes with.
    rows.push(ram_floor(
        "smallest QEMU memory the install scenario passes with",
        &[256, 192, 160, 128, 112, 96, 80],
        |memory| install_run(&bundle, memory),
    ));

    rows.extend(aarch64_rows()?);
    rows.extend(prebuilt_system_rows()?);
    rows.push(fuzz_round()?);
    print_rows(rows)
}

fn print_rows(rows: Vec<(String, String, String)>) -> Result<()> {
    println!("| measurement | value | budget |");
    println!("|---|---|---|");
    for (what, value, budget) in rows {
        println!("| {what} | {value} | {budget} |");
    }
    Ok(())
}

/// aarch64 under TCG (`-machine virt`, Cortex-A57, AAVMF): the cross-built agent's and the
/// arm64 dev bundle's sizes, `nixos-kexec run` to the installer's first line (through the
/// agent's kexec_load: the arm64 kernel has no kexec_file_load), and the prepare run of
/// [`install_run`] from the firmware's start to the result line.
fn aarch64_rows() -> Result<Vec<(String, String, String)>> {
    let bundle = dev_bundle_aarch64()?;
    let mut rows = size_rows(&bundle, "aarch64 ", "Image (Debian 6.1, uncompressed)")?;
    rows.push((
        "aarch64: `nixos-kexec run` to the installer's first line (TCG, kexec_load)".into(),
        seconds(run_to_installer(&bundle)?),
        String::new(),
    ));
    let out = install_run(&bundle, 256)?;
    out.expect_success()?;
    rows.push((
        "aarch64: firmware start to result line, prepare run in 256 MiB (TCG)".into(),
        seconds(out.time_to_result.context("no result line")?),
        String::new(),
    ));
    Ok(rows)
}

/// The sizes of `bundle`'s agent (as build-dev built it for the bundle's architecture), kernel
/// (`kernel` names it) and initrd; `prefix` starts each row.
fn size_rows(bundle: &Bundle, prefix: &str, kernel: &str) -> Result<Vec<(String, String, String)>> {
    let agent = target_dir()
        .join(format!("{}-unknown-linux-musl", bundle.arch.name()))
        .join("release/nixos-kexec");
    Ok(vec![
        (
            format!("{prefix}agent binary (static musl, stripped)"),
            mib(size(&agent)?),
            "<= 4 MiB".to_string(),
        ),
        (
            format!("{prefix}dev bundle {kernel}"),
            mib(size(&bundle.bzimage)?),
            String::new(),
        ),
        (
            format!("{prefix}dev bundle initrd (zstd)"),
            mib(size(&bundle.initrd)?),
            String::new(),
        ),
    ])
}

/// The rescue path: the time from `nixos-kexec run` to the installer's first line.
fn run_to_installer(bundle: &Bundle) -> Result<Duration> {
    let scratch = tempfile::tempdir()?;
    let run_args =
        format!("--disk serial:{TARGET_SERIAL} --param stop_before=install --param after=poweroff");
    let cpio = rescue_cpio(bundle, scratch.path(), &run_args, KEY, &[])?;
    let vm = rescue_vm(bundle, &cpio)
        .name(&format!("bench-rescue-{}", bundle.arch.name()))
        .echo(false);
    let mut to_installer = None;
    let out = vm.run_with(|console| {
        console.wait_for("rescue: running nixos-kexec run", Duration::from_secs(180))?;
        let start = Instant::now();
        console.wait_for("starting as init", Duration::from_secs(180))?;
        to_installer = Some(start.elapsed());
        Ok(())
    })?;
    out.expect_success()?;
    to_installer.context("the installer never started")
}

fn seconds(t: Duration) -> String {
    format!("{:.1} s", t.as_secs_f64())
}

/// The row for the smallest of `sizes` (MiB, largest first) that `run` passes with: it stops
/// at the first failure and prints what ran out (the kernel unpacking the initrd, or the
/// installer).
fn ram_floor(what: &str, sizes: &[u32], run: impl Fn(u32) -> Result<RunOutcome>) -> (String, String, String) {
    let mut floor = None;
    for &memory in sizes {
        let outcome = run(memory);
        let ok = outcome.as_ref().is_ok_and(|o| o.succeeded());
        eprintln!(
            "bench: {what}: {memory} MiB {}",
            if ok { "passes" } else { "fails" }
        );
        if !ok {
            match outcome {
                Ok(o) => {
                    let panic: Vec<&str> = o.lines_containing("Kernel panic").collect();
                    let why = if panic.is_empty() {
                        o.tail(8)
                    } else {
                        panic.join("\n")
                    };
                    eprintln!("bench: {memory} MiB: {why}");
                }
                Err(e) => eprintln!("bench: {memory} MiB: {e:#}"),
            }
            break;
        }
        floor = Some(memory);
    }
    let value = match (floor, sizes.first()) {
        (Some(m), _) => format!("{m} MiB"),
        (None, Some(first)) => format!("above {first} MiB"),
        (None, None) => "not measured".into(),
    };
    (what.to_string(), value, "<= 256 MiB".into())
}

/// One install of the stand-in closure from its cache over HTTP, with the dev bundle with Nix
/// (`tests/tests/prebuilt_system.rs` does the same and checks the result), in `memory` MiB.
/// With `measure_disk` the stand-in also writes 256 MiB of zeros to the same filesystem.
fn prebuilt_run(bundle: &Bundle, server: &FileServer, memory: u32, measure_disk: bool) -> Result<RunOutcome> {
    let cache = stand_in_cache()?;
    let scratch = tempfile::tempdir()?;
    let mut vm = Vm::new(bundle)
        .name(&format!("bench-prebuilt-{memory}mib"))
        .echo(false)
        .memory_mib(memory)
        .extra_initrd(bundle.stand_in()?)
        .nic("52:54:00:12:34:99")
        .timeout(Duration::from_secs(900))
        .grace(Duration::from_secs(5))
        .disk(DiskSpec::new(3 << 30, DiskBus::Virtio).serial("BENCH002"))
        .param("nixos_kexec.disk=/dev/vda")
        .param(format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+")))
        .param(format!("nixos_kexec.system={}", cache.toplevel))
        .param(format!("nixos_kexec.substituters={}", server.guest_url()))
        .param(format!("nixos_kexec.trusted_public_keys={}", cache.key.public))
        .param("nixos_kexec.after=poweroff");
    if measure_disk {
        let marker = scratch.path().join("measure-disk.cpio");
        Cpio::new()
            .file("etc/nixos-kexec-stand-in.measure-disk", 0o644, "")
            .write_to(&marker)?;
        vm = vm.extra_initrd(&marker);
    }
    vm.run()
}

/// The first number after `prefix` on a console line.
fn number_after(out: &RunOutcome, prefix: &str) -> Option<f64> {
    let line = out.lines_containing(prefix).next()?;
    let rest = line.split(prefix).nth(1)?;
    let number: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number.parse().ok()
}

/// A prebuilt system from a binary cache with real Nix: the bundle's size, the install's time,
/// peak RSS and throughput against the raw write speed of the same VM, and the RAM floor.
fn prebuilt_system_rows() -> Result<Vec<(String, String, String)>> {
    let bundle = dev_bundle_with_nix()?;
    let cache = stand_in_cache()?;
    let server = cache.serve()?;
    let nar_mib = cache.stats.nar_size as f64 / (1 << 20) as f64;
    let mut rows = vec![(
        "dev bundle initrd with Debian's Nix (`build-dev --with-nix`, zstd)".to_string(),
        mib(size(&bundle.initrd)?),
        String::new(),
    )];
    // TCG only, as everywhere here: this machine's /dev/kvm fails QEMU ("failed to set MSR",
    // nested virtualisation).
    {
        let accel = "TCG";
        let out = prebuilt_run(&bundle, &server, 256, true)?;
        out.expect_success()?;
        let install = number_after(&out, "] install done in ").context("no install step time")?;
        let nix_env = number_after(&out, "nix-env took ").context("no nix-env time")?;
        let rss = number_after(&out, "installer has run peaked at ").context("no peak RSS line")?;
        let raw = number_after(&out, "raw write: 256 MiB in ").context("no raw write line")?;
        let raw_mib_s = 256.0 / raw;
        let throughput = nar_mib / nix_env;
        rows.push((
            format!(
                "prebuilt system ({} paths, {nar_mib:.0} MiB unpacked, {:.0} MiB zstd) from a cache over HTTP, 256 MiB RAM, {accel}: install step / nix-env",
                cache.stats.paths,
                cache.stats.cache_size as f64 / (1 << 20) as f64
            ),
            format!("{install:.1} s / {nix_env:.1} s"),
            String::new(),
        ));
        rows.push((
            format!("peak RSS of the largest process during that install (nix-env), {accel}"),
            format!("{rss:.0} MiB"),
            String::new(),
        ));
        rows.push((
            format!("substitution throughput (unpacked MiB / nix-env time) vs the same VM's raw write (dd 256 MiB, fsync), {accel}"),
            format!(
                "{throughput:.1} MiB/s vs {raw_mib_s:.1} MiB/s ({:.0} %)",
                100.0 * throughput / raw_mib_s
            ),
            ">= 80 %".into(),
        ));
    }
    rows.push(ram_floor(
        "smallest QEMU memory a whole closure install passes with",
        &[256, 224, 192, 160, 128],
        |memory| prebuilt_run(&bundle, &server, memory, false),
    ));
    Ok(rows)
}

/// A longer round of the agent's fuzz targets (`agent/tests/fuzz.rs`) than CI runs, in a debug
/// build so that an arithmetic overflow counts as the panic it is.
fn fuzz_round() -> Result<(String, String, String)> {
    const CASES: u32 = 50_000;
    let started = Instant::now();
    let output = std::process::Command::new("cargo")
        .args(["test", "--quiet", "-p", "nixos-kexec", "--test", "fuzz"])
        .env("NIXOS_KEXEC_FUZZ_CASES", CASES.to_string())
        .current_dir(workspace_root())
        .output()
        .context("running cargo test --test fuzz")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let targets = text
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok());
    let value = match (output.status.success(), targets) {
        (true, Some(targets)) => format!(
            "{targets} targets x {CASES} cases = {} inputs, no panic ({:.0} s)",
            u64::from(targets) * u64::from(CASES),
            started.elapsed().as_secs_f64()
        ),
        _ => format!("FAILED:\n{text}"),
    };
    Ok((
        "fuzz round (debug build, overflow checks on)".into(),
        value,
        "no panic".into(),
    ))
}
