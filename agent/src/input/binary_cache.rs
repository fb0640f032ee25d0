//! Nix binary caches as the input names them: a prebuilt system's store path, the caches
//! (substituters) to download it from, and the keys their signatures must verify with. Parsed
//! once here; [`Narinfo`] reads what a cache says about a path and checks its signatures the
//! way Nix does, so the installer can refuse before the wipe what Nix would refuse after it.

use crate::error::user_error;
use crate::input::http;
use anyhow::Result;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

pub const STORE_DIR: &str = "/nix/store";
/// Nix's own base-32 alphabet (no e, o, u, t): store path hashes and narinfo hashes use it.
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
const HASH_CHARS: usize = 32;
/// Nix's limit for the name part of a store path.
const MAX_NAME: usize = 211;
/// The key Nix trusts when nix.conf names none (its built-in `trusted-public-keys`), which
/// the installer's Nix keeps, since the install adds the operator's keys with `extra-`.
pub const NIXOS_CACHE_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// `/nix/store/<32 nix32 chars>-<name>`, as `nix build` prints a built system.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    pub fn parse(text: &str) -> Result<StorePath> {
        let bad = |why: &str| {
            user_error(
                format!("system {text:?} is not a Nix store path: {why}."),
                "give the path that `nix build .#nixosConfigurations.HOST.config.system.build.toplevel --print-out-paths` prints, e.g. /nix/store/0123…-nixos-system-web1-26.05.",
            )
        };
        let base = text
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| bad("it does not start with /nix/store/"))?;
        let (hash, name) = base
            .split_at_checked(HASH_CHARS)
            .ok_or_else(|| bad("it is too short"))?;
        if !hash.bytes().all(|b| NIX32.contains(&b)) {
            return Err(bad("its hash part is not 32 characters of Nix's base-32"));
        }
        let name = name
            .strip_prefix('-')
            .ok_or_else(|| bad("a '-' must follow the 32-character hash"))?;
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
        if name.is_empty() || name.len() > MAX_NAME || name.starts_with('.') || !name.chars().all(name_ok) {
            return Err(bad("its name part is empty, too long, starts with '.' or has a character Nix does not allow (a path below the store path is not one)"));
        }
        Ok(StorePath(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 hash characters, which name the path's `.narinfo` in a binary cache.
    pub fn hash_part(&self) -> &str {
        &self.0[STORE_DIR.len() + 1..STORE_DIR.len() + 1 + HASH_CHARS]
    }

    /// The file a binary cache describes the path in: `HASH.narinfo`.
    pub fn narinfo_file(&self) -> String {
        format!("{}.narinfo", self.hash_part())
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a binary cache is: over HTTP(S), or a directory (`file://`) on the installer, as
/// `nix copy --to file://DIR` writes it. Nix's own URL, with any `?priority=…` it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Substituter {
    url: String,
    location: Location,
    /// `?trusted=1`: Nix takes the cache's paths without signatures.
    trusted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Http(http::Url),
    Directory(String),
}

impl Substituter {
    pub fn parse(text: &str) -> Result<Substituter> {
        let (base, query) = match text.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (text, None),
        };
        let base = base.trim_end_matches('/');
        let location = if let Some(dir) = base.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(user_error(
                    format!("substituter {text:?} names a relative directory."),
                    "write a cache directory on the installer as file:///ABSOLUTE/PATH.",
                ));
            }
            Location::Directory(dir.to_string())
        } else if base.starts_with("http://") || base.starts_with("https://") {
            Location::Http(http::Url::parse(&format!("{base}/")).map_err(|e| {
                user_error(
                    format!("substituter {:?} is not a usable URL: {e}", http::redact(text)),
                    "write it as http[s]://HOST[:PORT][/PATH], e.g. https://cache.example.com.",
                )
            })?)
        } else {
            return Err(user_error(
                format!(
                    "substituter {:?} is not an http://, https:// or file:// binary cache.",
                    http::redact(text)
                ),
                "serve the cache over HTTP(S) (`nix copy --to file://DIR` and any web server, or an S3 bucket's https:// URL), then name that URL.",
            ));
        };
        let trusted = query.is_some_and(|q| {
            q.split('&')
                .any(|pair| pair == "trusted=1" || pair == "trusted=true")
        });
        Ok(Substituter {
            url: text.to_string(),
            location,
            trusted,
        })
    }

    /// As given, for Nix.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn trusted(&self) -> bool {
        self.trusted
    }

    /// Where `file` of the cache is (`nix-cache-info`, `HASH.narinfo`).
    pub fn file(&self, file: &str) -> CacheFile {
        match &self.location {
            Location::Http(url) => CacheFile::Http(url.join_file(file)),
            Location::Directory(dir) => CacheFile::Local(format!("{dir}/{file}")),
        }
    }
}

/// One file of a binary cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheFile {
    Http(http::Url),
    Local(String),
}

impl fmt::Display for CacheFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheFile::Http(url) => url.fmt(f),
            CacheFile::Local(path) => f.write_str(path),
        }
    }
}

impl fmt::Display for Substituter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&http::redact(&self.url))
    }
}

/// `NAME:BASE64` of an Ed25519 public key, as `nix key convert-secret-to-public` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: [u8; 32],
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey> {
        let bad = |why: &str| {
            user_error(
                format!("trusted public key {text:?} is not a Nix signing key: {why}."),
                "give the line `nix key convert-secret-to-public < SECRET` prints, NAME:BASE64, e.g. cache.example.com-1:6NCH…=.",
            )
        };
        let (name, encoded) = text
            .split_once(':')
            .ok_or_else(|| bad("there is no ':' after the key's name"))?;
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(bad("its name is empty or has white space"));
        }
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| bad("the part after ':' is not 32 bytes in base64"))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, self.key)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            base64::engine::general_purpose::STANDARD.encode(self.key)
        )
    }
}

/// Serde as the text the type parses from; `$text` names the method that gives it back. The
/// substituter is written as given, with its query unredacted: the plan and the runtime info
/// carry what Nix gets.
macro_rules! serde_as_text {
    ($type:ty, $text:ident) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(&self.$text())
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                <$type>::parse(&text).map_err(|e| serde::de::Error::custom(crate::error::one_line(&e)))
            }
        }
    };
}

pub(crate) use serde_as_text;

serde_as_text!(StorePath, as_str);
serde_as_text!(Substituter, as_str);
serde_as_text!(PublicKey, to_string);

/// What a binary cache says about one store path (`HASH.narinfo`): the fields a signature
/// covers, and the signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Narinfo {
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    /// Base names, as the file lists them.
    pub references: Vec<String>,
    /// `(key name, signature bytes)`.
    pub signatures: Vec<(String, Vec<u8>)>,
}

/// Why a narinfo's signatures do not let Nix take the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unverified {
    Unsigned,
    /// Signed only by keys that are not trusted: their names.
    UnknownKeys(Vec<String>),
    /// A trusted key's signature does not match the contents: that key's name.
    BadSignature(String),
}

impl fmt::Display for Unverified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unverified::Unsigned => f.write_str("it is not signed"),
            Unverified::UnknownKeys(names) => write!(
                f,
                "it is signed only by {}, which is not a trusted public key",
                names.join(", ")
            ),
            Unverified::BadSignature(name) => {
                write!(f, "its signature by {name} does not verify (the narinfo was changed after signing, or another key of that name signed it)")
            }
        }
    }
}

impl Narinfo {
    pub fn parse(text: &str) -> Result<Narinfo> {
        let mut store_path = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = Vec::new();
        let mut signatures = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| anyhow::anyhow!("narinfo line {line:?} is not KEY: VALUE"))?;
            match key {
                "StorePath" => store_path = Some(value.to_string()),
                "NarHash" => nar_hash = Some(value.to_string()),
                "NarSize" => {
                    nar_size = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| anyhow::anyhow!("narinfo NarSize {value:?} is not a number"))?,
                    )
                }
                "References" => references = value.split_whitespace().map(str::to_string).collect(),
                "Sig" => {
                    let (name, encoded) = value
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("narinfo Sig {value:?} has no key name"))?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|_| anyhow::anyhow!("narinfo Sig {value:?} is not base64"))?;
                    signatures.push((name.to_string(), bytes));
                }
                _ => {}
            }
        }
        let missing = |field: &str| anyhow::anyhow!("the narinfo has no {field}");
        Ok(Narinfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references,
            signatures,
        })
    }

    /// What the signatures sign (Nix's `ValidPathInfo::fingerprint`): version, path, NAR hash
    /// in base 32, NAR size and the references as full paths, in order.
    pub fn fingerprint(&self) -> Result<String> {
        let mut references: Vec<String> = self
            .references
            .iter()
            .map(|r| format!("{STORE_DIR}/{r}"))
            .collect();
        references.sort();
        Ok(format!(
            "1;{};{};{};{}",
            self.store_path,
            nar_hash_base32(&self.nar_hash)?,
            self.nar_size,
            references.join(",")
        ))
    }

    /// Ok when a trusted key signed this narinfo as it is.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), Unverified> {
        if self.signatures.is_empty() {
            return Err(Unverified::Unsigned);
        }
        let fingerprint = self.fingerprint().map_err(|_| Unverified::Unsigned)?;
        let mut bad = None;
        for (name, signature) in &self.signatures {
            for key in trusted.iter().filter(|k| &k.name == name) {
                if key.verifies(fingerprint.as_bytes(), signature) {
                    return Ok(());
                }
                bad = Some(name.clone());
            }
        }
        Err(match bad {
            Some(name) => Unverified::BadSignature(name),
            None => Unverified::UnknownKeys(self.signatures.iter().map(|(n, _)| n.clone()).collect()),
        })
    }
}

/// `sha256:` + Nix base 32, the form fingerprints use, from that or base 16 (older caches).
fn nar_hash_base32(hash: &str) -> Result<String> {
    let digest = hash
        .strip_prefix("sha256:")
        .ok_or_else(|| anyhow::anyhow!("NarHash {hash:?} is not sha256"))?;
    if digest.len() == 52 && digest.bytes().all(|b| NIX32.contains(&b)) {
        return Ok(hash.to_string());
    }
    if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        return Ok(format!("sha256:{}", nix32(&bytes)));
    }
    anyhow::bail!("NarHash {hash:?} is neither base 32 nor base 16")
}

/// Nix's base 32: the bits of the digest read from the end, five at a time.
fn nix32(bytes: &[u8]) -> String {
    let chars = (bytes.len() * 8).div_ceil(5);
    (0..chars)
        .rev()
        .map(|n| {
            let bit = n * 5;
            let (i, j) = (bit / 8, bit % 8);
            let low = u16::from(bytes[i]) >> j;
            let high = bytes.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
            NIX32[usize::from((low | high) & 0x1f)] as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-nixos-system-web1-26.05";

    fn signed(key_name: &str, seed: [u8; 32], narinfo: &mut Narinfo) -> PublicKey {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("key");
        let signature = pair.sign(narinfo.fingerprint().expect("fingerprint").as_bytes());
        narinfo
            .signatures
            .push((key_name.into(), signature.as_ref().to_vec()));
        let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
        PublicKey {
            name: key_name.into(),
            key: public.try_into().expect("32 bytes"),
        }
    }

    fn narinfo() -> Narinfo {
        Narinfo::parse(&format!(
            "StorePath: {PATH}\nURL: nar/1.nar.zst\nCompression: zstd\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 4096\nReferences: 2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-nixos-system-web1-26.05 0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-busybox\nDeriver: x.drv\n"
        ))
        .expect("parses")
    }

    #[test]
    fn store_paths_are_checked_as_nix_checks_them() {
        let path = StorePath::parse(PATH).expect("valid");
        assert_eq!(path.hash_part(), "2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2");
        for bad in [
            "nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-x",
            "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2",
            "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdle-x",
            "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-x/bin",
            "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-.x",
            "/nix/store/short-x",
            "/nix/store/ü",
        ] {
            let e = StorePath::parse(bad).expect_err(bad);
            assert!(
                crate::error::one_line(&e).contains("Fix: give the path"),
                "{bad}: {e:#}"
            );
        }
    }

    #[test]
    fn substituters_are_http_https_or_directories() {
        let s = Substituter::parse("https://cache.example.com/nix/?priority=10").expect("https");
        assert_eq!(
            s.file("nix-cache-info").to_string(),
            "https://cache.example.com/nix/nix-cache-info"
        );
        assert_eq!(s.as_str(), "https://cache.example.com/nix/?priority=10");
        assert!(!s.trusted());
        let s = Substituter::parse("http://10.0.2.2:8080").expect("http");
        assert_eq!(s.file("x.narinfo").to_string(), "http://10.0.2.2:8080/x.narinfo");
        let s = Substituter::parse("file:///media/cache?trusted=1").expect("file");
        assert_eq!(
            s.file("nix-cache-info").to_string(),
            "/media/cache/nix-cache-info"
        );
        assert!(s.trusted());
        for bad in [
            "s3://bucket",
            "ssh://host",
            "file://relative",
            "cache.example.com",
        ] {
            assert!(Substituter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn public_keys_are_a_name_and_32_bytes() {
        let key = PublicKey::parse(NIXOS_CACHE_KEY).expect("the NixOS key");
        assert_eq!(key.name(), "cache.nixos.org-1");
        assert_eq!(key.to_string(), NIXOS_CACHE_KEY);
        for bad in ["cache.nixos.org-1", ":AAAA", "k:AAAA", "k:not base64!"] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fingerprint_has_full_sorted_references() {
        assert_eq!(
            narinfo().fingerprint().expect("fingerprint"),
            format!("1;{PATH};sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s;4096;/nix/store/0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-busybox,{PATH}")
        );
    }

    #[test]
    fn nix32_matches_nix() {
        // `nix hash to-base32 sha256:<hex>` for the SHA-256 of the empty string.
        let hex = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            nar_hash_base32(hex).expect("converts"),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn signatures_verify_only_with_the_signing_key_and_unchanged_fields() {
        let mut info = narinfo();
        let key = signed("cache.example.com-1", [7; 32], &mut info);
        assert_eq!(info.verify(std::slice::from_ref(&key)), Ok(()));
        assert_eq!(
            info.verify(&[]),
            Err(Unverified::UnknownKeys(vec!["cache.example.com-1".into()]))
        );
        let other = PublicKey {
            key: PublicKey::parse(NIXOS_CACHE_KEY).expect("key").key,
            ..key.clone()
        };
        assert_eq!(
            info.verify(&[other]),
            Err(Unverified::BadSignature("cache.example.com-1".into()))
        );
        let mut changed = info.clone();
        changed.nar_size += 1;
        assert_eq!(
            changed.verify(&[key]),
            Err(Unverified::BadSignature("cache.example.com-1".into()))
        );
        let mut unsigned = narinfo();
        unsigned.signatures.clear();
        assert_eq!(unsigned.verify(&[]), Err(Unverified::Unsigned));
    }
}
