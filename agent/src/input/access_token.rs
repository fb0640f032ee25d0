//! An access token for the user's private flake (`run --flake-token-file`), for Nix's
//! `access-tokens` setting. Nix applies it only in its github:, gitlab: and sourcehut:
//! fetchers (src/libfetchers/github.cc, in Debian's 2.8 as in current releases), keyed by the
//! reference's host: github.com, gitlab.com, git.sr.ht, or its `?host=` (GitHub Enterprise, a
//! self-hosted GitLab). The token travels as a secret in the appended archive
//! ([`SECRET_NAME`] under the secrets directory); the plan holds only [`TokenHost`].

use crate::error::user_error;
use crate::input::flake::{FlakeSource, UserFlake};
use crate::secret::Secret;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// The token's file in the secrets directory of the appended archive.
pub const SECRET_NAME: &str = "flake-access-token";

/// The token, locked in RAM and overwritten when dropped; never shown.
pub struct AccessToken(Secret);

impl AccessToken {
    /// The token as its file holds it, surrounding whitespace (the newline `echo` adds)
    /// dropped. Refused when empty, or when it holds a character that would change how Nix
    /// reads its configuration line: whitespace separates `host=token` pairs and `#` starts a
    /// comment. `origin` names the file in the messages, which never show the token.
    pub fn parse(secret: Secret, origin: &str) -> Result<AccessToken> {
        let bytes = secret.as_bytes();
        let start = bytes
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(bytes.len());
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(start, |last| last + 1);
        let token = &bytes[start..end];
        if token.is_empty() {
            return Err(user_error(
                format!("The flake access token file {origin} is empty."),
                "put the token (a GitHub, GitLab or sourcehut access token) in the file, alone on one line.",
            ));
        }
        if token.iter().any(u8::is_ascii_whitespace) {
            return Err(user_error(
                format!("The flake access token in {origin} holds whitespace inside, which no token has (Nix would read the rest as another host=token pair)."),
                "put the token alone in the file, on one line, as the forge showed it.",
            ));
        }
        if token.iter().any(|b| !b.is_ascii_graphic() || *b == b'#') {
            return Err(user_error(
                format!("The flake access token in {origin} holds a control character, a non-ASCII character or `#`, which no token has (Nix would read `#` as the start of a comment)."),
                "put the token alone in the file, on one line, as the forge showed it.",
            ));
        }
        Ok(AccessToken(Secret::new(token.to_vec())))
    }

    /// The installer's side: reads the token the rescue side sent and wipes its file at once,
    /// whatever happens next.
    pub fn take(path: &Path) -> Result<AccessToken> {
        let read = Secret::read(path);
        crate::installer::steps::keys::wipe_file(path);
        let secret = read.map_err(|e| {
            user_error(
                format!("The flake access token file {} cannot be read ({e:#}).", path.display()),
                "pass it with nixos-kexec run --flake-token-file FILE (or append a cpio archive holding etc/nixos-kexec/secrets/flake-access-token, mode 0600).",
            )
        })?;
        AccessToken::parse(secret, &path.display().to_string())
    }

    pub fn into_secret(self) -> Secret {
        self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(..)")
    }
}

/// The forges whose flake references Nix fetches with an access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    GitHub,
    GitLab,
    SourceHut,
}

impl Forge {
    const ALL: [Forge; 3] = [Forge::GitHub, Forge::GitLab, Forge::SourceHut];

    pub fn scheme(self) -> &'static str {
        match self {
            Forge::GitHub => "github:",
            Forge::GitLab => "gitlab:",
            Forge::SourceHut => "sourcehut:",
        }
    }

    /// The host Nix's fetcher uses when the reference names none (`?host=`).
    fn default_host(self) -> &'static str {
        match self {
            Forge::GitHub => "github.com",
            Forge::GitLab => "gitlab.com",
            Forge::SourceHut => "git.sr.ht",
        }
    }
}

/// Which host the token is for: what the plan knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHost {
    pub forge: Forge,
    /// As Nix's `access-tokens` keys it: the reference's `?host=`, or the forge's own.
    pub host: String,
}

impl TokenHost {
    /// The host Nix will use a token for when it fetches `flake`; refused when it fetches
    /// nothing with one.
    pub fn of(flake: Option<&UserFlake>) -> Result<TokenHost> {
        let Some(flake) = flake else {
            return Err(user_error(
                "A flake access token was given, but no flake to fetch with it.",
                "give the private flake too (nixos-kexec run --flake github:OWNER/REPO#NAME), or drop --flake-token-file.",
            ));
        };
        let reference = match &flake.source {
            FlakeSource::Remote(reference) => reference,
            FlakeSource::Directory(_) => {
                return Err(user_error(
                    format!("A flake access token was given for {flake}, a local directory, which run packs and sends along: Nix fetches it with no token."),
                    "drop --flake-token-file. (A private input of that flake is not covered: name the private flake itself with --flake github:OWNER/REPO#NAME.)",
                ))
            }
        };
        let Some(forge) = Forge::ALL.into_iter().find(|f| reference.starts_with(f.scheme())) else {
            return Err(user_error(
                format!("A flake access token was given for {flake}, but Nix uses access tokens only for github:, gitlab: and sourcehut: references (its access-tokens setting), not for this one."),
                format!("{}; SSH deploy keys (git+ssh://) are not supported yet.", fetched_with_token(reference)),
            ));
        };
        let host = query_value(reference, "host").unwrap_or(forge.default_host());
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !host_ok {
            return Err(user_error(
                format!("The flake {flake} names the host {host:?}, which Nix's {} fetcher refuses: it takes a host name alone (letters, digits, '.', '-'), no port or scheme, and always uses HTTPS on port 443.", forge.scheme()),
                "write ?host=HOSTNAME with the server's name alone, e.g. github:me/dotfiles?host=github.example.com#web1.",
            ));
        }
        Ok(TokenHost {
            forge,
            host: host.to_string(),
        })
    }

    /// The Nix configuration that gives Nix `token` for this host. Nix's GitLab fetcher wants
    /// the token's kind in front (`PAT:` sends it as Private-Token, `OAuth2:` as a bearer
    /// token); a token without one is a personal, project or group access token.
    pub fn nix_conf(&self, token: &AccessToken) -> Secret {
        let token = token.0.as_bytes();
        let kind: &[u8] = match self.forge {
            Forge::GitLab if !(token.starts_with(b"PAT:") || token.starts_with(b"OAuth2:")) => b"PAT:",
            _ => b"",
        };
        let lead = format!("access-tokens = {}=", self.host);
        // Sized once, so growing leaves no copy of the token behind.
        let mut conf = Vec::with_capacity(lead.len() + kind.len() + token.len() + 1);
        conf.extend_from_slice(lead.as_bytes());
        conf.extend_from_slice(kind);
        conf.extend_from_slice(token);
        conf.push(b'\n');
        Secret::new(conf)
    }
}

impl fmt::Display for TokenHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} references)",
            self.host,
            self.forge.scheme().trim_end_matches(':')
        )
    }
}

/// The value of `key` in a flake reference's query (`github:me/cfg?host=h&dir=x`).
fn query_value<'a>(reference: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = reference.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// How to name `reference`'s repository so Nix fetches it with the token: for a
/// `git+https://HOST/OWNER/REPO` reference, the forge reference of the same repository.
fn fetched_with_token(reference: &str) -> String {
    const GENERIC: &str = "name the repository as github:OWNER/REPO or gitlab:OWNER/REPO (with ?host=HOST for GitHub Enterprise or a self-hosted GitLab), which Nix fetches with the token";
    let Some(url) = ["git+https://", "git+http://"]
        .iter()
        .find_map(|scheme| reference.strip_prefix(scheme))
    else {
        return GENERIC.to_string();
    };
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let mut parts = url.split('/').filter(|p| !p.is_empty());
    let (Some(host), Some(owner), Some(repo)) = (parts.next(), parts.next(), parts.next()) else {
        return GENERIC.to_string();
    };
    let repo = repo.strip_suffix(".git").unwrap_or(repo);
    let instead = match host {
        "github.com" => format!("github:{owner}/{repo}"),
        "gitlab.com" => format!("gitlab:{owner}/{repo}"),
        "git.sr.ht" => format!("sourcehut:{owner}/{repo}"),
        _ => format!("github:{owner}/{repo}?host={host} (GitHub Enterprise) or gitlab:{owner}/{repo}?host={host} (a self-hosted GitLab)"),
    };
    format!(
        "name the repository as {instead}, which Nix fetches with the token (add /REF for a branch or tag)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::as_user_error;

    fn token(text: &str) -> Result<AccessToken> {
        AccessToken::parse(Secret::new(text.as_bytes().to_vec()), "/root/token")
    }

    fn host(reference: &str) -> Result<TokenHost> {
        TokenHost::of(Some(&UserFlake::parse(reference)?))
    }

    #[test]
    fn tokens_as_files_hold_them() {
        for (text, kept) in [
            (
                "ghp_16C7e42F292c6912E7710c838347Ae178B4a\n",
                "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            ),
            ("  glpat-xxxxxxxxxxxxxxxxxxxx\r\n", "glpat-xxxxxxxxxxxxxxxxxxxx"),
            ("PAT:glpat-abc", "PAT:glpat-abc"),
        ] {
            let parsed = token(text).unwrap().into_secret();
            assert_eq!(parsed.as_bytes(), kept.as_bytes(), "{text:?}");
        }
        for (text, says) in [
            ("", "is empty"),
            (" \n\n", "is empty"),
            ("ghp_abc def\n", "whitespace inside"),
            ("ghp_abc\nghp_def\n", "whitespace inside"),
            ("ghp_abc#1", "`#`"),
            ("ghp_\u{1b}abc", "control character"),
            ("ghp_äbc", "non-ASCII"),
        ] {
            let err = token(text).unwrap_err();
            let user = as_user_error(&err).unwrap_or_else(|| panic!("{text:?}: {err:#}"));
            assert!(user.problem.contains(says), "{text:?}: {}", user.problem);
            assert!(user.problem.contains("/root/token"), "{}", user.problem);
            assert!(!user.to_string().contains("abc"), "the token is shown: {user}");
        }
        assert_eq!(format!("{:?}", token("ghp_abc").unwrap()), "AccessToken(..)");
    }

    #[test]
    fn the_host_nix_keys_the_token_by() {
        for (reference, forge, expected) in [
            ("github:me/private#web1", Forge::GitHub, "github.com"),
            (
                "github:me/private/main?dir=hosts#web1",
                Forge::GitHub,
                "github.com",
            ),
            (
                "github:me/private?host=git.corp.example#web1",
                Forge::GitHub,
                "git.corp.example",
            ),
            (
                "github:me/private?dir=x&host=ghe.example.com#web1",
                Forge::GitHub,
                "ghe.example.com",
            ),
            ("gitlab:me/private#web1", Forge::GitLab, "gitlab.com"),
            (
                "gitlab:me/private?host=gitlab.corp-1.example#web1",
                Forge::GitLab,
                "gitlab.corp-1.example",
            ),
            ("sourcehut:~me/private#web1", Forge::SourceHut, "git.sr.ht"),
        ] {
            let found = host(reference).unwrap_or_else(|e| panic!("{reference}: {e:#}"));
            assert_eq!(
                found,
                TokenHost {
                    forge,
                    host: expected.into()
                },
                "{reference}"
            );
        }
    }

    #[test]
    fn a_token_nix_would_not_use_is_refused_with_what_works() {
        for (reference, says, fix) in [
            (
                "git+https://github.com/me/private.git?ref=main#web1",
                "only for github:, gitlab: and sourcehut:",
                "name the repository as github:me/private,",
            ),
            (
                "git+https://gitlab.com/me/private#web1",
                "only for github:",
                "gitlab:me/private,",
            ),
            (
                "git+https://git.corp.example/me/private#web1",
                "only for github:",
                "github:me/private?host=git.corp.example (GitHub Enterprise) or gitlab:me/private?host=git.corp.example",
            ),
            ("git+ssh://git@github.com/me/private#web1", "only for github:", "SSH deploy keys"),
            ("https://example.com/cfg.tar.gz#web1", "only for github:", "?host=HOST"),
            ("./cfg#web1", "a local directory", "drop --flake-token-file"),
            ("github:me/private?host=10.0.2.2:8443#web1", "no port", "?host=HOSTNAME"),
            ("github:me/private?host=#web1", "names the host \"\"", "?host=HOSTNAME"),
        ] {
            let err = host(reference).unwrap_err();
            let user = as_user_error(&err).unwrap_or_else(|| panic!("{reference}: {err:#}"));
            assert!(user.problem.contains(says), "{reference}: {}", user.problem);
            assert!(user.fix.contains(fix), "{reference}: {}", user.fix);
        }
        let err = TokenHost::of(None).unwrap_err();
        assert!(
            crate::error::one_line(&err).contains("no flake to fetch with it"),
            "{err}"
        );
    }

    #[test]
    fn the_nix_configuration_line() {
        let conf = |reference: &str, text: &str| {
            String::from_utf8(
                host(reference)
                    .unwrap()
                    .nix_conf(&token(text).unwrap())
                    .as_bytes()
                    .to_vec(),
            )
            .unwrap()
        };
        assert_eq!(
            conf("github:me/private?host=git.corp.example#web1", "ghp_abc\n"),
            "access-tokens = git.corp.example=ghp_abc\n"
        );
        assert_eq!(
            conf("gitlab:me/private#web1", "glpat-abc"),
            "access-tokens = gitlab.com=PAT:glpat-abc\n"
        );
        assert_eq!(
            conf("gitlab:me/private#web1", "OAuth2:abc"),
            "access-tokens = gitlab.com=OAuth2:abc\n"
        );
        assert_eq!(
            conf("sourcehut:~me/private#web1", "abc"),
            "access-tokens = git.sr.ht=abc\n"
        );
        let host = host("github:me/private#web1").unwrap();
        assert_eq!(host.to_string(), "github.com (github references)");
        assert_eq!(
            serde_json::to_string(&host).unwrap(),
            r#"{"forge":"github","host":"github.com"}"#
        );
    }
}
