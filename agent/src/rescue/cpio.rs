//! A minimal newc cpio writer for the archive appended to the installer's initrd at kexec
//! time (the kernel unpacks concatenated archives; later files win). Secrets travel only here,
//! so nothing here ever logs file contents.

use crate::secret::Secret;
use std::io::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    /// Every file's bytes are held as a [`Secret`]: the archive is where secrets travel.
    pub data: Secret,
    /// Masked in dry-run listings.
    pub secret: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: Vec<Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

impl Archive {
    /// Adds a file, and its parent directories if not yet added.
    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Secret>, secret: bool) {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, dirs)| dirs)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            if !self.entries.iter().any(|e| e.path == parent) {
                self.entries.push(Entry {
                    path: parent.clone(),
                    mode: S_IFDIR | 0o755,
                    data: Secret::new(Vec::new()),
                    secret: false,
                });
            }
        }
        self.entries.push(Entry {
            path: path.to_string(),
            mode: S_IFREG | mode,
            data: data.into(),
            secret,
        });
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A listing for `--dry-run`: paths, modes and sizes, secret contents never shown.
    pub fn listing(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| {
                let kind = if e.mode & S_IFDIR != 0 { "dir " } else { "file" };
                let what = if e.secret {
                    " (secret, contents not shown)".to_string()
                } else {
                    String::new()
                };
                format!(
                    "{kind} /{} mode {:o}, {} bytes{what}",
                    e.path,
                    e.mode & 0o7777,
                    e.data.len()
                )
            })
            .collect()
    }

    /// The archive, in one buffer of its final size (growing would leave copies of the
    /// secrets behind).
    pub fn to_bytes(&self) -> Secret {
        let size: usize = self
            .entries
            .iter()
            .map(|e| entry_size(&e.path, e.data.len()))
            .sum::<usize>()
            + entry_size("TRAILER!!!", 0)
            + 512;
        let mut out = Vec::with_capacity(size);
        for (index, entry) in self.entries.iter().enumerate() {
            write_entry(
                &mut out,
                index as u32 + 1,
                &entry.path,
                entry.mode,
                entry.data.as_bytes(),
            );
        }
        write_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
        pad(&mut out, 512);
        Secret::new(out)
    }
}

/// Header, name and data of one entry, each padded to 4 bytes as newc wants.
fn entry_size(path: &str, data: usize) -> usize {
    (110 + path.len() + 1).next_multiple_of(4) + data.next_multiple_of(4)
}

fn pad(out: &mut Vec<u8>, to: usize) {
    while !out.len().is_multiple_of(to) {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, inode: u32, path: &str, mode: u32, data: &[u8]) {
    let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
    let name_size = path.len() + 1;
    let header = format!(
        "070701{inode:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{name_size:08X}{:08X}",
        0, // uid
        0, // gid
        0, // mtime: fixed, so the same input gives the same archive
        data.len(),
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        0, // check
    );
    let _ = out.write_all(header.as_bytes());
    let _ = out.write_all(path.as_bytes());
    out.push(0);
    pad(out, 4);
    let _ = out.write_all(data);
    pad(out, 4);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gnu_cpio_reads_it_back() {
        let mut archive = Archive::default();
        archive.file(
            "/etc/nixos-kexec/runtime-info.json",
            0o644,
            b"{\"version\":1}".to_vec(),
            false,
        );
        archive.file(
            "/etc/nixos-kexec/secrets/disk-passphrase",
            0o600,
            b"hunter2".to_vec(),
            true,
        );
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio (Debian: cpio) is needed for this test");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(archive.to_bytes().as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let secret = dir.path().join("etc/nixos-kexec/secrets/disk-passphrase");
        assert_eq!(std::fs::read(&secret).unwrap(), b"hunter2");
        let mode = std::fs::metadata(&secret).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/nixos-kexec/runtime-info.json")).unwrap(),
            "{\"version\":1}"
        );
        let listing = archive.listing().join("\n");
        assert!(!listing.contains("hunter2"));
        assert!(listing.contains("secret, contents not shown"));
    }
}
