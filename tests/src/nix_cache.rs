//! A signed binary cache holding a system closure, for the install tests, and checks of the
//! store an install made.
//!
//! NixOS cannot be built here (there is no nixpkgs), so the system is a TEST DOUBLE: the
//! stand-in closure of `tests/stand-in/system-closure.nix`, built on the host by Debian's Nix
//! with a static busybox as the builder. All the rest is real Nix: the keys (`nix key`), the
//! signed cache (`nix copy --to file://...`), the install from it (`nix-env --store ... --set`,
//! as `nixos-install --system` does) and the check of the result (`nix-store --verify`).
//!
//! Nix runs without the host's /nix, daemon or build users: it builds into a chroot store under
//! the target directory, and every command gets its settings from `NIX_CONFIG` (see
//! [`nix_command`]), not from the host's nix.conf.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::http_server::FileServer;
use crate::tool::{run_tool, run_tool_unchecked, run_tool_with_input, ToolOutput};

/// The stand-in closure's expression; the builder's busybox goes beside it.
const CLOSURE_NIX: &str = include_str!("../stand-in/system-closure.nix");

/// The toplevel's `bin/switch-to-configuration`: the boot-loader stand-in the boot tests use.
const SWITCH_TO_CONFIGURATION: &str = include_str!("../stand-in/switch-to-configuration");

/// Debian's busybox-static: the builder of every stand-in derivation.
const BUSYBOX: &str = "/bin/busybox";

/// The cache's compression: zstd, not xz. Both are what real caches use and Nix 2.8 writes
/// both, but on this host `nix copy` of the stand-in closure took 4 s with zstd and 395 s with
/// xz for a cache 3% smaller, and decompressing it takes 0.8 s against 7.4 s: the installer
/// (in a small VM) should spend its time on the disk, not in xz.
pub const COMPRESSION: &str = "zstd";

/// The name of the key that signs the cache, and of the one that does not.
const KEY_NAME: &str = "stand-in-cache-1";
const WRONG_KEY_NAME: &str = "stand-in-wrong-key-1";

pub use nixos_kexec::input::binary_cache::StorePath;

/// Where a binary cache serves the path's metadata: `/<hash>.narinfo`.
pub fn narinfo_url_path(path: &StorePath) -> String {
    format!("/{}", path.narinfo_file())
}

/// A signing key pair from `nix key generate-secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// `NAME:BASE64`, as `trusted-public-keys` takes it.
    pub public: String,
    /// The secret key's file (never to be logged or put on a command line).
    pub secret_file: PathBuf,
}

/// What the stand-in closure and its cache measure.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosureStats {
    /// Store paths in the closure.
    pub paths: usize,
    /// Regular files and symlinks in them.
    pub files: u64,
    /// Their NAR size, in bytes: what an install unpacks.
    pub nar_size: u64,
    /// The compressed cache on disk, in bytes: what an install downloads.
    pub cache_size: u64,
    /// How long building, signing and publishing took when it was built.
    pub build_seconds: f64,
}

/// The stand-in system closure published as a signed binary cache (a `file://` directory;
/// [`StandInCache::serve`] serves it over HTTP).
#[derive(Debug)]
pub struct StandInCache {
    /// The cache directory: `nix-cache-info`, `<hash>.narinfo`, `nar/`.
    pub dir: PathBuf,
    /// The stand-in for a NixOS system's toplevel: it references the whole closure.
    pub toplevel: StorePath,
    /// Every path of the toplevel's closure (toplevel included), all in the cache.
    pub closure: Vec<StorePath>,
    /// A path built beside the system but never published: the cache answers 404 for it.
    pub unpublished: StorePath,
    /// The key that signed every path in the cache.
    pub key: CacheKey,
    /// A key that signed nothing.
    pub wrong_key: CacheKey,
    pub stats: ClosureStats,
}

impl StandInCache {
    /// The cache as a `file://` substituter.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Serves the cache over HTTP on the host's loopback (10.0.2.2 for a guest) until dropped.
    pub fn serve(&self) -> Result<FileServer> {
        FileServer::start(&self.dir)
    }
}

/// The stand-in cache, built once per expression: it lives in `<target>/nix-cache/<hash>-zstd`,
/// named by the hash of the expression and its busybox, and is built under an exclusive lock,
/// so test binaries running at the same time build it once; later runs only read its
/// manifest.
pub fn stand_in_cache() -> Result<&'static StandInCache> {
    static CACHE: OnceLock<std::result::Result<StandInCache, String>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let start = Instant::now();
            let cache = open_or_build_stand_in_cache().map_err(|e| format!("{e:#}"));
            eprintln!("stand_in_cache: ready in {:.1}s", start.elapsed().as_secs_f64());
            cache
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn open_or_build_stand_in_cache() -> Result<StandInCache> {
    let base = crate::target_dir().join("nix-cache");
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let source = tempfile::Builder::new()
        .prefix("source-")
        .tempdir_in(&base)
        .context("a directory for the stand-in's expression")?;
    write_expression(source.path())?;
    let hash = run_tool(
        Command::new("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(source.path()),
    )
    .context("hashing the stand-in's expression")?
    .stdout_str()
    .trim()
    .to_string();
    let dir = base.join(format!("{hash}-{COMPRESSION}"));
    let _lock = lock_exclusive(&base.join(format!("{hash}-{COMPRESSION}.lock")))?;
    if dir.join(MANIFEST).is_file() {
        return read_manifest(&dir)
            .with_context(|| format!("reading the stand-in cache in {}", dir.display()));
    }
    if dir.exists() {
        remove_tree(&dir).context("removing a stand-in cache that was not finished")?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::rename(source.keep(), dir.join("source")).context("moving the expression into place")?;
    eprintln!("stand_in_cache: building {}", dir.display());
    build_stand_in_cache(&dir).with_context(|| format!("building the stand-in cache in {}", dir.display()))
}

fn write_expression(dir: &Path) -> Result<()> {
    fs::write(dir.join("system-closure.nix"), CLOSURE_NIX).context("writing system-closure.nix")?;
    fs::write(dir.join("switch-to-configuration"), SWITCH_TO_CONFIGURATION)
        .context("writing switch-to-configuration")?;
    let bin = dir.join("busybox/bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    fs::copy(BUSYBOX, bin.join("busybox"))
        .with_context(|| format!("copying {BUSYBOX} (Debian's busybox-static) for the builder"))?;
    Ok(())
}

const MANIFEST: &str = "manifest.json";

fn build_stand_in_cache(dir: &Path) -> Result<StandInCache> {
    let start = Instant::now();
    let key = generate_key(&dir.join("keys"), KEY_NAME)?;
    let wrong_key = generate_key(&dir.join("keys"), WRONG_KEY_NAME)?;
    let store = dir.join("build-store");
    let built = run_tool(
        nix_command("nix-build")
            .arg("--store")
            .arg(&store)
            .arg(dir.join("source/system-closure.nix"))
            .args([
                "-A",
                "toplevel",
                "-A",
                "unpublished",
                "--no-out-link",
                "--max-jobs",
                "2",
            ]),
    )
    .context("building the stand-in closure")?;
    let outputs = built
        .stdout_str()
        .lines()
        .map(StorePath::parse)
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("reading the outputs of `{}`", built.command))?;
    let [toplevel, unpublished] = <[StorePath; 2]>::try_from(outputs).map_err(|o| {
        anyhow!(
            "nix-build printed {} outputs, not toplevel and unpublished",
            o.len()
        )
    })?;

    let cache_dir = dir.join("cache");
    run_tool(
        nix_command("nix")
            .arg("copy")
            .arg("--from")
            .arg(&store)
            .arg("--to")
            .arg(format!(
                "file://{}?compression={COMPRESSION}&secret-key={}",
                cache_dir.display(),
                key.secret_file.display()
            ))
            .arg(toplevel.as_str()),
    )
    .context("publishing the stand-in closure as a signed binary cache")?;

    let info = run_tool(
        nix_command("nix")
            .args(["path-info", "--json", "--recursive", "--store"])
            .arg(&store)
            .arg(toplevel.as_str()),
    )?;
    let info: Value = serde_json::from_slice(&info.stdout).context("parsing `nix path-info --json`")?;
    let mut closure = Vec::new();
    let mut nar_size = 0;
    let mut files = 0;
    for entry in info
        .as_array()
        .context("`nix path-info --json` did not print a list")?
    {
        let path = StorePath::parse(entry["path"].as_str().unwrap_or_default())?;
        nar_size += entry["narSize"]
            .as_u64()
            .with_context(|| format!("no narSize for {path}"))?;
        files += tree_totals(&store.join(path.as_str().trim_start_matches('/')))?.0;
        closure.push(path);
    }
    closure.sort();
    let stats = ClosureStats {
        paths: closure.len(),
        files,
        nar_size,
        cache_size: tree_totals(&cache_dir)?.1,
        build_seconds: start.elapsed().as_secs_f64(),
    };
    let manifest = json!({
        "toplevel": toplevel.as_str(),
        "unpublished": unpublished.as_str(),
        "closure": closure.iter().map(StorePath::as_str).collect::<Vec<_>>(),
        "stats": {
            "paths": stats.paths,
            "files": stats.files,
            "nar_size": stats.nar_size,
            "cache_size": stats.cache_size,
            "build_seconds": stats.build_seconds,
        },
    });
    // The cache has it all; the build store would only double the disk space.
    remove_tree(&store).context("removing the build store")?;
    fs::write(dir.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?).context("writing the manifest")?;
    eprintln!(
        "stand_in_cache: built {} paths, {} files, {} bytes of NAR, {} bytes of cache in {:.1}s",
        stats.paths, stats.files, stats.nar_size, stats.cache_size, stats.build_seconds
    );
    Ok(StandInCache {
        dir: cache_dir,
        toplevel,
        closure,
        unpublished,
        key,
        wrong_key,
        stats,
    })
}

fn read_manifest(dir: &Path) -> Result<StandInCache> {
    let text = fs::read(dir.join(MANIFEST)).context("reading the manifest")?;
    let manifest: Value = serde_json::from_slice(&text).context("parsing the manifest")?;
    let path = |name: &str| StorePath::parse(manifest[name].as_str().unwrap_or_default());
    let number = |name: &str| {
        manifest["stats"][name]
            .as_f64()
            .with_context(|| format!("no {name} in the manifest"))
    };
    let closure = manifest["closure"]
        .as_array()
        .context("no closure in the manifest")?
        .iter()
        .map(|p| StorePath::parse(p.as_str().unwrap_or_default()))
        .collect::<Result<Vec<_>>>()?;
    Ok(StandInCache {
        dir: dir.join("cache"),
        toplevel: path("toplevel")?,
        unpublished: path("unpublished")?,
        key: read_key(&dir.join("keys"), KEY_NAME)?,
        wrong_key: read_key(&dir.join("keys"), WRONG_KEY_NAME)?,
        stats: ClosureStats {
            paths: closure.len(),
            files: number("files")? as u64,
            nar_size: number("nar_size")? as u64,
            cache_size: number("cache_size")? as u64,
            build_seconds: number("build_seconds")?,
        },
        closure,
    })
}

/// `nix key generate-secret` and `convert-secret-to-public` into `DIR/NAME.secret` and
/// `DIR/NAME.public`.
fn generate_key(dir: &Path, name: &str) -> Result<CacheKey> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret = run_tool(nix_command("nix").args(["key", "generate-secret", "--key-name", name]))?;
    let secret_file = dir.join(format!("{name}.secret"));
    fs::write(&secret_file, &secret.stdout).with_context(|| format!("writing {}", secret_file.display()))?;
    let public = run_tool_with_input(
        nix_command("nix").args(["key", "convert-secret-to-public"]),
        &secret.stdout,
    )?;
    ensure!(
        public.status.success(),
        "making the public key failed\n{}",
        public.describe()
    );
    let public_file = dir.join(format!("{name}.public"));
    fs::write(&public_file, public.stdout_str().trim())
        .with_context(|| format!("writing {}", public_file.display()))?;
    read_key(dir, name)
}

fn read_key(dir: &Path, name: &str) -> Result<CacheKey> {
    let public_file = dir.join(format!("{name}.public"));
    let public =
        fs::read_to_string(&public_file).with_context(|| format!("reading {}", public_file.display()))?;
    ensure!(
        public.starts_with(&format!("{name}:")),
        "{} does not hold a public key named {name}",
        public_file.display()
    );
    Ok(CacheKey {
        public,
        secret_file: dir.join(format!("{name}.secret")),
    })
}

/// The settings every Nix command here runs with, whatever the host's nix.conf says: no build
/// users (CI is root without a nixbld group), no substituters unless a command names them (no
/// network), and no memory of earlier answers from a cache (a cache rebuilt at the same URL
/// has new NAR hashes; a path missing in one test must be asked for again in the next).
const NIX_CONFIG: &str = "experimental-features = nix-command
build-users-group =
substituters =
narinfo-cache-negative-ttl = 0
narinfo-cache-positive-ttl = 0
";

/// A Nix command (`nix`, `nix-build`, `nix-env`, `nix-store`) with [`NIX_CONFIG`].
pub fn nix_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", NIX_CONFIG);
    cmd
}

/// The store URL of the Nix store under `root` (a mounted target or a directory).
pub fn root_store(root: &Path) -> String {
    format!("local?root={}", root.display())
}

/// What `nixos-install --system SYSTEM --option substituters URL --option trusted-public-keys
/// KEY` does to `root` before it enters the system: `nix-env --store ROOT -p
/// ROOT/nix/var/nix/profiles/system --set SYSTEM`, which substitutes the closure into the
/// store under `root` and makes it the system profile's first generation. Returns the output
/// whatever the exit status.
pub fn set_system_profile(
    root: &Path,
    system: &StorePath,
    substituter: &str,
    trusted_public_key: &str,
) -> Result<ToolOutput> {
    run_tool_unchecked(
        nix_command("nix-env")
            .arg("--store")
            .arg(root_store(root))
            .arg("-p")
            .arg(root.join("nix/var/nix/profiles/system"))
            .arg("--set")
            .arg(system.as_str())
            .args(["--option", "substituters", substituter])
            .args(["--option", "trusted-public-keys", trusted_public_key]),
    )
}

/// `nix-store --verify --check-contents` on the store under `root`: every registered path is
/// there and hashes as recorded. Fails when it reports anything but its progress, and when
/// `root` has no Nix database (it would create an empty store and find nothing wrong).
pub fn verify_store(root: &Path) -> Result<String> {
    let db = root.join("nix/var/nix/db/db.sqlite");
    ensure!(
        db.is_file(),
        "{} has no Nix store: {} is missing",
        root.display(),
        db.display()
    );
    let out = run_tool_unchecked(
        nix_command("nix-store")
            .arg("--store")
            .arg(root_store(root))
            .args(["--verify", "--check-contents"]),
    )?;
    const PROGRESS: [&str; 4] = [
        "reading the Nix store...",
        "checking path existence...",
        "checking link hashes...",
        "checking store hashes...",
    ];
    let text = out.combined();
    let problems: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty() && !PROGRESS.contains(&line.trim()))
        .collect();
    if !out.status.success() || !problems.is_empty() {
        bail!(
            "the Nix store under {} does not verify:\n{}\n{}",
            root.display(),
            problems.join("\n"),
            out.describe()
        );
    }
    Ok(text)
}

/// The store path `root`'s system profile (`/nix/var/nix/profiles/system`) points at, through
/// its generation links, as the booted system would see it.
pub fn system_profile(root: &Path) -> Result<StorePath> {
    let mut link = root.join("nix/var/nix/profiles/system");
    for _ in 0..8 {
        let target =
            fs::read_link(&link).with_context(|| format!("reading the symlink {}", link.display()))?;
        if let Ok(path) = StorePath::parse(&target.to_string_lossy()) {
            let inside = root.join(path.as_str().trim_start_matches('/'));
            ensure!(
                inside.exists(),
                "{} points at {path}, which is not in the store under {}",
                link.display(),
                root.display()
            );
            return Ok(path);
        }
        link = match target.strip_prefix("/") {
            Ok(absolute) => root.join(absolute),
            Err(_) => link.parent().unwrap_or(root).join(target),
        };
    }
    bail!(
        "{}: too many symlinks before a store path",
        root.join("nix/var/nix/profiles/system").display()
    )
}

/// Holds an exclusive `flock` on `path` until the returned file is dropped.
fn lock_exclusive(path: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let file = File::create(path).with_context(|| format!("creating the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor that `file` keeps open; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
    }
    Ok(file)
}

/// The number of non-directories under `dir` and their bytes (symlinks count, with the size
/// of the link).
fn tree_totals(dir: &Path) -> Result<(u64, u64)> {
    let meta = fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    if !meta.is_dir() {
        return Ok((1, meta.len()));
    }
    let mut totals = (0, 0);
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let (files, bytes) = tree_totals(
            &entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path(),
        )?;
        totals.0 += files;
        totals.1 += bytes;
    }
    Ok(totals)
}

/// Removes a tree that holds store paths, whose directories Nix made read-only.
fn remove_tree(dir: &Path) -> Result<()> {
    run_tool(Command::new("chmod").arg("-R").arg("u+w").arg(dir))?;
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The stand-in `nixos-install` reports what its Nix left under the installer's `/nix` and
/// `/root` (RAM: the installer's root is a tmpfs); Nix's store database alone, or its
/// evaluation and fetcher caches, take more than 64 KiB, and they belong on the target.
pub fn nix_left_nothing_in_ram(out: &crate::RunOutcome) -> Result<()> {
    let ram = out
        .lines_containing("install: stand-in: in the installer's RAM after the install: ")
        .next()
        .context("the stand-in did not report the installer's RAM")?;
    for dir in ["/nix", "/root"] {
        let kib: u64 = ram
            .split(&format!(" {dir} "))
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("cannot read {dir} in {ram:?}"))?;
        ensure!(
            kib < 64,
            "Nix left {kib} KiB under the installer's {dir} (RAM): {ram}"
        );
    }
    Ok(())
}
