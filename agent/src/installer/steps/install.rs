//! Runs `nixos-install` on the prepared target, streaming its output to the console and log.

use super::token_file::{self, TokenFile};
use super::Execution;
use crate::console;
use crate::error::user_error;
use crate::input::binary_cache::{
    CacheFile, Location, Narinfo, PublicKey, StorePath, Substituter, NIXOS_CACHE_KEY, STORE_DIR,
};
use crate::input::config::Step;
use crate::input::http;
use crate::installer::plan::{BinaryCaches, Plan};
use crate::machine::runner::{self, find_in_path};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Refuses before the disk is wiped when the install step is planned and is sure to fail for
/// want of a network: nixos-install downloads nixpkgs and the system's packages.
pub fn check_network_before_wiping(plan: &Plan) -> Result<()> {
    if !plan.steps.contains(&Step::Install) {
        return Ok(());
    }
    let Some(program) = plan.install_command.first() else {
        return Ok(());
    };
    // Without nixos-install the install step fails by itself with its own, clearer message.
    if find_in_path(program).is_none() {
        return Ok(());
    }
    let downloads = match &plan.prebuilt_system {
        // A cache on the installer itself (file://) needs no network.
        Some(_)
            if plan
                .caches
                .substituters
                .iter()
                .all(|s| matches!(s.location(), Location::Directory(_))) =>
        {
            return Ok(())
        }
        Some(system) => format!("{program} downloads {system}"),
        None => format!("{program} downloads {} and the system's packages", plan.nixpkgs),
    };
    let facts = crate::network::facts::gather()?;
    if facts.routes.iter().any(|r| r.destination.is_none()) {
        return Ok(());
    }
    Err(user_error(
        format!(
            "The install step needs the network ({downloads}), but the installer has no default route. Nothing was written."
        ),
        "connect the machine to a network with DHCP or router advertisements, describe its network in the runtime info (network.interfaces), or add nixos_kexec.stop_before=install to only prepare the disk.",
    ))
}

/// Refuses before the disk is wiped when the prebuilt system cannot be downloaded: no
/// substituter answers, none has the path, or its signature does not verify with a trusted
/// key. Nix would find the same after the wipe, in the middle of the install. Only the
/// system's own path is looked up; a path it references that is missing from every cache
/// still fails in the install step.
pub fn check_caches_before_wiping(plan: &Plan) -> Result<()> {
    match plan
        .prebuilt_system
        .as_ref()
        .filter(|_| plan.steps.contains(&Step::Install))
    {
        Some(system) => check_caches(system, &plan.caches),
        None => Ok(()),
    }
}

/// Ok when one of `caches` has `system`, signed by a trusted key; else why none has.
pub fn check_caches(system: &StorePath, caches: &BinaryCaches) -> Result<()> {
    let mut trusted = caches.trusted_public_keys.clone();
    trusted.push(PublicKey::parse(NIXOS_CACHE_KEY)?);
    let mut findings = Vec::new();
    for cache in &caches.substituters {
        match look_up(cache, system, &trusted) {
            Ok(()) => {
                console::line(&format!(
                    "install: {cache} has {system}{}",
                    if cache.trusted() {
                        " (trusted=1: no signature needed)"
                    } else {
                        ", signed by a trusted key"
                    }
                ));
                return Ok(());
            }
            Err(why) => findings.push(format!("{cache}: {why}")),
        }
    }
    Err(user_error(
        format!(
            "No substituter can provide the system {system}, so the install would fail after the wipe. Nothing was written. {}.",
            findings.join("; ")
        ),
        "push the system to the cache, signed (nix copy --to URL PATH with ?secret-key=FILE, or nix store sign -k FILE PATH), name the URL the machine can reach in substituters, and the public half of the signing key (nix key convert-secret-to-public) in trusted_public_keys.",
    ))
}

/// Why `cache` cannot provide `system` in a way Nix accepts, if it cannot.
fn look_up(cache: &Substituter, system: &StorePath, trusted: &[PublicKey]) -> Result<(), String> {
    let info = read_cache_file(&cache.file("nix-cache-info"))?
        .ok_or("it is not a binary cache (it has no nix-cache-info)")?;
    let store_dir = String::from_utf8_lossy(&info)
        .lines()
        .find_map(|line| line.strip_prefix("StoreDir: ").map(|dir| dir.trim().to_string()));
    if let Some(dir) = store_dir.filter(|dir| dir != STORE_DIR) {
        return Err(format!("its store is {dir}, not {STORE_DIR}"));
    }
    let file = cache.file(&system.narinfo_file());
    let narinfo =
        read_cache_file(&file)?.ok_or_else(|| format!("it does not have the path ({file} is not there)"))?;
    let narinfo = Narinfo::parse(&String::from_utf8_lossy(&narinfo)).map_err(|e| format!("{file}: {e:#}"))?;
    if narinfo.store_path != system.as_str() {
        return Err(format!("{file} describes {}, not the system", narinfo.store_path));
    }
    if cache.trusted() {
        return Ok(());
    }
    narinfo.verify(trusted).map_err(|why| {
        let names: Vec<&str> = trusted.iter().map(PublicKey::name).collect();
        format!("{why} (trusted: {})", names.join(", "))
    })
}

/// The file's bytes; `None` when the cache answers that it has no such file.
fn read_cache_file(file: &CacheFile) -> Result<Option<Vec<u8>>, String> {
    match file {
        CacheFile::Local(path) => match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {path}: {e}")),
        },
        CacheFile::Http(url) => {
            let options = http::Options {
                attempts: 3,
                attempt_timeout: Duration::from_secs(30),
                ..http::Options::default()
            };
            let report = &mut |line: &str| console::line(&format!("install: {line}"));
            match http::get_response(url, &options, report) {
                Ok((_, response)) if (200..300).contains(&response.status) => Ok(Some(response.body)),
                Ok((_, response)) if matches!(response.status, 404 | 403 | 410) => Ok(None),
                Ok((answered, response)) => Err(format!(
                    "{answered} answered {} {}",
                    response.status, response.reason
                )),
                Err(e) => Err(match e.downcast_ref::<http::Unreachable>() {
                    Some(unreachable) => format!(
                        "unreachable ({} attempts, the last failed with: {})",
                        unreachable.attempts, unreachable.last
                    ),
                    None => crate::error::one_line(&e),
                }),
            }
        }
    }
}

/// Refuses a bundle without the install program, with what to do instead.
pub fn check_program(plan: &Plan) -> Result<()> {
    let program = plan
        .install_command
        .first()
        .context("the plan has no install command")?;
    if find_in_path(program).is_none() {
        return Err(user_error(
            format!("{program} is not in this installer bundle, so NixOS cannot be installed from it (a dev bundle carries Nix only when build-dev ran with --with-nix, and never nixos-install)."),
            "boot the Nix-built bundle (nix build .#kexec-bundle), or pass nixos_kexec.stop_before=install to stop once the disk and host flake are ready.",
        ));
    }
    Ok(())
}

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let root = execution
        .target_root()
        .context("the target root is not mounted")?
        .to_path_buf();
    let Some((program, args)) = plan.install_command.split_first() else {
        anyhow::bail!("the plan has no install command");
    };
    // The store and temporary files go to the target disk, not to RAM: a 1 GB machine has no room
    // (with a tmpfs `/` the plan puts them on /nix).
    let tmp = PathBuf::from(&plan.install_tmpdir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env("TMPDIR", &tmp)
        // Nix's download and evaluation caches would otherwise grow in RAM under /root.
        .env("XDG_CACHE_HOME", tmp.join(".cache"))
        .env("NIX_CONFIG", "experimental-features = nix-command flakes");
    let token_file = hand_token_to_nix(plan, execution, &mut command)?;
    let installed = runner::run_streaming(
        &mut command,
        &|line| console::line(&format!("install: {line}")),
        runner::QUIET_NOTICE,
        &|silent| {
            console::line(&format!(
                "install: no output from {program} for {} min; still running (downloads and builds can be silent for long)",
                silent.as_secs() / 60
            ))
        },
    );
    // Gone before anything else happens, whether the install worked or not.
    drop(token_file);
    installed?;
    // Waited-for descendants count, so this covers Nix's processes under nixos-install too.
    if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        console::line(&format!(
            "install: the largest process the installer has run peaked at {} MiB (RSS)",
            usage.max_rss() / 1024
        ));
    }
    if tmp != root.join("tmp") {
        // Not the system's /tmp, so nothing else would ever clean it.
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    Ok(())
}

/// The flake access token, if one came, for this command's Nix only: a root-only file in the
/// installer's RAM that `NIX_USER_CONF_FILES` names. Dropping the file wipes it.
fn hand_token_to_nix(
    plan: &Plan,
    execution: &mut Execution,
    command: &mut Command,
) -> Result<Option<TokenFile>> {
    let Some(host) = plan
        .user_configuration
        .as_ref()
        .and_then(|user| user.access_token.as_ref())
    else {
        return Ok(None);
    };
    let token = execution
        .access_token
        .take()
        .context("the plan has a flake access token, but none was read before the steps")?;
    let file = TokenFile::write(Path::new(token_file::DIR), host, &token)?;
    // Replaces the user's own files (~/.config/nix/nix.conf), which the installer has none of.
    command.env("NIX_USER_CONF_FILES", file.path());
    console::line(&format!(
        "install: Nix has the flake access token for {host} for this step only (a root-only file in the installer's RAM, wiped when it ends; nothing of it goes to the target)"
    ));
    Ok(Some(file))
}
