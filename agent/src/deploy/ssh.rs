//! The operator's own OpenSSH client, as their other tools use it: `ssh` from `PATH`, so
//! `~/.ssh/config` (or `-F`), their agent, ProxyJump and keys work as they do everywhere else.
//! `deploy` adds options only where it must: a known_hosts of its own for the installer.

use crate::error::user_error;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the rescue system answers: `[USER@]HOST`, HOST possibly a `Host` of the ssh config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination(String);

impl Destination {
    pub fn parse(text: &str) -> Result<Destination> {
        let host = text.rsplit_once('@').map_or(text, |(_, host)| host);
        // A leading `-` would reach ssh as an option.
        if host.is_empty() || text.starts_with('-') || text.contains(char::is_whitespace) {
            return Err(user_error(
                format!("{text:?} is not an SSH destination."),
                "give the rescue system as root@HOST (or a Host from your ~/.ssh/config).",
            ));
        }
        Ok(Destination(text.to_string()))
    }

    /// The host part, as the operator wrote it (an address or a config alias).
    pub fn host(&self) -> &str {
        self.0.rsplit_once('@').map_or(&self.0, |(_, host)| host)
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How to reach the machine, the same for the rescue system, the installer and the installed
/// system: they share the address (and, behind a port forward, the port).
#[derive(Debug, Clone)]
pub struct Ssh {
    pub destination: Destination,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    /// `-o` options for every connection.
    pub options: Vec<String>,
}

impl Ssh {
    /// `ssh [options] DESTINATION REMOTE`; `pin` when the host key must be the installer's.
    pub fn command(&self, pin: Option<&PinnedHostKeys>, remote: &str) -> Command {
        let mut command = Command::new("ssh");
        if let Some(file) = &self.config_file {
            command.arg("-F").arg(file);
        }
        if let Some(port) = self.port {
            command.arg("-p").arg(port.to_string());
        }
        if let Some(identity) = &self.identity {
            command.arg("-i").arg(identity);
        }
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        // On the command line, these come before the config's, and ssh takes the first value.
        if let Some(pin) = pin {
            for option in pin.options() {
                command.arg("-o").arg(option);
            }
        }
        // No terminal (the output is streamed line by line), no forwarding, and a dead link
        // is noticed: the machine reboots under the connection more than once.
        command.args([
            "-T",
            "-a",
            "-x",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ]);
        command.arg(self.destination.to_string()).arg(remote);
        command
    }
}

/// The name the installer's host keys are filed under in [`PinnedHostKeys`]' known_hosts,
/// whatever address or alias reaches it.
const HOST_KEY_ALIAS: &str = "nixos-kexec-installer";

/// A known_hosts file that holds only the host keys `deploy` expects, the installer's (which
/// are the installed system's), checked strictly: the rescue system's key, or any other, is
/// refused, and nothing is learned or added. Removed on drop.
pub struct PinnedHostKeys {
    dir: PathBuf,
    file: PathBuf,
}

impl PinnedHostKeys {
    /// `public_keys`: OpenSSH public key lines (`ssh-ed25519 AAAA... comment`).
    pub fn new(public_keys: &[String]) -> Result<PinnedHostKeys> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("nixos-kexec-deploy-{}", uuid::Uuid::new_v4()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let pinned = PinnedHostKeys {
            file: dir.join("known_hosts"),
            dir,
        };
        let lines: String = public_keys
            .iter()
            .map(|key| format!("{HOST_KEY_ALIAS} {}\n", key.trim()))
            .collect();
        std::fs::write(&pinned.file, lines).with_context(|| format!("writing {}", pinned.file.display()))?;
        Ok(pinned)
    }

    fn options(&self) -> Vec<String> {
        vec![
            format!("UserKnownHostsFile={}", self.file.display()),
            "GlobalKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=yes".into(),
            format!("HostKeyAlias={HOST_KEY_ALIAS}"),
            "CheckHostIP=no".into(),
            "UpdateHostKeys=no".into(),
            // Nobody is there to answer a prompt while deploy waits for the machine.
            "BatchMode=yes".into(),
            "ConnectTimeout=10".into(),
        ]
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Leaves the file in place after deploy ends, for the ssh command deploy prints.
    pub fn keep(self) -> PathBuf {
        let file = self.file.clone();
        std::mem::forget(self);
        file
    }
}

impl Drop for PinnedHostKeys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `word` as one word for the remote user's shell, which ssh hands the command to.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A remote command line from words, each quoted.
pub fn command_line<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("root@203.0.113.10").unwrap().host(),
            "203.0.113.10"
        );
        assert_eq!(Destination::parse("rescue-box").unwrap().host(), "rescue-box");
        assert_eq!(
            Destination::parse("root@[2001:db8::1]").unwrap().host(),
            "[2001:db8::1]"
        );
        for bad in ["", "root@", "-oProxyCommand=x", "root@a b"] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }

    /// What the remote shell makes of a quoted line is the words we started from.
    #[test]
    fn quoted_words_survive_a_shell() {
        let words = [
            "run",
            "--param",
            "hostname=web1",
            "it's",
            "a b",
            "$HOME",
            "",
            "*",
            "x;y",
        ];
        let line = command_line(&words);
        let out = Command::new("sh")
            .args(["-c", &format!("printf '%s\\n' {line}")])
            .output()
            .unwrap();
        let printed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(printed.lines().collect::<Vec<_>>(), words);
    }

    #[test]
    fn the_pin_is_strict_and_its_own() {
        let pin = PinnedHostKeys::new(&["ssh-ed25519 AAAAC3Nza root@web1\n".into()]).unwrap();
        let text = std::fs::read_to_string(pin.path()).unwrap();
        assert_eq!(text, "nixos-kexec-installer ssh-ed25519 AAAAC3Nza root@web1\n");
        let ssh = Ssh {
            destination: Destination::parse("root@host").unwrap(),
            port: Some(2222),
            identity: None,
            config_file: None,
            options: vec![],
        };
        let line = crate::machine::runner::describe(&ssh.command(Some(&pin), "true"));
        for option in [
            "StrictHostKeyChecking=yes",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlias=nixos-kexec-installer",
            "-p 2222",
        ] {
            assert!(line.contains(option), "{line}");
        }
        assert!(line.ends_with("root@host true"), "{line}");
        let dir = pin.path().parent().unwrap().to_path_buf();
        drop(pin);
        assert!(!dir.exists());
    }
}
