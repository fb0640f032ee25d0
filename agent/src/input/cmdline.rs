//! The kernel command line: splitting it like the kernel does and picking out our parameters.

use crate::error::user_error;
use crate::input::config::{parameter, parameter_keys, Parameter};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// x86 `COMMAND_LINE_SIZE`, including the trailing NUL.
pub const COMMAND_LINE_SIZE: usize = 2048;

/// Our parameters from one command line, keys normalised (`nixos-kexec.stop-before` is
/// `stop_before`), the last occurrence of a key winning. A flag without `=` has an empty value.
#[derive(Debug, Clone, Default)]
pub struct Params {
    values: BTreeMap<&'static str, (&'static Parameter, String)>,
    /// True when the line is as long as the kernel keeps it, so the last parameter may be cut.
    pub possibly_truncated: bool,
    /// The last serial `console=` of the line: the installed system gets the same console.
    pub serial_console: Option<SerialConsole>,
}

/// A serial console as `console=ttyS0,115200n8` names it (8250 ports, and the PL011 ports of
/// aarch64 machines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsole {
    /// `ttyS0`, `ttyAMA0`.
    pub device: String,
    /// Bits per second; 115200 when the parameter names none.
    pub speed: u32,
}

impl SerialConsole {
    /// Most VPS serial consoles run at this speed, and it is what the bundles' own
    /// `console=` parameters use.
    pub const DEFAULT_SPEED: u32 = 115200;

    /// The value of one `console=` parameter, when it names a serial port.
    pub fn parse(value: &str) -> Option<SerialConsole> {
        let (device, options) = value.split_once(',').unwrap_or((value, ""));
        let number = device
            .strip_prefix("ttyS")
            .or_else(|| device.strip_prefix("ttyAMA"))?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // `115200n8`: the speed, then parity and bits, which are 8N1 anyway.
        let digits: String = options.chars().take_while(char::is_ascii_digit).collect();
        let speed = digits
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .unwrap_or(SerialConsole::DEFAULT_SPEED);
        Some(SerialConsole {
            device: device.to_string(),
            speed,
        })
    }

    /// `console=ttyS0,115200`.
    pub fn kernel_param(&self) -> String {
        format!("console={},{}", self.device, self.speed)
    }

    /// GRUB's `serial --unit=N` for `ttySN` (unit 0 is COM1, as ttyS0 is); the PL011 ports of
    /// aarch64 machines have no unit number there.
    pub fn grub_unit(&self) -> Option<u32> {
        self.device.strip_prefix("ttyS")?.parse().ok()
    }
}

impl Params {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|(_, value)| value.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// In the order of their keys.
    pub fn iter(&self) -> impl Iterator<Item = (&'static Parameter, &str)> {
        self.values
            .values()
            .map(|(parameter, value)| (*parameter, value.as_str()))
    }

    /// Adds `KEY=VALUE` (`KEY` without the prefix), as `--param` does on the command line.
    pub fn insert(&mut self, key: &str, value: &str) -> Result<&'static Parameter> {
        let parameter = known(&normalise_key(key))?;
        self.values.insert(parameter.key, (parameter, value.to_string()));
        Ok(parameter)
    }

    /// Parses a whole kernel command line, keeping only `nixos_kexec.*` parameters.
    pub fn parse(cmdline: &str) -> Result<Params> {
        let mut params = Params {
            possibly_truncated: cmdline.trim_end_matches(['\n', '\0']).len() >= COMMAND_LINE_SIZE - 1,
            ..Params::default()
        };
        let words = split(cmdline);
        if params.possibly_truncated {
            if let Some(last) = words.last().filter(|w| is_ours_or_console(w)) {
                return Err(cut_at_the_limit(last));
            }
        }
        for word in words {
            let (name, value) = match word.split_once('=') {
                Some((name, value)) => (name, value),
                None => (word.as_str(), ""),
            };
            if name == "console" {
                if let Some(console) = SerialConsole::parse(value) {
                    params.serial_console = Some(console);
                }
                continue;
            }
            let Some(key) = strip_prefix(name) else {
                continue;
            };
            params.insert(&key, value)?;
        }
        Ok(params)
    }
}

fn is_ours_or_console(word: &str) -> bool {
    let name = word.split_once('=').map_or(word, |(name, _)| name);
    name == "console" || strip_prefix(name).is_some()
}

/// The kernel keeps only the first `COMMAND_LINE_SIZE - 1` bytes of its command line, so a
/// parameter that ends there may be the front of a longer one (`layout=btrfs-impermanence`
/// kept as `layout=btrfs`), which would install something else than asked.
fn cut_at_the_limit(word: &str) -> anyhow::Error {
    let shown: String = word.chars().take(60).collect();
    let ellipsis = if shown.len() < word.len() { "..." } else { "" };
    user_error(
        format!(
            "The kernel command line is {} bytes long, the most the kernel keeps, so its last parameter `{shown}{ellipsis}` may have been cut short; it is not used.",
            COMMAND_LINE_SIZE - 1
        ),
        "shorten the command line: put long values into the runtime info (nixos_kexec.info_deflate=, nixos_kexec.config_url=, or `nixos-kexec run`, which packs it into the initrd), or drop parameters the installer does not need.",
    )
}

fn strip_prefix(name: &str) -> Option<String> {
    let (prefix, key) = name.split_once('.')?;
    (prefix.replace('-', "_") == "nixos_kexec").then(|| key.to_string())
}

fn normalise_key(key: &str) -> String {
    key.replace('-', "_")
}

/// Unknown keys are errors so that a typo never silently falls back to a default that could
/// pick the wrong disk.
fn known(key: &str) -> Result<&'static Parameter> {
    parameter(key).ok_or_else(|| {
        user_error(
            format!("Unknown parameter nixos_kexec.{key}."),
            format!(
                "remove it or correct the spelling; known parameters are nixos_kexec.{{{}}}.",
                parameter_keys().join(",")
            ),
        )
    })
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

/// A `--param KEY=VALUE` option of our own command line; `--param KEY` is `KEY=`, as a bare
/// word on the kernel's command line is.
pub fn param_option(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').unwrap_or((text, ""));
    Ok((key.to_string(), value.to_string()))
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
    fn the_last_serial_console_with_its_speed() {
        let serial = |line: &str| Params::parse(line).unwrap().serial_console;
        assert_eq!(
            serial("console=ttyS1,57600n8 console=tty0"),
            Some(SerialConsole {
                device: "ttyS1".into(),
                speed: 57600
            })
        );
        let last = serial("console=ttyS0,115200 console=tty0 console=ttyS1").unwrap();
        assert_eq!((last.device.as_str(), last.speed), ("ttyS1", 115200));
        assert_eq!(last.kernel_param(), "console=ttyS1,115200");
        assert_eq!(last.grub_unit(), Some(1));
        let arm = serial("console=ttyAMA0,9600").unwrap();
        assert_eq!((arm.speed, arm.grub_unit()), (9600, None));
        for line in [
            "",
            "console=tty0",
            "console=hvc0",
            "console=ttyS",
            "console=ttySx,115200",
            "nixos_kexec.hostname=ttyS0",
        ] {
            assert_eq!(serial(line), None, "{line:?}");
        }
        assert_eq!(serial("console=ttyS0,fast").unwrap().speed, 115200);
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = Params::parse("nixos_kexec.dsik=/dev/vda").unwrap_err();
        assert!(err.to_string().contains("nixos_kexec.dsik"), "{err}");
    }

    /// A line of exactly the length the kernel keeps, ending in `tail`.
    fn full_line_ending(tail: &str) -> String {
        let line = format!("x={} {tail}", "p".repeat(COMMAND_LINE_SIZE - 4 - tail.len()));
        assert_eq!(line.len(), COMMAND_LINE_SIZE - 1);
        line
    }

    #[test]
    fn a_parameter_ending_at_the_limit_is_refused_not_used() {
        // What the kernel keeps of `nixos_kexec.layout=btrfs-impermanence` at the limit.
        let err = Params::parse(&full_line_ending("nixos_kexec.layout=btrfs")).unwrap_err();
        let text = crate::error::one_line(&err);
        assert!(
            text.contains("`nixos_kexec.layout=btrfs` may have been cut short"),
            "{text}"
        );
        assert!(text.contains("runtime info"), "{text}");
        // The installed system would get the console, so a cut one is not used either.
        assert!(Params::parse(&full_line_ending("console=ttyS1")).is_err());
        // Someone else's parameter at the end does not matter to us.
        let other = Params::parse(&format!(
            "nixos_kexec.layout=btrfs {}",
            &full_line_ending("q=1")[25..]
        ))
        .unwrap();
        assert_eq!(other.get("layout"), Some("btrfs"));
        // One byte short of the limit, nothing can have been cut.
        let short = &full_line_ending("nixos_kexec.disk=/dev/vda")[1..];
        assert_eq!(Params::parse(short).unwrap().get("disk"), Some("/dev/vda"));
    }

    #[test]
    fn unknown_key_lists_the_known_ones() {
        let err = Params::parse("nixos_kexec.dsik=/dev/vda").unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert_eq!(
            user.fix,
            "remove it or correct the spelling; known parameters are nixos_kexec.{info,info_deflate,disk,hostname,config_url,report_url,reinstall,dry_run,stop_before,after,failure_reboot_after,layout,ssh_key,nixpkgs,state_version,swap,table,system,substituters,trusted_public_keys,flake,generated}."
        );
        let mut params = Params::default();
        assert!(params.insert("stop-before", "install").is_ok());
        assert_eq!(params.get("stop_before"), Some("install"));
        assert!(params.insert("nope", "").is_err());
    }

    #[test]
    fn full_length_line_is_flagged() {
        assert!(
            Params::parse(&full_line_ending("quiet"))
                .unwrap()
                .possibly_truncated
        );
        assert!(
            !Params::parse(&full_line_ending("quiet")[1..])
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
