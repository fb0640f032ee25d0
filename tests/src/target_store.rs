//! The Nix store an install left on a target disk, read on the host by the host's own Nix
//! (Debian's nix-bin) as a chroot store (`local?root=DIR`): an independent check of what the
//! installer's Nix wrote.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::inspect::ext4_copy_dir;
use crate::tool::run_tool;

/// A target's `/nix` (store and database) under a root directory of the host.
pub struct TargetStore {
    root: PathBuf,
    /// The temporary directory of a copy, removed with it.
    _copy: Option<tempfile::TempDir>,
}

impl TargetStore {
    /// Copies `/nix` out of the ext4 filesystem image `part` (the target's root).
    pub fn from_ext4(part: &Path) -> Result<TargetStore> {
        let root = tempfile::Builder::new()
            .prefix("nixos-kexec-target-store-")
            .tempdir()
            .context("creating a directory for the target's store")?;
        ext4_copy_dir(part, "/nix", root.path())
            .with_context(|| format!("copying /nix out of {}", part.display()))?;
        Ok(TargetStore {
            root: root.path().to_path_buf(),
            _copy: Some(root),
        })
    }

    /// The store under `root` as it is (`root/nix/store`, `root/nix/var/nix/db`).
    pub fn at(root: &Path) -> TargetStore {
        TargetStore {
            root: root.to_path_buf(),
            _copy: None,
        }
    }

    /// The directory holding `nix/store` and `nix/var`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `nix-store --store local?root=ROOT ARGS`; its stdout.
    pub fn nix_store(&self, args: &[&str]) -> Result<String> {
        let store = format!("local?root={}", self.root().display());
        // The host has no nixbld group; nothing is built here.
        let out = run_tool(
            Command::new("nix-store")
                .args(["--store", &store, "--option", "build-users-group", ""])
                .args(args),
        )?;
        Ok(out.stdout_str())
    }

    /// Whether the store's database has `path` (its NAR hash, as `nix-store -q --hash` says).
    pub fn registered_hash(&self, path: &str) -> Result<String> {
        let hash = self.nix_store(&["-q", "--hash", path])?.trim().to_string();
        ensure!(
            hash.starts_with("sha256:"),
            "no NAR hash registered for {path}: {hash:?}"
        );
        Ok(hash)
    }

    /// `nix-store --verify --check-contents`: every registered path exists and its contents
    /// hash to what the database says (the command fails otherwise).
    pub fn verify_contents(&self) -> Result<()> {
        self.nix_store(&["--verify", "--check-contents"])
            .context("nix-store --verify --check-contents on the target's store")?;
        Ok(())
    }

    /// The store path the profile at `profile` (e.g. `/nix/var/nix/profiles/system`) leads
    /// to, its links followed inside the copy.
    pub fn profile_target(&self, profile: &str) -> Result<String> {
        let mut path = PathBuf::from(profile);
        for _ in 0..16 {
            let inside = self.root().join(path.strip_prefix("/").unwrap_or(&path));
            let meta = inside
                .symlink_metadata()
                .with_context(|| format!("{} (from {profile}) is not in the target", path.display()))?;
            if !meta.file_type().is_symlink() {
                ensure!(
                    path.starts_with("/nix/store") && path.components().count() == 4,
                    "{profile} leads to {}, not a store path",
                    path.display()
                );
                return path
                    .to_str()
                    .map(str::to_string)
                    .with_context(|| format!("{} is not UTF-8", path.display()));
            }
            let link =
                std::fs::read_link(&inside).with_context(|| format!("reading {}", inside.display()))?;
            path = match path.parent() {
                Some(parent) if link.is_relative() => parent.join(link),
                _ => link,
            };
        }
        bail!("{profile}: too many links")
    }
}
