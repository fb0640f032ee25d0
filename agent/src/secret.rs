//! Bytes of a secret (a disk passphrase, a private host key, the archive that carries them):
//! kept out of swap while held, and overwritten when dropped. A rescue system is often a
//! running distribution with swap, where a page of a passphrase could outlive the run on disk.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;
use zeroize::Zeroizing;

pub struct Secret {
    bytes: Zeroizing<Vec<u8>>,
    /// How many bytes `mlock` took, 0 when it did not.
    locked: usize,
}

impl Secret {
    /// Takes `bytes` (moved, not copied) and locks their pages in RAM. Locking is best effort:
    /// without CAP_IPC_LOCK and over RLIMIT_MEMLOCK the kernel refuses, and the secret is still
    /// zeroed at the end.
    pub fn new(bytes: Vec<u8>) -> Secret {
        let bytes = Zeroizing::new(bytes);
        // SAFETY: the range is the vector's own initialised buffer, which stays in place (it is
        // never grown) until `drop` unlocks it.
        let locked = if !bytes.is_empty() && unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) } == 0 {
            bytes.len()
        } else {
            0
        };
        Secret { bytes, locked }
    }

    /// Reads a file into one buffer of its size, so no partial copy is left behind by growing.
    pub fn read(path: &Path) -> Result<Secret> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).saturating_add(1));
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Secret::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// For filling a buffer made with [`Secret::new`] in place, without a copy.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Keeps the first `len` bytes; the rest is zeroed, not just forgotten.
    pub fn truncate(&mut self, len: usize) {
        if let Some(tail) = self.bytes.get_mut(len..) {
            zeroize::Zeroize::zeroize(tail);
        }
        self.bytes.truncate(len);
    }

    pub fn is_locked(&self) -> bool {
        self.locked > 0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        if self.locked > 0 {
            // Zeroed before the pages are unlocked and may be swapped (Zeroizing's own drop
            // would come only after this one).
            let start = self.bytes.as_ptr();
            zeroize::Zeroize::zeroize(&mut *self.bytes);
            // SAFETY: the same range `new` locked; zeroizing keeps the buffer where it is.
            unsafe { libc::munlock(start.cast(), self.locked) };
        }
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret::new(self.bytes.to_vec())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        *self.bytes == *other.bytes
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.bytes.len())
    }
}

impl AsRef<[u8]> for Secret {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Secret {
        Secret::new(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_locked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, b"correct horse").unwrap();
        let secret = Secret::read(&path).unwrap();
        assert_eq!(secret.as_bytes(), b"correct horse");
        // Tests run as root here and in CI, where mlock is allowed.
        // SAFETY: geteuid has no preconditions.
        assert!(secret.is_locked() || unsafe { libc::geteuid() } != 0);
        assert_eq!(format!("{secret:?}"), "Secret(13 bytes)");
        assert_eq!(secret.clone(), secret);
    }
}
