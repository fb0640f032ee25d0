//! Small initrd archives for `Vm::extra_initrd`: newc cpio written in Rust, or by cpio(1)
//! from a directory.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::tool::command_line;

/// An uncompressed newc cpio archive built in memory, e.g. for secrets or runtime info:
///
/// ```no_run
/// # use nixos_kexec_tests::Cpio;
/// Cpio::new()
///     .file("etc/nixos-kexec/secrets/disk-passphrase", 0o600, b"hunter2")
///     .write_to("/tmp/secrets.cpio".as_ref())?;
/// # Ok::<(), anyhow::Error>(())
/// ```
///
/// Parent directories are added automatically (mode 0755). Owner is root unless
/// [`Cpio::owner`] says otherwise.
#[derive(Debug, Clone, Default)]
pub struct Cpio {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    mode: u32,
    uid: u32,
    gid: u32,
    data: Vec<u8>,
}

impl Entry {
    fn new(name: String, mode: u32, data: Vec<u8>) -> Entry {
        Entry {
            name,
            mode,
            uid: 0,
            gid: 0,
            data,
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    fn normalize(path: &str) -> String {
        path.trim_start_matches('/').trim_end_matches('/').to_string()
    }

    fn add_parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if !self.entries.iter().any(|e| e.name == acc) {
                self.entries
                    .push(Entry::new(acc.clone(), S_IFDIR | 0o755, Vec::new()));
            }
        }
    }

    /// A regular file at `path` (absolute or relative to the archive root) with permission
    /// bits `mode` (e.g. 0o600).
    pub fn file(mut self, path: &str, mode: u32, data: impl AsRef<[u8]>) -> Self {
        let p = Self::normalize(path);
        self.add_parents(&p);
        self.entries
            .push(Entry::new(p, S_IFREG | (mode & 0o7777), data.as_ref().to_vec()));
        self
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let p = Self::normalize(path);
        self.add_parents(&p);
        self.entries
            .push(Entry::new(p, S_IFDIR | (mode & 0o7777), Vec::new()));
        self
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let p = Self::normalize(path);
        self.add_parents(&p);
        self.entries
            .push(Entry::new(p, S_IFLNK | 0o777, target.as_bytes().to_vec()));
        self
    }

    /// Gives the entry at `path` (added before) the numeric owner `uid`:`gid`.
    pub fn owner(mut self, path: &str, uid: u32, gid: u32) -> Self {
        let p = Self::normalize(path);
        for entry in self.entries.iter_mut().filter(|e| e.name == p) {
            entry.uid = uid;
            entry.gid = gid;
        }
        self
    }

    /// The archive bytes (newc, with trailer, padded to 4 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 1u32;
        let push = |out: &mut Vec<u8>, entry: &Entry, ino: u32| {
            let Entry {
                name,
                mode,
                uid,
                gid,
                data,
            } = entry;
            let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
            let header = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                ino,
                mode,
                uid,
                gid,
                nlink,
                0, // mtime
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0 // check
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
            out.extend_from_slice(data);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        };
        for entry in &self.entries {
            push(&mut out, entry, ino);
            ino += 1;
        }
        push(&mut out, &Entry::new("TRAILER!!!".into(), 0, Vec::new()), 0);
        out
    }

    /// Writes the archive to `path`.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        fs::write(path, self.to_bytes()).with_context(|| format!("writing cpio archive {}", path.display()))
    }
}

/// Packs the contents of directory `dir` (paths relative to it, owner root) into the newc
/// archive `out` with `find . | sort | cpio -o -H newc --reproducible -R 0:0`.
pub fn cpio_from_dir(dir: &Path, out: &Path) -> Result<()> {
    ensure!(
        dir.is_dir(),
        "cpio_from_dir: {} is not a directory",
        dir.display()
    );
    let mut names = Vec::new();
    collect(dir, dir, &mut names)?;
    names.sort();
    let mut list = String::new();
    for n in &names {
        list.push_str(n);
        list.push('\n');
    }
    let outfile = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cmd = Command::new("cpio");
    cmd.args(["-o", "-H", "newc", "--reproducible", "-R", "0:0", "--quiet"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(outfile))
        .stderr(Stdio::piped());
    let line = format!("(cd {} && {})", dir.display(), command_line(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}` (is cpio installed?)"))?;
    {
        let mut stdin = child.stdin.take().context("cpio stdin")?;
        stdin
            .write_all(list.as_bytes())
            .with_context(|| format!("feeding file list to `{line}`"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !output.status.success() {
        bail!(
            "external command failed\ncommand: {line}\nstatus: {}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn collect(root: &Path, dir: &Path, names: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let path = entry.path();
        let rel = path.strip_prefix(root).context("path outside root")?;
        names.push(rel.to_string_lossy().into_owned());
        let ft = entry
            .file_type()
            .with_context(|| format!("stat {}", path.display()))?;
        if ft.is_dir() {
            collect(root, &path, names)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool::run_tool;

    #[test]
    fn rust_cpio_is_read_by_cpio_tool() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let a = dir.path().join("a.cpio");
        Cpio::new()
            .file("/etc/nixos-kexec/secrets/disk-passphrase", 0o600, b"pw")
            .symlink("bin/x", "busybox")
            .dir("mnt", 0o755)
            .owner("bin/x", 1000, 100)
            .write_to(&a)?;
        let out = run_tool(Command::new("cpio").args(["-itv", "--quiet", "-F"]).arg(&a))?;
        let listing = out.stdout_str();
        assert!(listing.contains("-rw-------"), "{listing}");
        assert!(
            listing.contains("etc/nixos-kexec/secrets/disk-passphrase"),
            "{listing}"
        );
        assert!(listing.contains("bin/x -> busybox"), "{listing}");
        let numeric = run_tool(
            Command::new("cpio")
                .args(["-itv", "--numeric-uid-gid", "--quiet", "-F"])
                .arg(&a),
        )?;
        assert!(
            numeric
                .stdout_str()
                .lines()
                .any(|l| l.contains(" 1000 ") && l.contains(" 100 ") && l.ends_with("bin/x -> busybox")),
            "{}",
            numeric.stdout_str()
        );
        let x = dir.path().join("x");
        fs::create_dir(&x)?;
        run_tool(
            Command::new("cpio")
                .args(["-id", "--quiet", "-F"])
                .arg(&a)
                .current_dir(&x),
        )?;
        assert_eq!(
            fs::read(x.join("etc/nixos-kexec/secrets/disk-passphrase"))?,
            b"pw"
        );
        Ok(())
    }

    #[test]
    fn cpio_from_dir_round_trips() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("etc"))?;
        fs::write(src.join("etc/hello"), b"hi")?;
        let out = dir.path().join("o.cpio");
        cpio_from_dir(&src, &out)?;
        let listing = run_tool(Command::new("cpio").args(["-it", "--quiet", "-F"]).arg(&out))?.stdout_str();
        assert_eq!(listing, "etc\netc/hello\n");
        Ok(())
    }
}
