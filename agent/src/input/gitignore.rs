//! Which paths under a directory git would leave out, by the rules of gitignore(5): the
//! `.gitignore` of every directory, the repository's `info/exclude`, and `.git` itself.
//!
//! Made to be a [`crate::input::tree::Walk::skip`], so the directory is read once: a
//! directory's `.gitignore` is read the first time something in it is asked about, which a walk
//! does right after deciding to enter it. No repository is needed (without one, the directory's
//! own `.gitignore` files still count); inside one, the `.gitignore` files between the
//! repository's top and the directory count too, as they do for git. The global excludes file
//! (`core.excludesFile`) does not: it belongs to whoever runs the command, not to the flake.
//! Matching is on bytes, as git's is, so a `.gitignore` that is not UTF-8 is read as it is.

use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct GitIgnore {
    /// The repository's work tree holding the directory asked about, or that directory itself
    /// when it is in no repository. Paths inside are kept relative to it.
    top: PathBuf,
    /// The directory asked about, relative to `top`, with a `/` after it unless empty.
    prefix: String,
    /// `info/exclude`: below every `.gitignore`, as if at the top.
    exclude: Vec<Pattern>,
    /// Every directory entered so far (and those from `top` down to the directory asked
    /// about), by its path relative to `top`.
    dirs: RefCell<HashMap<String, Dir>>,
}

enum Dir {
    /// Left out with all it holds: nothing in it can be taken back in, so its `.gitignore` is
    /// never read (git does not read it either).
    Ignored,
    Entered(Vec<Pattern>),
}

impl GitIgnore {
    /// Reads the `.gitignore` files from the repository's top down to `root`, and the
    /// repository's `info/exclude`.
    pub fn new(root: &Path) -> Result<GitIgnore> {
        let absolute =
            std::fs::canonicalize(root).with_context(|| format!("resolving {}", root.display()))?;
        let repository = absolute
            .ancestors()
            .find(|dir| dir.join(".git").symlink_metadata().is_ok());
        let (top, exclude) = match repository {
            Some(top) => (top.to_path_buf(), read_exclude(top)?),
            None => (absolute.clone(), Vec::new()),
        };
        let below = absolute
            .strip_prefix(&top)
            .with_context(|| format!("{} is outside {}", absolute.display(), top.display()))?;
        let Some(below) = below.to_str() else {
            bail!("{} has a name that is not UTF-8", absolute.display());
        };
        let mut dirs = HashMap::new();
        let mut dir = String::new();
        dirs.insert(dir.clone(), Dir::Entered(read_gitignore(&top)?));
        for name in below.split('/').filter(|name| !name.is_empty()) {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(name);
            // A directory above `root` that git ignores is not held against it: the operator
            // named `root` on purpose.
            dirs.insert(dir.clone(), Dir::Entered(read_gitignore(&top.join(&dir))?));
        }
        let prefix = if dir.is_empty() { dir } else { format!("{dir}/") };
        Ok(GitIgnore {
            top,
            prefix,
            exclude,
            dirs: RefCell::new(dirs),
        })
    }

    /// Whether git leaves out `path` (relative to the directory given to [`GitIgnore::new`],
    /// `/`-separated), a directory when `is_dir`: so when one of the directories holding it is
    /// left out, or the last pattern naming it, from the deepest `.gitignore` that has one, is
    /// not a `!` pattern.
    pub fn is_ignored(&self, path: &str, is_dir: bool) -> Result<bool> {
        let full = format!("{}{path}", self.prefix);
        let holders = full
            .char_indices()
            .filter(|&(at, c)| c == '/' && at >= self.prefix.len())
            .map(|(at, _)| &full[..at]);
        for dir in holders {
            if self.enter(dir)? {
                return Ok(true);
            }
        }
        Ok(self.decide(&full, is_dir))
    }

    /// Whether `dir` (relative to `top`, under the directory asked about) is left out, reading
    /// its `.gitignore` the first time when it is not. Its parents are entered already.
    fn enter(&self, dir: &str) -> Result<bool> {
        if let Some(known) = self.dirs.borrow().get(dir) {
            return Ok(matches!(known, Dir::Ignored));
        }
        let ignored = self.decide(dir, true);
        let entry = if ignored {
            Dir::Ignored
        } else {
            Dir::Entered(read_gitignore(&self.top.join(dir))?)
        };
        self.dirs.borrow_mut().insert(dir.to_string(), entry);
        Ok(ignored)
    }

    /// The patterns' verdict on `full` (relative to `top`), whose parents are all entered.
    fn decide(&self, full: &str, is_dir: bool) -> bool {
        let name = full.rsplit_once('/').map_or(full, |(_, name)| name);
        if name == ".git" {
            return true;
        }
        let dirs = self.dirs.borrow();
        let mut dir = full;
        while !dir.is_empty() {
            dir = dir.rsplit_once('/').map_or("", |(parent, _)| parent);
            if let Some(Dir::Entered(patterns)) = dirs.get(dir) {
                if let Some(last) = last_match(patterns, dir, full, is_dir) {
                    return !last.negated;
                }
            }
        }
        last_match(&self.exclude, "", full, is_dir).is_some_and(|last| !last.negated)
    }
}

/// Within one file the last pattern that matches decides.
fn last_match<'p>(patterns: &'p [Pattern], base: &str, full: &str, is_dir: bool) -> Option<&'p Pattern> {
    patterns
        .iter()
        .rev()
        .find(|pattern| pattern.matches(base, full, is_dir))
}

/// A directory's `.gitignore`, or nothing when it has none. One that is a symbolic link is
/// not followed, as git (2.32 and later) does not follow it.
fn read_gitignore(dir: &Path) -> Result<Vec<Pattern>> {
    let path = dir.join(".gitignore");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            log::warn!(
                "{} is a symbolic link, which git does not follow either: not read",
                path.display()
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        return Ok(Vec::new());
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(parse(&bytes))
}

/// The repository's `info/exclude`: in `.git`, or where a `.git` file (a worktree's, a
/// submodule's) points, in the common directory a worktree shares with its repository.
fn read_exclude(top: &Path) -> Result<Vec<Pattern>> {
    let dot_git = top.join(".git");
    let git_dir = if dot_git.is_dir() {
        dot_git
    } else {
        let link =
            std::fs::read_to_string(&dot_git).with_context(|| format!("reading {}", dot_git.display()))?;
        let Some(target) = link.trim_end().strip_prefix("gitdir: ") else {
            // Not a repository after all (git would not take it for one either).
            return Ok(Vec::new());
        };
        top.join(target)
    };
    // Only a worktree's has a `commondir`.
    let common = match std::fs::read_to_string(git_dir.join("commondir")) {
        Ok(common) => git_dir.join(common.trim_end()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => git_dir,
        Err(e) => return Err(e).with_context(|| format!("reading {}", git_dir.join("commondir").display())),
    };
    let path = common.join("info/exclude");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(parse(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The patterns of one file, in order. A byte order mark at the start and a carriage return at
/// the end of a line are not part of any pattern.
fn parse(bytes: &[u8]) -> Vec<Pattern> {
    let text = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    text.split(|&b| b == b'\n')
        .filter_map(|line| Pattern::parse(line.strip_suffix(b"\r").unwrap_or(line)))
        .collect()
}

#[derive(Debug)]
struct Pattern {
    /// `!`: takes back in what an earlier pattern left out.
    negated: bool,
    /// A trailing `/`: only directories.
    dir_only: bool,
    /// No `/` but a trailing one: matched against the last name alone, at any depth. With one,
    /// against the path relative to the `.gitignore`'s directory.
    anywhere: bool,
    glob: Vec<Token>,
}

impl Pattern {
    /// One line's pattern; `None` for blank lines, comments, and patterns that can match
    /// nothing (an unfinished `[`, a trailing `\`).
    fn parse(line: &[u8]) -> Option<Pattern> {
        if line.first() == Some(&b'#') {
            return None;
        }
        let mut text = trim_trailing_spaces(line);
        let negated = text.first() == Some(&b'!');
        if negated {
            text = &text[1..];
        }
        let dir_only = text.last() == Some(&b'/');
        if dir_only {
            text = &text[..text.len() - 1];
        }
        let anywhere = !text.contains(&b'/');
        if !anywhere {
            text = text.strip_prefix(b"/").unwrap_or(text);
        }
        if text.is_empty() {
            return None;
        }
        Some(Pattern {
            negated,
            dir_only,
            anywhere,
            glob: compile(text)?,
        })
    }

    /// Whether it names `full` (relative to the repository's top), when it is read from the
    /// `.gitignore` in `base` (also relative to the top).
    fn matches(&self, base: &str, full: &str, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        if self.anywhere {
            let name = full.rsplit_once('/').map_or(full, |(_, name)| name);
            return glob_matches(&self.glob, name.as_bytes());
        }
        let below = if base.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(base).and_then(|rest| rest.strip_prefix('/'))
        };
        below.is_some_and(|below| glob_matches(&self.glob, below.as_bytes()))
    }
}

/// Trailing spaces are dropped, unless quoted with a backslash.
fn trim_trailing_spaces(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && line[end - 1] == b' ' {
        let backslashes = line[..end - 1].iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 1 {
            break;
        }
        end -= 1;
    }
    &line[..end]
}

#[derive(Debug)]
enum Token {
    Byte(u8),
    /// `?`: one byte, not `/`.
    One,
    /// `*`: any bytes, not `/`.
    Star,
    /// `**/` at the start or after a `/`: nothing, or any path of directories (ending in `/`).
    /// Where a name of that path starts; always followed by [`Token::InDir`].
    Dirs,
    /// Inside a name of a `**/` path, which only a `/` ends.
    InDir,
    /// `**` at the end, at the start or after a `/`: everything.
    Rest,
    Class(Class),
}

/// `[...]`: one byte, not `/`, that is (or with `!` or `^` first, is not) one of the items.
#[derive(Debug)]
struct Class {
    negated: bool,
    items: Vec<ClassItem>,
}

#[derive(Debug)]
enum ClassItem {
    Byte(u8),
    Range(u8, u8),
    /// `[:alpha:]` and the like.
    Named(fn(&u8) -> bool),
}

impl Class {
    fn matches(&self, b: u8) -> bool {
        let listed = self.items.iter().any(|item| match *item {
            ClassItem::Byte(c) => b == c,
            ClassItem::Range(low, high) => (low..=high).contains(&b),
            ClassItem::Named(test) => test(&b),
        });
        b != b'/' && listed != self.negated
    }
}

/// A pattern's glob (without `!`, the trailing `/` and an anchoring leading `/`) as tokens;
/// `None` when it can match nothing.
fn compile(text: &[u8]) -> Option<Vec<Token>> {
    let mut glob = Vec::new();
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b'\\' => {
                glob.push(Token::Byte(*text.get(at + 1)?));
                at += 2;
            }
            b'?' => {
                glob.push(Token::One);
                at += 1;
            }
            b'*' => {
                let start = at;
                while text.get(at) == Some(&b'*') {
                    at += 1;
                }
                // `**` is special only as a whole name: `a**b` and `**b` are `*`.
                let whole_name = at - start >= 2 && (start == 0 || text[start - 1] == b'/');
                let rest = &text[at..];
                let slash = if rest.starts_with(b"/") {
                    1
                } else if rest.starts_with(b"\\/") {
                    2
                } else {
                    0
                };
                if whole_name && rest.is_empty() {
                    glob.push(Token::Rest);
                } else if whole_name && slash > 0 {
                    glob.extend([Token::Dirs, Token::InDir]);
                    at += slash;
                } else {
                    glob.push(Token::Star);
                }
            }
            b'[' => {
                let (class, next) = compile_class(text, at + 1)?;
                glob.push(Token::Class(class));
                at = next;
            }
            b => {
                glob.push(Token::Byte(b));
                at += 1;
            }
        }
    }
    Some(glob)
}

/// The class whose items start at `at` (after the `[`), and where the pattern goes on after its
/// `]`; `None` for a class without `]` or with an unknown `[:name:]`, which git takes as a
/// pattern that matches nothing.
fn compile_class(text: &[u8], mut at: usize) -> Option<(Class, usize)> {
    let negated = matches!(text.get(at), Some(b'!' | b'^'));
    if negated {
        at += 1;
    }
    let mut items = Vec::new();
    // The byte a `-` makes a range from; none right after a range or a `[:name:]`.
    let mut previous: Option<u8> = None;
    let first = at;
    loop {
        let b = *text.get(at)?;
        // A `]` first in the class is one of its bytes.
        if b == b']' && at > first {
            return Some((Class { negated, items }, at + 1));
        }
        let next = text.get(at + 1).copied();
        match (b, previous) {
            (b'\\', _) => {
                let escaped = next?;
                items.push(ClassItem::Byte(escaped));
                previous = Some(escaped);
                at += 2;
            }
            (b'-', Some(low)) if next.is_some_and(|n| n != b']') => {
                let (high, after) = match next? {
                    b'\\' => (*text.get(at + 2)?, at + 3),
                    high => (high, at + 2),
                };
                items.push(ClassItem::Range(low, high));
                previous = None;
                at = after;
            }
            (b'[', _) if next == Some(b':') => {
                // Up to the first `]`: a `[:name:]` when a `:` is right before it, else the
                // `[` is one of the bytes.
                let close = at + 2 + text[at + 2..].iter().position(|&c| c == b']')?;
                if close >= at + 3 && text[close - 1] == b':' {
                    items.push(ClassItem::Named(named_class(&text[at + 2..close - 1])?));
                    previous = None;
                    at = close + 1;
                } else {
                    items.push(ClassItem::Byte(b'['));
                    previous = Some(b'[');
                    at += 1;
                }
            }
            _ => {
                items.push(ClassItem::Byte(b));
                previous = Some(b);
                at += 1;
            }
        }
    }
}

/// The POSIX classes git knows, in the C locale.
fn named_class(name: &[u8]) -> Option<fn(&u8) -> bool> {
    Some(match name {
        b"alnum" => u8::is_ascii_alphanumeric,
        b"alpha" => u8::is_ascii_alphabetic,
        b"blank" => |b: &u8| matches!(b, b' ' | b'\t'),
        b"cntrl" => u8::is_ascii_control,
        b"digit" => u8::is_ascii_digit,
        b"graph" => u8::is_ascii_graphic,
        b"lower" => u8::is_ascii_lowercase,
        b"print" => |b: &u8| b.is_ascii_graphic() || *b == b' ',
        b"punct" => u8::is_ascii_punctuation,
        b"space" => |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c'),
        b"upper" => u8::is_ascii_uppercase,
        b"xdigit" => u8::is_ascii_hexdigit,
        _ => return None,
    })
}

/// Whether `glob` matches all of `text`: the set of places in the glob that the bytes read so
/// far can reach, moved on one byte at a time (no backtracking, so no pattern is slow).
fn glob_matches(glob: &[Token], text: &[u8]) -> bool {
    let mut now = vec![false; glob.len() + 1];
    now[0] = true;
    skip_empty(glob, &mut now);
    for &b in text {
        let mut next = vec![false; glob.len() + 1];
        for (at, token) in glob.iter().enumerate().filter(|&(at, _)| now[at]) {
            match token {
                Token::Byte(c) if b == *c => next[at + 1] = true,
                Token::One if b != b'/' => next[at + 1] = true,
                Token::Class(class) if class.matches(b) => next[at + 1] = true,
                Token::Star if b != b'/' => next[at] = true,
                Token::Dirs if b == b'/' => next[at] = true,
                Token::Dirs => next[at + 1] = true,
                // The name ends: the next one starts, or the path of directories does.
                Token::InDir if b == b'/' => next[at - 1] = true,
                Token::InDir => next[at] = true,
                Token::Rest => next[at] = true,
                _ => {}
            }
        }
        skip_empty(glob, &mut next);
        if !next.contains(&true) {
            return false;
        }
        now = next;
    }
    now[glob.len()]
}

/// Adds the places reached by matching nothing at a `*`, `**/` or `**`.
fn skip_empty(glob: &[Token], places: &mut [bool]) {
    for (at, token) in glob.iter().enumerate() {
        if places[at] {
            match token {
                Token::Star | Token::Rest => places[at + 1] = true,
                Token::Dirs => places[at + 2] = true,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::tree::tests::RULES;
    use crate::input::tree::{EntryKind, Tree, Walk};
    use crate::machine::runner;
    use std::collections::BTreeSet;
    use std::process::Command;

    /// Whether the patterns of one `.gitignore` at the top leave out `path`.
    fn ignored(gitignore: &str, path: &str, is_dir: bool) -> bool {
        let patterns = parse(gitignore.as_bytes());
        last_match(&patterns, "", path, is_dir).is_some_and(|last| !last.negated)
    }

    #[test]
    fn patterns_match_as_gitignore_5_says() {
        let cases: &[(&str, &str, bool, bool)] = &[
            // (patterns, path, is a directory, left out)
            ("", "a", false, false),
            ("# a\n\n", "# a", false, false),
            ("\\#a", "#a", false, true),
            ("\\!a", "!a", false, true),
            ("!a", "a", false, false),
            ("*.log\n!keep.log", "keep.log", false, false),
            ("*.log\n!keep.log", "x/drop.log", false, true),
            ("!keep.log\n*.log", "keep.log", false, true),
            // Trailing spaces go, unless quoted; a carriage return before the newline goes.
            ("a  ", "a", false, true),
            ("a\\ ", "a ", false, true),
            ("a\\ ", "a", false, false),
            ("a\r\nb", "a", false, true),
            ("\u{feff}a", "a", false, true),
            // A trailing `/` is for directories only.
            ("out/", "out", true, true),
            ("out/", "out", false, false),
            ("out/", "x/out", true, true),
            // No `/` before the end: any depth. A `/` at the start or inside: anchored.
            ("out", "x/y/out", false, true),
            ("/out", "out", false, true),
            ("/out", "x/out", false, false),
            ("x/out", "x/out", false, true),
            ("x/out", "y/x/out", false, false),
            ("x/out/", "x/out", true, true),
            // `*` and `?` stop at `/`.
            ("x/*", "x/a", false, true),
            ("x/*", "x/a/b", false, false),
            ("x/*.c", "x/a.c", false, true),
            ("x/*.c", "x/y/a.c", false, false),
            ("x/?", "x/a", false, true),
            ("x/?", "x/ab", false, false),
            ("a?c", "a/c", false, false),
            ("*", "anything", false, true),
            // `?` is one byte, as in git: not an `é`.
            ("?.txt", "é.txt", false, false),
            ("??.txt", "é.txt", false, true),
            // Classes.
            ("[abc].x", "b.x", false, true),
            ("[abc].x", "d.x", false, false),
            ("[!abc].x", "d.x", false, true),
            ("[^abc].x", "a.x", false, false),
            ("[a-c0-9].x", "7.x", false, true),
            ("[a-c0-9].x", "d.x", false, false),
            ("[]].x", "].x", false, true),
            ("[!]].x", "a.x", false, true),
            ("[a-].x", "-.x", false, true),
            ("[\\]].x", "].x", false, true),
            ("[[:digit:]].x", "4.x", false, true),
            ("[[:digit:]].x", "a.x", false, false),
            ("[[:upper:][:space:]]x", " x", false, true),
            ("x/[!a]", "x//", false, false),
            // Patterns that match nothing: unfinished class, unknown class, trailing `\`.
            ("[abc", "[abc", false, false),
            ("[[:nope:]]", "n", false, false),
            ("a\\", "a\\", false, false),
            // `\` quotes any byte, glob characters too.
            ("\\*", "*", false, true),
            ("\\*", "a", false, false),
            ("a\\?", "a?", false, true),
            ("a\\?", "ab", false, false),
            // `**/` at the start: any depth, none too.
            ("**/foo", "foo", false, true),
            ("**/foo", "a/b/foo", false, true),
            ("**/foo/bar", "a/foo/bar", false, true),
            ("**/foo/bar", "a/foo/x/bar", false, false),
            // `/**` at the end: everything inside, not the directory itself.
            ("abc/**", "abc/x/y", false, true),
            ("abc/**", "abc", true, false),
            // `/**/` inside: zero or more directories.
            ("a/**/b", "a/b", false, true),
            ("a/**/b", "a/x/b", false, true),
            ("a/**/b", "a/x/y/b", false, true),
            ("a/**/b", "a/xb", false, false),
            ("a/**/b", "x/a/b", false, false),
            // `**` not a whole name is a `*`.
            ("a**b", "axxb", false, true),
            ("a/**b", "a/x/b", false, false),
            ("a/**b", "a/xb", false, true),
            ("**", "x", false, true),
            ("/**", "x/y", false, true),
        ];
        for &(gitignore, path, is_dir, left_out) in cases {
            assert_eq!(
                ignored(gitignore, path, is_dir),
                left_out,
                "{gitignore:?} on {path:?} (directory: {is_dir})"
            );
        }
    }

    #[test]
    fn a_line_that_is_not_utf8_is_read_as_bytes() {
        let patterns = parse(b"caf\xe9\n[\xc3]\xa9.txt\nplain\n");
        assert_eq!(patterns.len(), 3);
        let left_out = |path: &str| last_match(&patterns, "", path, false).is_some();
        assert!(!left_out("café"));
        assert!(left_out("é.txt"), "git compares bytes: [\\xc3] then \\xa9 is é");
        assert!(left_out("plain"));
    }

    fn write(root: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        }
    }

    #[test]
    fn deeper_files_win_and_an_ignored_directory_keeps_its_contents_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            &[
                (".gitignore", "*.txt\nbuild/\n"),
                ("a/.gitignore", "!*.txt\n"),
                ("build/.gitignore", "!*\n"),
            ],
        );
        let matcher = GitIgnore::new(root).unwrap();
        assert!(matcher.is_ignored("x.txt", false).unwrap());
        assert!(!matcher.is_ignored("a/x.txt", false).unwrap());
        assert!(matcher.is_ignored("a/b/c/.git", true).unwrap());
        assert!(matcher.is_ignored("build", true).unwrap());
        assert!(
            matcher.is_ignored("build/x", false).unwrap(),
            "a file in a left-out directory cannot be taken back in"
        );
        assert!(
            !matcher.is_ignored("build", false).unwrap(),
            "a file named build is kept"
        );
    }

    /// What `git ls-files --others --exclude-standard` run in `dir` lists (the files git would
    /// add; no global excludes file), and the files and links a walk of `dir` keeps with the
    /// matcher as its skip.
    fn git_and_ours(dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
        let listed = runner::run(
            Command::new("git")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .arg("-C")
                .arg(dir)
                .args(["-c", "core.excludesFile=/dev/null"])
                .args(["ls-files", "-z", "--others", "--exclude-standard", "-c"]),
        )
        .unwrap();
        let git = listed
            .split('\0')
            .filter(|path| !path.is_empty())
            .map(str::to_string)
            .collect();
        let matcher = GitIgnore::new(dir).unwrap();
        let skip = |path: &str, is_dir: bool| matcher.is_ignored(path, is_dir);
        let walk = Walk {
            skip: Some(&skip),
            ..RULES
        };
        let ours = Tree::walk(dir, &walk)
            .unwrap()
            .entries
            .into_iter()
            .filter(|entry| entry.kind != EntryKind::Dir)
            .map(|entry| entry.path)
            .collect();
        (git, ours)
    }

    fn git(dir: &Path, args: &[&str]) {
        runner::run(Command::new("git").arg("-C").arg(dir).args(args)).unwrap();
    }

    #[test]
    fn keeps_what_git_would_add() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        git(&root, &["init", "-q"]);
        let mut gitignore = b"# a comment\n\\#hash.txt\n\\!bang.txt\n*.log\n!important.log\n\
/anchored.txt\nbuild/\n!build/keep.txt\ndocs/*.md\n!docs/README.md\n**/cache\nlogs/**\n\
!logs/keep/\n!logs/keep/**\na/**/z.txt\n[abc]x.bin\n[!abc]y.bin\n[a-c0-9]r.dat\n\
trailing.txt   \nspace\\ \n?.one\nlinkdir/\nfoo/*/bar\n\\*star\n[[:digit:]]num\n!neg.cfg\n"
            .to_vec();
        gitignore.extend_from_slice(b"caf\xe9\n");
        std::fs::write(root.join(".gitignore"), gitignore).unwrap();
        write(
            &root,
            &[
                (".git/info/exclude", "*.tmp\nneg.cfg\n"),
                (
                    "sub/.gitignore",
                    "\u{feff}*.txt\r\n!/keep.txt\r\ndeep/\r\n/only-here.md\r\n",
                ),
                ("sub/inner/.gitignore", "!*.txt\n"),
            ],
        );
        let files = [
            "#hash.txt",
            "#other.txt",
            "!bang.txt",
            "bang.txt",
            "x.log",
            "q/y.log",
            "important.log",
            "q/important.log",
            "anchored.txt",
            "q/anchored.txt",
            "build/keep.txt",
            "build/x",
            "q/build/y",
            "docs/a.md",
            "docs/README.md",
            "docs/deep/b.md",
            "cache/c",
            "x/y/cache/d",
            "cachex/e",
            "logs/a",
            "logs/keep/b",
            "logs/keep/deep/c",
            "logs/other/d",
            "a/z.txt",
            "a/q/r/z.txt",
            "b/a/z.txt",
            "ax.bin",
            "dx.bin",
            "ay.bin",
            "dy.bin",
            "7r.dat",
            "dr.dat",
            "trailing.txt",
            "space ",
            "space",
            "x.one",
            "xy.one",
            "é.one",
            "real/f",
            "foo/q/bar",
            "foo/bar",
            "foo/q/r/bar",
            "*star",
            "xstar",
            "5num",
            "xnum",
            "neg.cfg",
            "excluded.tmp",
            "café",
            "sub/a.txt",
            "sub/keep.txt",
            "sub/x/keep.txt",
            "sub/deep/f",
            "sub/only-here.md",
            "sub/x/only-here.md",
            "sub/inner/b.txt",
            "sub/z.log",
            "sub/t.tmp",
        ];
        write(&root, &files.map(|name| (name, "x")));
        std::os::unix::fs::symlink("real", root.join("linkdir")).unwrap();

        let (git_adds, ours) = git_and_ours(&root);
        assert_eq!(ours, git_adds);
        // The patterns did leave out and take back in (the Latin-1 `caf\xe9` line is not `café`).
        for kept in [
            "important.log",
            "docs/README.md",
            "logs/keep/deep/c",
            "sub/inner/b.txt",
            "linkdir",
            "neg.cfg",
            "space",
            "café",
        ] {
            assert!(ours.contains(kept), "{kept}");
        }
        for left_out in [
            "build/keep.txt",
            "a/q/r/z.txt",
            "sub/x/keep.txt",
            "excluded.tmp",
            "space ",
            "x.one",
        ] {
            assert!(!ours.contains(left_out), "{left_out}");
        }

        // A directory inside the repository: the top's .gitignore and info/exclude count too.
        let (git_adds, ours) = git_and_ours(&root.join("sub"));
        assert_eq!(ours, git_adds);
        assert!(!ours.contains("z.log") && !ours.contains("t.tmp") && ours.contains("keep.txt"));

        // A worktree, whose .git is a file: info/exclude is the repository's.
        git(
            &root,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "x",
            ],
        );
        let worktree = dir.path().join("worktree");
        git(&root, &["worktree", "add", "-q", worktree.to_str().unwrap()]);
        write(
            &worktree,
            &[("w.tmp", "x"), ("w.txt", "x"), (".gitignore", "*.txt\n")],
        );
        let (git_adds, ours) = git_and_ours(&worktree);
        assert_eq!(ours, git_adds);
        assert_eq!(ours, BTreeSet::from([".gitignore".to_string()]));
    }

    #[test]
    fn a_gitignore_that_cannot_be_read_is_an_error_and_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, &[("elsewhere", "*\n"), ("sub/keep", "")]);
        std::os::unix::fs::symlink("../elsewhere", root.join("sub/.gitignore")).unwrap();
        std::fs::create_dir(root.join("odd")).unwrap();
        std::fs::create_dir(root.join("odd/.gitignore")).unwrap();
        let matcher = GitIgnore::new(root).unwrap();
        assert!(!matcher.is_ignored("sub/keep", false).unwrap());
        assert!(!matcher.is_ignored("odd/x", false).unwrap());

        std::fs::create_dir(root.join("closed")).unwrap();
        std::fs::write(root.join("closed/.gitignore"), "x\n").unwrap();
        std::fs::set_permissions(
            root.join("closed/.gitignore"),
            std::os::unix::fs::PermissionsExt::from_mode(0o000),
        )
        .unwrap();
        // Root reads anything: read on a thread whose filesystem uid is nobody's (setfsuid(2) is
        // per thread).
        let root = root.to_path_buf();
        let err = std::thread::spawn(move || {
            // SAFETY: a raw syscall on this thread alone, which ends right after.
            unsafe { libc::syscall(libc::SYS_setfsuid, 65534) };
            let matcher = GitIgnore::new(&root).unwrap();
            matcher.is_ignored("closed/y", false).unwrap_err()
        })
        .join()
        .unwrap();
        assert!(format!("{err:#}").contains("closed/.gitignore"), "{err:#}");
    }
}
