//! The host side of "install a prebuilt system from a binary cache", on the host only: the
//! stand-in closure's signed cache, served over HTTP, installed by Debian's Nix the way
//! `nixos-install --system` does it, and checked with `nix-store --verify`; and each way it
//! must fail (a corrupted file, a wrong key, a path the cache does not have).

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::nix_cache::{
    nix_command, set_system_profile, system_profile, verify_store, COMPRESSION,
};
use nixos_kexec_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn stand_in_closure_is_big_many_files_signed_and_in_the_cache() -> Result<()> {
    let cache = stand_in_cache()?;
    let stats = &cache.stats;
    eprintln!("stand-in closure: {stats:?}");
    ensure!(
        stats.nar_size >= 300 * MIB,
        "the closure is only {} bytes",
        stats.nar_size
    );
    ensure!(
        (8..=16).contains(&stats.paths),
        "the closure has {} paths",
        stats.paths
    );
    ensure!(
        stats.files >= 20_000,
        "the closure has only {} files",
        stats.files
    );
    ensure!(
        cache.closure.contains(&cache.toplevel),
        "the closure lacks its toplevel"
    );
    ensure!(
        !cache.closure.contains(&cache.unpublished),
        "the unpublished path is in the closure"
    );
    // Text compresses, the rest does not: the cache is neither the NAR size nor tiny.
    let ratio = stats.cache_size as f64 / stats.nar_size as f64;
    ensure!((0.5..0.9).contains(&ratio), "cache/NAR size ratio {ratio:.2}");

    let narinfo = std::fs::read_to_string(cache.dir.join(&narinfo_url_path(&cache.toplevel)[1..]))
        .context("reading the toplevel's narinfo")?;
    ensure!(
        narinfo.contains(&format!("Compression: {COMPRESSION}")),
        "narinfo:\n{narinfo}"
    );
    ensure!(narinfo.contains("Sig: stand-in-cache-1:"), "narinfo:\n{narinfo}");
    ensure!(
        !cache
            .dir
            .join(&narinfo_url_path(&cache.unpublished)[1..])
            .exists(),
        "the unpublished path is in the cache"
    );

    // Nix itself checks every signature in the cache: with the key, and not with the wrong one.
    let verify_sigs = |key: &str| {
        run_tool_unchecked(
            nix_command("nix")
                .args(["store", "verify", "--recursive", "--no-contents", "--store"])
                .arg(cache.file_url())
                .args(["--option", "trusted-public-keys", key])
                .arg(cache.toplevel.as_str()),
        )
    };
    let good = verify_sigs(&cache.key.public)?;
    ensure!(
        good.status.success(),
        "signatures do not verify\n{}",
        good.describe()
    );
    let wrong = verify_sigs(&cache.wrong_key.public)?;
    ensure!(
        !wrong.status.success() && wrong.stderr.contains("is untrusted"),
        "the wrong key verified the cache\n{}",
        wrong.describe()
    );
    Ok(())
}

/// The install the installer will do, into an ext4 image mounted on the host: every path comes
/// over HTTP, the store verifies, the profile names the system. Then one flipped byte makes
/// the verification fail.
#[test]
fn installs_over_http_into_mounted_ext4_verifies_and_detects_corruption() -> Result<()> {
    let cache = stand_in_cache()?;
    let scratch = tempfile::tempdir()?;
    let image = scratch.path().join("root.img");
    run_tool(Command::new("truncate").args(["-s", "1G"]).arg(&image))?;
    run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
    {
        let root = LoopMount::new(&image)?;
        let server = cache.serve()?;
        let start = std::time::Instant::now();
        let out = set_system_profile(
            root.path(),
            &cache.toplevel,
            &server.host_url(),
            &cache.key.public,
        )?;
        ensure!(out.status.success(), "the install failed\n{}", out.describe());
        eprintln!(
            "installed {} bytes of NAR ({} of cache) over HTTP in {:.1}s",
            cache.stats.nar_size,
            cache.stats.cache_size,
            start.elapsed().as_secs_f64()
        );
        verify_store(root.path())?;
        let profile = system_profile(root.path())?;
        ensure!(
            profile == cache.toplevel,
            "the system profile points at {profile}"
        );

        let requests = server.requests();
        let methods: std::collections::BTreeSet<&str> = requests.iter().map(|r| r.method.as_str()).collect();
        eprintln!("Nix's requests: {} ({methods:?})", requests.len());
        for path in &cache.closure {
            ensure!(
                requests.iter().any(|r| r.path == narinfo_url_path(path)),
                "Nix never asked for {}",
                narinfo_url_path(path)
            );
        }
        let nars = requests
            .iter()
            .filter(|r| r.method == "GET" && r.path.starts_with("/nar/"))
            .count();
        ensure!(
            nars == cache.closure.len(),
            "{nars} NAR downloads for {} paths",
            cache.closure.len()
        );

        corrupt_one_file(root.path(), &cache.toplevel)?;
        let error = verify_store(root.path())
            .err()
            .context("the store verified with a corrupted file")?;
        let error = format!("{error:#}");
        ensure!(error.contains("was modified! expected hash"), "{error}");
        eprintln!("verify after corruption: {}", error.lines().nth(1).unwrap_or(""));
    }
    // Unmounted cleanly by the drop: the filesystem checks out.
    e2fsck(&image)?;
    Ok(())
}

/// Flips a byte in the kernel the system links to (a file of another store path than the
/// toplevel).
fn corrupt_one_file(root: &Path, toplevel: &StorePath) -> Result<()> {
    let link = root
        .join(toplevel.as_str().trim_start_matches('/'))
        .join("kernel");
    let kernel = std::fs::read_link(&link).with_context(|| format!("reading {}", link.display()))?;
    let file = root.join(kernel.strip_prefix("/").context("kernel link not absolute")?);
    run_tool(Command::new("chmod").arg("u+w").arg(&file))?;
    let mut bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let byte = bytes.get_mut(4096).context("kernel shorter than 4 KiB")?;
    *byte ^= 0xff;
    std::fs::write(&file, &bytes).with_context(|| format!("writing {}", file.display()))
}

/// Installs `system` from the served cache trusting `key` into a fresh directory, expecting
/// Nix to fail and to leave no system profile: its output and the requests the cache saw.
fn failed_install(
    system: &StorePath,
    key: &str,
    case: &str,
) -> Result<(ToolOutput, String, Vec<HttpRequest>)> {
    let cache = stand_in_cache()?;
    let server = cache.serve()?;
    let root = tempfile::tempdir()?;
    let out = set_system_profile(root.path(), system, &server.host_url(), key)?;
    eprintln!("nix-env {case}:\n{}", out.stderr.trim_end());
    ensure!(!out.status.success(), "the install {case} succeeded");
    ensure!(
        system_profile(root.path()).is_err(),
        "the install {case} set a system profile"
    );
    Ok((out, server.host_url(), server.requests()))
}

#[test]
fn wrong_key_fails_before_any_download_and_sets_no_profile() -> Result<()> {
    let cache = stand_in_cache()?;
    let (out, url, requests) =
        failed_install(&cache.toplevel, &cache.wrong_key.public, "with the wrong key")?;
    ensure!(
        out.stderr.contains(&format!(
            "warning: the substitute for '{}' from '{url}' is not signed by any of the keys in 'trusted-public-keys'",
            cache.toplevel
        )) && out.stderr.contains(&format!("error: build of '{}' failed", cache.toplevel)),
        "{}",
        out.describe()
    );
    let nars = requests.iter().filter(|r| r.path.starts_with("/nar/")).count();
    ensure!(
        nars == 0,
        "{nars} NARs were downloaded without a trusted signature"
    );
    Ok(())
}

#[test]
fn missing_path_fails_and_sets_no_profile() -> Result<()> {
    let cache = stand_in_cache()?;
    let (out, _, requests) =
        failed_install(&cache.unpublished, &cache.key.public, "of a path the cache lacks")?;
    ensure!(
        out.stderr.contains(&format!(
            "don't know how to build these paths:\n  {}",
            cache.unpublished
        )),
        "{}",
        out.describe()
    );
    ensure!(
        requests
            .iter()
            .any(|r| r.path == narinfo_url_path(&cache.unpublished)),
        "Nix did not ask the cache for {}",
        narinfo_url_path(&cache.unpublished)
    );
    Ok(())
}

/// The file server with curl as the client: HEAD, 404, and two GETs on one connection.
#[test]
fn file_server_answers_get_head_404_on_one_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n")?;
    std::fs::create_dir(dir.path().join("nar"))?;
    let big = vec![0x5au8; 3 << 20];
    std::fs::write(dir.path().join("nar/big.nar"), &big)?;
    let server = FileServer::start(dir.path())?;
    let url = server.host_url();
    let curl = |args: &[&str]| {
        run_tool_unchecked(
            Command::new("curl")
                .args(["--silent", "--show-error", "--http1.1", "--path-as-is"])
                .args(["--write-out", "%{http_code} %{size_download} %{num_connects}\n"])
                .args(args.iter().flat_map(|url| ["--output", "/dev/null", url])),
        )
    };
    let out = curl(&[
        &format!("{url}/nix-cache-info"),
        &format!("{url}/nar/big.nar"),
        &format!("{url}/missing.narinfo"),
        &format!("{url}/../etc/passwd"),
    ])?;
    ensure!(out.status.success(), "{}", out.describe());
    let stdout = out.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    // One connection for all four: the later ones report 0 new connects.
    ensure!(
        lines
            == [
                "200 21 1",
                &format!("200 {} 0", big.len()),
                "404 10 0",
                "404 10 0"
            ],
        "{}",
        out.describe()
    );
    let head = run_tool(
        Command::new("curl")
            .args(["--silent", "--head"])
            .arg(format!("{url}/nar/big.nar")),
    )?;
    ensure!(
        head.stdout_str()
            .contains(&format!("Content-Length: {}", big.len())),
        "{}",
        head.describe()
    );
    let paths: Vec<(String, String)> = server
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    ensure!(
        paths.iter().filter(|(m, _)| m == "GET").count() == 4
            && paths.contains(&("HEAD".into(), "/nar/big.nar".into())),
        "{paths:?}"
    );
    Ok(())
}

/// The core the config server shares: an answer without Content-Length (a raw or cut one) ends
/// when the server closes the connection, which curl must see at once, not at a timeout.
#[test]
fn config_server_raw_answer_ends_with_the_connection() -> Result<()> {
    let server = ConfigServer::start_raw(vec![b"HTTP/1.0 200 OK\r\n\r\nno length".to_vec()], 5)?;
    let url = server.guest_url().replace("10.0.2.2", "127.0.0.1");
    let start = std::time::Instant::now();
    let out = run_tool(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "5"])
            .arg(format!("{url}/x")),
    )?;
    ensure!(out.stdout_str() == "no length", "{}", out.describe());
    ensure!(
        start.elapsed() < std::time::Duration::from_secs(3),
        "curl waited {:?} for the end of the answer",
        start.elapsed()
    );
    ensure!(server.requests() == ["/x"], "{:?}", server.requests());
    Ok(())
}

/// The installer's check before the wipe (`check_caches`, the agent's own code) against the
/// cache Debian's Nix signed, over HTTP and as a directory: it must agree with Nix on the
/// signature, on the wrong key and on the missing path (the two failures above).
#[test]
fn the_installers_check_agrees_with_nix_on_the_real_cache() -> Result<()> {
    use nixos_kexec::input::binary_cache::{PublicKey, Substituter};
    use nixos_kexec::installer::plan::BinaryCaches;
    use nixos_kexec::installer::steps::install::check_caches;
    let cache = stand_in_cache()?;
    let server = cache.serve()?;
    let caches = |url: &str, key: &str| -> Result<BinaryCaches> {
        Ok(BinaryCaches {
            substituters: vec![Substituter::parse(url)?],
            trusted_public_keys: vec![PublicKey::parse(key)?],
        })
    };
    for url in [server.host_url(), cache.file_url()] {
        check_caches(&cache.toplevel, &caches(&url, &cache.key.public)?)
            .with_context(|| format!("the signed toplevel at {url}"))?;
        let wrong = check_caches(&cache.toplevel, &caches(&url, &cache.wrong_key.public)?)
            .err()
            .with_context(|| format!("{url}: the wrong key was accepted"))?;
        let text = nixos_kexec::error::one_line(&wrong);
        ensure!(
            text.contains("signed only by stand-in-cache-1, which is not a trusted public key"),
            "{text}"
        );
        let missing = check_caches(&cache.unpublished, &caches(&url, &cache.key.public)?)
            .err()
            .with_context(|| format!("{url}: the unpublished path was accepted"))?;
        let text = nixos_kexec::error::one_line(&missing);
        ensure!(text.contains("it does not have the path"), "{text}");
    }
    Ok(())
}
