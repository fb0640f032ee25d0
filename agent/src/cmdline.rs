//! The kernel command line: splitting it like the kernel does and picking out our parameters.

use crate::error::user_error;
use anyhow::Result;
use std::collections::BTreeMap;

/// x86 `COMMAND_LINE_SIZE`, including the trailing NUL.
pub const COMMAND_LINE_SIZE: usize = 2048;

/// Every key we accept after the `nixos_kexec.` prefix. Unknown keys are errors so that a typo
/// never silently falls back to a default that could pick the wrong disk.
pub const KNOWN_KEYS: &[&str] = &[
    "info",
    "info_deflate",
    "disk",
    "hostname",
    "config_url",
    "reinstall",
    "dry_run",
    "stop_before",
    "after",
    "layout",
    "ssh_key",
    "nixpkgs",
    "state_version",
    "swap",
    "table",
];

/// Our parameters from one command line, keys normalised (`nixos-kexec.stop-before` is
/// `stop_before`), the last occurrence of a key winning. A flag without `=` has an empty value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    values: BTreeMap<String, String>,
    /// True when the line is as long as the kernel keeps it, so the last parameter may be cut.
    pub possibly_truncated: bool,
}

impl Params {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Adds `KEY=VALUE` (`KEY` without the prefix), as `--param` does on the command line.
    pub fn insert(&mut self, key: &str, value: &str) -> Result<()> {
        let key = normalise_key(key);
        check_known(&key)?;
        self.values.insert(key, value.to_string());
        Ok(())
    }

    /// Parses a whole kernel command line, keeping only `nixos_kexec.*` parameters.
    pub fn parse(cmdline: &str) -> Result<Params> {
        let mut params = Params {
            possibly_truncated: cmdline.trim_end_matches(['\n', '\0']).len() >= COMMAND_LINE_SIZE - 1,
            ..Params::default()
        };
        for word in split(cmdline) {
            let (name, value) = match word.split_once('=') {
                Some((name, value)) => (name, value),
                None => (word.as_str(), ""),
            };
            let Some(key) = strip_prefix(name) else {
                continue;
            };
            params.insert(&key, value)?;
        }
        Ok(params)
    }
}

fn strip_prefix(name: &str) -> Option<String> {
    let (prefix, key) = name.split_once('.')?;
    (prefix.replace('-', "_") == "nixos_kexec").then(|| key.to_string())
}

fn normalise_key(key: &str) -> String {
    key.replace('-', "_")
}

fn check_known(key: &str) -> Result<()> {
    if KNOWN_KEYS.contains(&key) {
        return Ok(());
    }
    Err(user_error(
        format!("Unknown parameter nixos_kexec.{key}."),
        format!(
            "remove it or correct the spelling; known parameters are nixos_kexec.{{{}}}.",
            KNOWN_KEYS.join(",")
        ),
    ))
}

/// Splits like the kernel's `next_arg`: whitespace separates words, double quotes group
/// (and are removed), there are no escapes.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut have_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                have_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if have_word {
                    words.push(std::mem::take(&mut current));
                    have_word = false;
                }
            }
            '\0' => {}
            c => {
                current.push(c);
                have_word = true;
            }
        }
    }
    if have_word {
        words.push(current);
    }
    words
}

/// Decodes `+` and `%XX` as a hand-typed value may use them for spaces (`ssh_key=ssh-ed25519+AAAA...`).
pub fn percent_decode(value: &str) -> Result<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        user_error(
                            format!("Invalid percent-encoding at byte {i} of {value:?}."),
                            "write a literal % as %25 and spaces as + or %20.",
                        )
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| {
        user_error(
            format!("{value:?} does not decode to UTF-8 text."),
            "percent-encode only UTF-8 text.",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_the_kernel() {
        assert_eq!(
            split("a b=\"c d\"  e\n"),
            vec!["a".to_string(), "b=c d".into(), "e".into()]
        );
        assert_eq!(split("\"\""), vec![String::new()]);
    }

    #[test]
    fn picks_our_parameters_last_wins_and_normalises() {
        let p = Params::parse(
            "console=ttyS0 nixos-kexec.disk=/dev/vda nixos_kexec.stop-before=install nixos_kexec.disk=/dev/vdb nixos_kexec.dry_run",
        )
        .unwrap();
        assert_eq!(p.get("disk"), Some("/dev/vdb"));
        assert_eq!(p.get("stop_before"), Some("install"));
        assert_eq!(p.get("dry_run"), Some(""));
        assert!(!p.possibly_truncated);
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = Params::parse("nixos_kexec.dsik=/dev/vda").unwrap_err();
        assert!(err.to_string().contains("nixos_kexec.dsik"), "{err}");
    }

    #[test]
    fn full_length_line_is_flagged() {
        let line = format!("nixos_kexec.info={}", "A".repeat(COMMAND_LINE_SIZE));
        assert!(
            Params::parse(&line[..COMMAND_LINE_SIZE - 1])
                .unwrap()
                .possibly_truncated
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("ssh-ed25519+AAAA%2Bx+me%40host").unwrap(),
            "ssh-ed25519 AAAA+x me@host"
        );
        assert!(percent_decode("bad%zz").is_err());
        assert!(percent_decode("cut%2").is_err());
    }
}
