//! The flake access token for the install step alone: a Nix configuration file in the
//! installer's RAM (never under the target's root), readable by root only, which the install
//! command's Nix reads through `NIX_USER_CONF_FILES` after /etc/nix/nix.conf (both Debian's
//! Nix 2.8 and current ones: `loadConfFile` in src/libstore/globals.cc). Not an argument or
//! `NIX_CONFIG`: /proc shows those to every process and the runner logs the command line.

use crate::input::access_token::{AccessToken, TokenHost};
use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The installer's own runtime directory, a tmpfs in its RAM.
pub const DIR: &str = "/run/nixos-kexec";
const NAME: &str = "nix-access-tokens.conf";

/// The file, overwritten with zeros and removed when dropped: as soon as the install step
/// ends, whichever way it ends.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// Writes the Nix configuration that gives Nix `token` for `host`, in `dir`.
    pub fn write(dir: &Path, host: &TokenHost, token: &AccessToken) -> Result<TokenFile> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(NAME);
        // A file left by an earlier attempt in this boot is wiped, not reused.
        crate::installer::steps::keys::wipe_file(&path);
        // The guard exists before the first byte is written, so a failed write is cleaned up too.
        let file = TokenFile { path };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file.path)
            .with_context(|| format!("creating {}", file.path.display()))?;
        out.write_all(host.nix_conf(token).as_bytes())
            .and_then(|()| out.sync_all())
            .with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file)
    }

    /// For `NIX_USER_CONF_FILES`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        crate::installer::steps::keys::wipe_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::flake::UserFlake;
    use crate::secret::Secret;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_only_while_held_and_gone_after() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run/nixos-kexec");
        let host = TokenHost::of(Some(
            &UserFlake::parse("github:me/private?host=git.corp.example#web1").unwrap(),
        ))
        .unwrap();
        let token = AccessToken::parse(Secret::new(b"ghp_secret\n".to_vec()), "token").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let file = TokenFile::write(&run_dir, &host, &token).unwrap();
        let path = file.path().to_path_buf();
        assert_eq!(path, run_dir.join("nix-access-tokens.conf"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "access-tokens = git.corp.example=ghp_secret\n"
        );
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&run_dir), 0o700);
        drop(file);
        assert!(!path.exists(), "the token file outlived its guard");
        // One left behind (an attempt that was killed) is replaced, not appended to or reused.
        std::fs::write(&path, "access-tokens = stale=stale\n").unwrap();
        let file = TokenFile::write(&run_dir, &host, &token).unwrap();
        assert_eq!(
            std::fs::read_to_string(file.path()).unwrap(),
            "access-tokens = git.corp.example=ghp_secret\n"
        );
        assert_eq!(mode(&path), 0o600);
        drop(file);
        assert!(!path.exists(), "the token file outlived its guard");
    }
}
